"""The generation benchmark's report: ratios of ours to HF generate (b, c) and the floor's,
and the printed table. generation.py measures; this reads its JSON report."""

from __future__ import annotations


def add_ratios(report: dict) -> dict:
    """ours (a) tokens/s divided by b's and c's (wall and CPU time), per scenario; and the
    floor's and floor+kv's: how much faster than b or c a method doing only those parts runs."""
    for results in report["scenarios"].values():
        for fast in ("a", "floor", "floor+kv"):
            for ref in ("b", "c"):
                if fast in results and "tokens_per_second" in results.get(ref, {}):
                    this, other = results[fast], results[ref]
                    this[f"x_vs_{ref}"] = this["tokens_per_second"] / other["tokens_per_second"]
                    this[f"x_vs_{ref}_cpu"] = (this["tokens_per_cpu_second"]
                                               / other["tokens_per_cpu_second"])
    return report


METHODS = ("a", "a/layers", "a/unpacked", "b", "c", "d", "d/llama", "ceiling")
NAMES = {"a": "a  ours, HybridRollout (full gather)",
         "a/layers": "a' ours, HybridRollout (layer groups of 2)",
         "a/unpacked": "a\" ours, full gather, packed_weights off",
         "b": "b  HF generate, gathered weights",
         "c": "c  HF generate, sharded, synced_gpus",
         "d": "d  DeepSpeed HybridEngineRollout (Qwen2)",
         "d/llama": "d' DeepSpeed HybridEngineRollout (Llama)",
         "floor": "f  floor: a's weight matmuls alone",
         "kv_read": "k  a's KV cache reads alone, at stream rate",
         "floor+kv": "f+k  weight matmuls, then KV reads"}


def format_table(report: dict) -> str:
    w = report["workload"]
    ranks = report["ranks"]
    title = (f"generation benchmark: {ranks * w['prompts_per_rank']} prompts x "
             f"G={w['group_size']}, prompt {w['prompt_len']} tokens, <= {w['new_tokens']} new "
             f"tokens, {report['params_millions']}M-param model, {report['dtype']}, ZeRO-3, "
             f"{ranks} rank(s)")
    note = f"(best of {report.get('repeats', 1)} interleaved rounds)"
    header = (f"{'method':45s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>7s} {'a/this':>7s} "
              f"{'cpu-s':>7s} {'a/this cpu':>10s}")
    lines = [title, note]
    for scenario, results in report["scenarios"].items():
        lines += ["", f"scenario {scenario}", header]
        ours = results.get("a", {})
        for key in [k for k in NAMES if k in results]:
            r = results[key]
            if "error" in r:
                lines.append(f"{NAMES[key]:45s} error: {r['error'][:300]}")
                continue
            nan = float("nan")  # a/this when a did not run
            ratio = ours.get("tokens_per_second", nan) / r["tokens_per_second"]
            cpu_ratio = ours.get("tokens_per_cpu_second", nan) / r["tokens_per_cpu_second"]
            lines.append(f"{NAMES[key]:45s} {r['tokens']:7d} {r['seconds']:8.1f} "
                         f"{r['tokens_per_second']:7.1f} {ratio:6.2f}x {r['cpu_seconds']:7.1f} "
                         f"{cpu_ratio:9.2f}x")
        floor, both = results.get("floor", {}), results.get("floor+kv", {})
        if "x_vs_c" in floor and "x_vs_c" in both:
            lines.append(f"the weight matmuls alone run {floor['x_vs_c']:.2f}x c's rate "
                         f"({floor['x_vs_b']:.2f}x b's) at {floor['fraction_of_peak']:.2f} of "
                         f"the dense matmul peak; then reading the KV cache once: "
                         f"{both['x_vs_c']:.2f}x c's rate ({both['x_vs_b']:.2f}x b's)")
    return "\n".join(lines)
