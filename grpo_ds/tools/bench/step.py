"""Benchmark: one GRPO step, phase by phase: seconds, tokens/s, MFU and peak memory per rank.

    grpo-ds bench step [--json] [--ranks N] [--quick] [--dtype float32|bfloat16]
                       [--allocator auto|tcmalloc|system] [--fused-layers auto|on|off]
                       [--onednn-linears auto|on|off]
                       [--compare ranks=1,dtype=bfloat16,allocator=system,fused_layers=off,
                                  onednn_linears=off,...]
                       [--rounds K]

starts `deepspeed --num_gpus N --module grpo_ds.tools.bench.step --worker ...` (the ranks run
step_worker.py) and prints a table (or,
with --json, one JSON object on one line with `mfu_update` and `mfu_step` among its keys).

--compare runs other configurations in the same invocation, each a fresh launch differing from
the main one in one setting (ranks=1: the same workload on one rank with all the cores;
dtype=bfloat16; allocator=system: glibc's malloc instead of tcmalloc, see host_memory.py;
fused_layers=off: HF's decoder layers instead of grpo_ds/cpu/fused_layers.py's; onednn_linears=off:
float32 Linears on torch's default matmuls instead of grpo_ds/cpu/onednn_linear.py's oneDNN), in
interleaved rounds (--rounds, default 2; each configuration's fastest step is
kept), and reports their step times as ratios to the main configuration's: on a noisy machine a
ratio is only meaningful between runs minutes apart. The JSON then also has "compare".

Workload (fixed): a Llama-style model of 24.1M parameters built from a config (vocab 8192,
hidden 512, 6 layers, MLP 1024, 8 heads; random init, seed 0), 8 prompts of 128 random tokens
x G = 8 = 64 sequences of 256 tokens, each completion exactly 128 tokens (the tokenizer's EOS
id is outside the model's vocabulary, so nothing stops early), ZeRO-3 from ds_configs/zero3.json,
beta = 0.04 (the frozen reference runs, CPU-offloaded as in training), mu = 1, micro-batches of
32 sequences, float32 (the config's default; --dtype bfloat16 for the bf16 run).

It runs the trainer's own code, phase by phase, with a barrier around each phase (times are the
slowest rank's): `generate_and_score` (split into generation and rewards), `forward_logprobs` on
the reference, `score_advantages`, and `update` on the policy engine with its forward, backward
and step timed. Old log-probs cost 0 s by design: with mu = 1 there are none, and with mu > 1
they are the detached log-probs of the update's first pass (see trainer.py), not another forward.
Two untimed warm-up steps come first (ZeRO-3 records its parameter order in the first, kernels
get picked; and in every launch we logged, the update forward of the step after that first one
still ran 0.4-0.7 s slower than in all later steps); the timed numbers are the mean over the
following steps: the steady state of a long run. FLOPs and the peak: see mfu.py.
MFU = model FLOPs / (wall seconds x the summed per-rank peaks); a second, CPU-time MFU
(FLOPs over the ranks' busy CPU seconds) shows what the code reaches when no other process
competes for the cores. The report also times one all-gather and one reduce-scatter of all
parameters, the units of ZeRO-3's traffic per step (README: "Communication per step").
"""

from __future__ import annotations

import argparse
import json
import sys

from grpo_ds.config import FUSED_LAYER_CHOICES, ONEDNN_LINEAR_CHOICES
from grpo_ds.cpu.host_memory import HOST_ALLOCATORS
from grpo_ds.tools.bench.common import launch_workers
from grpo_ds.tools.bench.step_worker import ROWS


def format_table(r: dict) -> str:
    w = r["workload"]
    seqs = w["prompts"] * w["group_size"]
    peaks = " + ".join(f"{p / 1e9:.1f}" for p in r["peak_flops_per_rank"])
    lines = [
        (f"GRPO step benchmark: {seqs} sequences ({w['prompts']} prompts x G={w['group_size']}) "
         f"of {w['prompt_len']}+{w['new_tokens']} tokens, {r['params_millions']}M-param Llama, "
         f"{r['dtype']}, ZeRO-3, {r['ranks']} rank(s) x {r['threads_per_rank']} thread(s), "
         f"{r['host_allocator']} malloc, {'fused' if r['fused_layers'] else 'HF'} layers, "
         f"{'oneDNN' if r['onednn_linears'] else 'default'} matmuls, "
         f"mu={r['mu']}, micro-batch {w['micro_batch']}"),
        (f"peak (square matmul, all ranks at once): {peaks} = "
         f"{r['peak_flops_aggregate'] / 1e9:.1f} GFLOP/s"),
        "", f"{'phase':24s} {'seconds':>8s} {'tokens/s':>10s} {'GFLOP':>9s} {'MFU':>6s}"]
    for key in ROWS:
        p = r["phases"][key]
        mfu = f"{p['mfu']:6.2f}" if p["flops"] else f"{'-':>6s}"
        note = "  (none: mu=1; mu>1 reuses the first pass)" if key == "old_logprobs" else ""
        lines.append(f"{key:24s} {p['seconds']:8.2f} {p['tokens_per_second']:10.0f} "
                     f"{p['flops'] / 1e9:9.1f} {mfu}{note}")
    memory = ", ".join(f"{b / 2**30:.2f}" for b in r["peak_memory_bytes_per_rank"])
    load = ", ".join(f"{x:.2f}" for x in r["load_average"])
    cpu = ", ".join(f"{k} {v:.2f} s (MFU {r['mfu_cpu'].get(k, 0):.2f})"
                    for k, v in r["cpu_seconds_per_rank"].items())
    reserved = [b for b in r.get("peak_reserved_bytes_per_rank", []) if b is not None]
    if reserved:  # a GPU: the line above is the peak allocation
        memory += " allocated; reserved " + ", ".join(f"{b / 2**30:.2f}" for b in reserved)
    lines += ["", f"peak memory per rank (GiB): {memory}",
              (f"mfu_update {r['mfu_update']:.3f}   mfu_step {r['mfu_step']:.3f}   "
               f"(load average {load})"),
              f"busy CPU seconds per rank (MFU without competing processes): {cpu}"]
    if "compare" in r:
        header = (f"{'configuration':22s} {'ranks x threads':>15s} {'malloc':>8s} "
                  f"{'layers':>6s} {'matmul':>7s} {'step s':>7s} "
                  f"{'update s':>8s} {'mfu_update':>10s} {'mfu_step':>8s} {'step / main':>11s} "
                  f"{'peak GiB':>8s}")
        lines += ["", "same invocation, interleaved rounds, fastest step of each:", header]
        for name, c in r["compare"].items():
            lines.append(f"{name:22s} {c['ranks']:>9d} x {c['threads_per_rank']:<3d} "
                         f"{c['host_allocator']:>8s} {'fused' if c['fused_layers'] else 'HF':>6s} "
                         f"{'oneDNN' if c['onednn_linears'] else 'default':>7s} "
                         f"{c['step_seconds']:7.2f} {c['update_seconds']:8.2f} "
                         f"{c['mfu_update']:10.3f} {c['mfu_step']:8.3f} "
                         f"{c['step_seconds_over_main']:11.2f} {c['peak_memory_gib']:8.2f}")
    comm = r["communication"]
    if comm:
        lines.append(f"ZeRO-3 traffic: all-gather of all params {comm['all_gather']:.3f} s, "
                     f"reduce-scatter {comm['reduce_scatter']:.3f} s; per step "
                     f"{comm['all_gathers_per_step']} + {comm['reduce_scatters_per_step']} of "
                     f"them ~ {comm['estimated_seconds_per_step']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny workload (for tests)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mu", type=int, default=1, help="grpo.num_iterations (default 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per rank (default: cores / local ranks)")
    parser.add_argument("--micro", type=int, default=0, help="micro-batch size (default 32)")
    parser.add_argument("--chunk", type=int, default=0, help="log-prob chunk size (default: config)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 2)")
    parser.add_argument("--profile", default="",
                        help="after the timed steps, profile one more; op tables to PROFILE.rankN, "
                             "Chrome traces to PROFILE.rankN.trace.json")
    parser.add_argument("--allocator", default="auto", choices=HOST_ALLOCATORS,
                        help="the ranks' host allocator, as deepspeed.host_allocator (default auto)")
    parser.add_argument("--fused-layers", default="auto", choices=FUSED_LAYER_CHOICES,
                        help="model.fused_layers (default auto: fused for this Llama)")
    parser.add_argument("--onednn-linears", default="auto", choices=ONEDNN_LINEAR_CHOICES,
                        help="model.onednn_linears (default auto: oneDNN in float32 on CPU)")
    parser.add_argument("--compare", default="",
                        help="other configurations in the same run: ranks=N,dtype=NAME,"
                             "allocator=NAME,fused_layers=NAME,onednn_linears=NAME,...")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds when comparing; each one's fastest step is kept")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before giving up")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from grpo_ds.engine import finish_rank  # not at the top: --json's parent stays quiet
        from grpo_ds.tools.bench.step_worker import worker

        worker(args)
        finish_rank(0)
    configs = {"main": {"ranks": args.ranks, "dtype": args.dtype, "allocator": args.allocator,
                        "fused_layers": args.fused_layers, "onednn_linears": args.onednn_linears}}
    for item in filter(None, args.compare.split(",")):
        key, _, value = item.partition("=")
        if key not in configs["main"] or not value:
            parser.error(f"--compare takes ranks=N, dtype=NAME, allocator=NAME, fused_layers=NAME "
                         f"or onednn_linears=NAME items, got {item!r}")
        configs[item] = {**configs["main"], key: int(value) if key == "ranks" else value}
    best = {}
    for _ in range(args.rounds if len(configs) > 1 else 1):
        for name, config in configs.items():
            report = launch_config(args, **config)
            if name not in best or report["step_seconds"] < best[name]["step_seconds"]:
                best[name] = report
    report = best["main"]
    if len(configs) > 1:
        report["compare"] = {name: comparison(r, report) for name, r in best.items()}
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def launch_config(args, ranks: int, dtype: str, allocator: str, fused_layers: str,
                  onednn_linears: str) -> dict:
    passed = [f"--{k}={v}" for k, v in (("dtype", dtype), ("fused-layers", fused_layers),
                                        ("onednn-linears", onednn_linears),
                                        ("mu", args.mu),
                                        ("threads", args.threads), ("micro", args.micro),
                                        ("chunk", args.chunk), ("steps", args.steps),
                                        ("profile", args.profile))]
    return launch_workers("grpo_ds.tools.bench.step", ranks,
                          passed + (["--quick"] if args.quick else []), args.timeout, allocator)


def comparison(r: dict, main: dict) -> dict:
    """One configuration's step against the main one's, measured in the same invocation."""
    return {"ranks": r["ranks"], "dtype": r["dtype"], "threads_per_rank": r["threads_per_rank"],
            "host_allocator": r["host_allocator"], "fused_layers": r["fused_layers"],
            "onednn_linears": r["onednn_linears"],
            "step_seconds": r["step_seconds"], "update_seconds": r["phases"]["update"]["seconds"],
            "peak_memory_gib": max(r["peak_memory_bytes_per_rank"]) / 2**30,
            "mfu_update": r["mfu_update"], "mfu_step": r["mfu_step"],
            "step_seconds_over_main": r["step_seconds"] / main["step_seconds"],
            "update_seconds_over_main": (r["phases"]["update"]["seconds"]
                                         / main["phases"]["update"]["seconds"])}


if __name__ == "__main__":
    sys.exit(main())
