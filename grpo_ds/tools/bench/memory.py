"""Benchmark: measured peak memory per rank of real GRPO steps, beside the planner's figure.

    grpo-ds bench memory [--json] [--quick] [--sections presets,placement,activations,logprobs,knobs]
                         [--presets zero3,...] [--sizes 25M,300M] [--lean-sizes 300M,570M]
                         [--no-critic]
                         [--probe 1.1B,2.1B,...] [--probe-preset zero3_nvme] [--nvme-path DIR]
                         [--lora-sizes 1.1B,2.1B,7B] [--lora-full-sizes 1.1B]

Every measurement is a fresh 2-rank launch of grpo_ds/tools/bench/memory_worker.py (how a rank builds
the engines, runs the trainer's functions and reads its peak RSS is described there), so each
peak belongs to one configuration. On a CPU-only machine device memory IS host RAM, so the
planner's figure beside the measured one is its `ram_per_rank` (device + host); on GPUs its
`device_per_rank` against max_memory_allocated.

Workload (fixed): 2 prompts per rank of 32 random tokens x G = 4, exactly 16 new tokens each (EOS
is outside the vocabulary), micro-batches of 4, 2 steps, bfloat16, beta = 0.04 (reference
cpu_offload), full gather for generation, log-prob chunk 4096, the host allocator training
would use (tcmalloc on CPU when installed; --malloc mmap: glibc with MALLOC_MMAP_THRESHOLD_).
Models: Llama-style from a config, random init (memory_worker.SIZES). Sections:
  presets      each ds_configs preset x model size: planned vs measured, GRPO vs with critic
  placement    reference cpu_offload / sharded / none: the RSS the reference adds per rank
  activations  25M model, 8 sequences of 512 tokens, float32, one step, MALLOC_MMAP_THRESHOLD_
               so that RSS follows the working set: gradient checkpointing on/off and
               micro-batches of 8 vs 2 (same samples, so loss and grad norm agree)
  logprobs     one process: peak of log-probs + entropy over a 128k vocabulary, naive full
               logits vs chunked, against chunk x vocab x 4 bytes
  knobs        300M model, zero3: one ZeRO / trainer / allocator knob changed at a time
  lean         (--sections lean) GRPO vs with critic at memory-first settings: zero3_lean.json
               (small buckets, gathered parameters released after each module) and generation
               on layer groups, for --lean-sizes
  probe        (--probe) the largest policy completing 2 GRPO steps (G = 4, 16 new tokens,
               beta > 0): sizes in order, stopping at the first failure; waits for 18 GiB of
               free RAM before each size
  lora         (--sections lora) the same probe with LoRA adapters and no reference engine, up to
               Llama-2-7B's shape, beside full fine-tuning measured in the same run
               (grpo_ds/tools/bench/lora_memory.py)
A rank exits when the machine's MemAvailable falls under 1 GiB (rather than letting the OOM killer
pick a process, possibly someone else's); that run is reported with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace

from grpo_ds.tools.bench import lora_memory
from grpo_ds.tools.bench.common import available_ram, launch_workers
from grpo_ds.tools.bench.memory_worker import GIB, Run

PRESETS = ("zero3", "zero3_lean", "zero3_offload_optimizer", "zero3_offload_all", "zero3_nvme")
# glibc returns every freed block of 64 KiB or more to the OS: RSS then follows live memory
MALLOC_FOLLOWS_LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536"}
PROBE_FREE_BYTES = 18 * GIB  # free RAM to wait for before a probe size
STEP_PHASES = ("generation", "reference", "critic_values", "update", "critic_update")


def section_runs(args) -> dict[str, dict[str, Run]]:
    """The launches of each requested section, by section and name."""
    base = Run(critic=not args.no_critic, nvme_path=args.nvme_path, malloc=args.malloc)
    if args.quick:
        return {"presets": {f"{p}/tiny": replace(base, preset=p, size="tiny", steps=1)
                            for p in (args.presets or "zero3").split(",")}}
    runs, sizes, sections = {}, args.sizes.split(","), args.sections.split(",")
    if "presets" in sections:
        runs["presets"] = {f"{p}/{s}": replace(base, preset=p, size=s)
                           for p in (args.presets or ",".join(PRESETS)).split(",") for s in sizes}
    if "placement" in sections:
        runs["placement"] = {f"{where}/{s}": replace(base, size=s, critic=False, reference=where,
                                                     beta=0.0 if where == "none" else base.beta)
                             for s in sizes for where in ("cpu_offload", "sharded", "none")}
    if "activations" in sections:
        # RSS follows the working set only when freed blocks go back to the OS (mmap): with
        # glibc's default heap the first update's peak is inflated by fragmentation.
        long = replace(base, size="25M", dtype="float32", prompt_len=496, micro_batch=8, steps=1,
                       critic=False, malloc="mmap")
        runs["activations"] = {"micro8": long,
                               "micro8+checkpointing": replace(long, checkpointing=True),
                               "micro2": replace(long, micro_batch=2)}
    if "knobs" in sections:
        k = replace(base, size="300M", critic=False)
        runs["knobs"] = {
            "baseline (zero3)": k,
            "stage3_max_reuse_distance=0": replace(k, zero={"stage3_max_reuse_distance": 0}),
            "stage3_prefetch_bucket_size=0": replace(k, zero={"stage3_prefetch_bucket_size": 0}),
            "stage3_max_live_parameters=1e7": replace(k, zero={"stage3_max_live_parameters": 10**7}),
            "sub_group_size=1e7": replace(k, zero={"sub_group_size": 10**7}),
            "gradient_checkpointing": replace(k, checkpointing=True),
            "gather=layers": replace(k, gather="layers"),
            "logprob_chunk=256": replace(k, chunk=256)}
        if k.malloc != "mmap":  # with --malloc mmap every run already has it
            runs["knobs"]["MALLOC_MMAP_THRESHOLD_=65536"] = replace(k, malloc="mmap")
    if "lean" in sections:
        runs["lean"] = {f"zero3_lean+gather=layers/{s}": replace(base, preset="zero3_lean", size=s,
                                                                 gather="layers")
                        for s in args.lean_sizes.split(",")}
    if "lora" in sections:
        runs.update(lora_memory.lora_runs(args, base))
    if args.probe:
        runs["probe"] = {s: replace(base, preset=args.probe_preset, size=s, prompts_per_rank=1,
                                    prompt_len=16, gather="layers", checkpointing=True,
                                    critic=False) for s in args.probe.split(",")}
    return runs


def step_seconds(ranks: list, key: str, steps: int) -> float:
    """Mean seconds of a step's phases, the slowest rank's (engine builds left out)."""
    return max(sum(v for k, v in r[key].items() if k in STEP_PHASES) for r in ranks) / steps


def summarise(report: dict) -> dict:
    """Per-rank peaks, the planner's figure beside the largest, per-phase maxima and seconds."""
    ranks, plan, steps = report["ranks"], report["planned"], report["run"]["steps"]
    measured = [r["grpo_peak"] for r in ranks]
    out = {"params": plan["params"], "planned_peak_bytes_per_rank": plan["grpo"],
           "measured_peak_bytes_per_rank": measured,
           "planned_over_measured": plan["grpo"] / max(measured),
           "phases": {k: max(r["grpo_phases"].get(k, 0) for r in ranks)
                      for k in ranks[0]["grpo_phases"]},
           "seconds_per_step": step_seconds(ranks, "grpo_seconds", steps),
           "reference_rss": [r["reference_rss"] for r in ranks], "steps": ranks[0]["steps"],
           "planner_fits": plan["fits"], "timeline_rank0": ranks[0]["timeline"],
           "reference_engines": max(r["reference_engines"] for r in ranks),
           "causal_lms": max(r["causal_lms"] for r in ranks)}
    if "critic_peak" in ranks[0]:
        critic = [r["critic_peak"] for r in ranks]
        out["critic"] = {"params": ranks[0]["critic_params"],
                         "planned_peak_bytes_per_rank": plan["with_critic"],
                         "measured_peak_bytes_per_rank": critic,
                         "planned_over_measured": plan["with_critic"] / max(critic),
                         "grpo_over_with_critic": max(measured) / max(critic),
                         "seconds_per_step": step_seconds(ranks, "critic_seconds", steps)}
    return out


def launch(run: Run, timeout: float) -> dict:
    # glibc reads MALLOC_MMAP_THRESHOLD_ at start: every block >= 64 KiB is then its own mapping,
    # returned to the OS when freed (and paid for in page faults when allocated)
    mmap = MALLOC_FOLLOWS_LIVE_MEMORY if run.malloc == "mmap" else {}
    saved = {k: os.environ.get(k) for k in mmap}
    os.environ.update(mmap)
    try:
        report = launch_workers("grpo_ds.tools.bench.memory_worker", 2,
                                ["--run", json.dumps(asdict(run))], timeout)
        return {"run": asdict(run), **summarise(report)}
    except RuntimeError as err:  # a failed or stopped run is a result too (the probe's answer)
        return {"run": asdict(run), "error": str(err)[-3000:]}
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})


def nvme_problem() -> str | None:
    """Why DeepSpeed's async_io op (ZeRO-Infinity's NVMe swapping) cannot build here, or None.

    Where it can, it is built here, in this process and without the launches' timeout: its first
    JIT build took about 7 minutes on a 2-core Zen3. Built inside the ranks it counted against
    their timeout, and a build killed with them leaves torch's build lock behind, on which every
    later build of the op waits forever.
    """
    from deepspeed.ops.op_builder import AsyncIOBuilder

    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        return ("needs libaio (Debian/Ubuntu: apt-get install -y libaio-dev) for DeepSpeed's "
                "async_io op")
    print("[bench] loading DeepSpeed's async_io op (its first build takes minutes)",
          file=sys.stderr, flush=True)
    builder.load(verbose=False)
    return None


def wait_for_ram(needed: int, patience: float = 1200.0) -> bool:
    """Wait (up to `patience` seconds) until the machine has `needed` bytes available."""
    deadline = time.time() + patience
    while available_ram() < needed:
        if time.time() > deadline:
            return False
        print(f"[bench] waiting for {needed / GIB:.0f} GiB free RAM "
              f"({available_ram() / GIB:.1f} GiB now)", file=sys.stderr, flush=True)
        time.sleep(60)
    return True


def run_section(name: str, runs: dict[str, Run], timeout: float) -> dict:
    results, aio = {}, None
    for key, run in runs.items():
        print(f"[bench] {name}: {key}", file=sys.stderr, flush=True)
        nvme = "nvme" in json.dumps(run.zero) or run.preset == "zero3_nvme"
        if nvme and (aio := aio or nvme_problem() or "ok") != "ok":
            results[key] = {"run": asdict(run), "skipped": aio}
            continue
        probing = name in ("probe", *lora_memory.SECTIONS)
        needed = (lora_memory.needed_free_bytes(run) if name in lora_memory.SECTIONS
                  else PROBE_FREE_BYTES)
        if probing and not wait_for_ram(needed):
            results[key] = {"run": asdict(run), "skipped": "not enough free RAM to start"}
            break
        results[key] = launch(run, timeout)
        if probing and "error" in results[key]:
            break  # larger sizes would fail too
    return results


def logprob_section(timeout: float) -> dict:
    """512 and 1024 positions over Llama-3's vocabulary (128,256), chunks of 128 and 512.

    Measured with MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows the working set (with glibc's
    default, freed blocks stay resident and later ones reuse them, which hides the growth).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logprobs.json")
        cmd = [sys.executable, "-m", "grpo_ds.tools.bench.memory_worker", "--logprob-worker",
               "--out", out, "--logprob-shape", "512+1024,128256,256", "--chunks", "128,512"]
        env = {**os.environ, **MALLOC_FOLLOWS_LIVE_MEMORY}
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL, env=env)
        with open(out) as f:
            return json.load(f)


def same(a: float, b: float, rel: float = 1e-4, atol: float = 1e-6) -> bool:
    """Equal up to float summation order (the loss is ~0 with mu = 1: absolute for it)."""
    return abs(a - b) <= atol + rel * max(abs(a), abs(b))


def bars(report: dict) -> dict:
    """Issue 9's measured bars as numbers and pass/fail."""
    done = [r for r in report.get("presets", {}).values() if "measured_peak_bytes_per_rank" in r]
    ratios = [r["planned_over_measured"] for r in done]
    # GRPO's claim is measured where model states dominate: memory-first settings, the largest
    # size whose with-critic step still fits (the last lean run that has one)
    critic = {k: r["critic"]["grpo_over_with_critic"] for section in ("presets", "lean")
              for k, r in report.get(section, {}).items() if "grpo_over_with_critic" in
              r.get("critic", {})}
    lean = [k for k in report.get("lean", {}) if k in critic]
    probe = [(k, r["params"]) for k, r in report.get("probe", {}).items() if "params" in r]
    out = {"planner_ratio_range": [min(ratios), max(ratios)] if ratios else None,
           "planner_within_20pct": bool(ratios) and all(abs(x - 1) <= 0.2 for x in ratios),
           "grpo_over_with_critic": critic,
           "grpo_at_most_60pct_of_critic": {lean[-1]: critic[lean[-1]] <= 0.6} if lean else None,
           "largest_completed": probe[-1][0] if probe else None,
           "largest_completed_params": probe[-1][1] if probe else None}
    if any(k in report for k in lora_memory.SECTIONS):
        out.update(lora_memory.lora_bars(report))
    act = {k: r["steps"][0] for k, r in report.get("activations", {}).items() if "steps" in r}
    if len(act) == 3:  # the same samples: checkpointing and micro-batching change no number
        base = act["micro8"]
        out["checkpointing_same_loss_and_grad_norm"] = all(
            same(base[m], act["micro8+checkpointing"][m]) for m in ("loss", "grad_norm"))
        out["micro_batching_same_loss_and_grad_norm"] = all(
            same(base[m], act["micro2"][m]) for m in ("loss", "grad_norm"))
    return out


def _g(nbytes) -> str:
    return f"{nbytes / GIB:6.2f}"


def format_table(report: dict) -> str:
    machine = report["machine"]
    lines = [(f"memory benchmark: 2 ranks, peak RSS per rank in GiB; "
              f"{machine['ram_bytes'] / GIB:.1f} GiB RAM, {machine['cpus']} CPUs")]
    for section, results in report.items():
        if section in ("machine", "bars", "logprobs"):
            continue
        header = (f"{'run':32s} {'params':>7s} {'plan':>6s} {'rank0':>6s} {'rank1':>6s} "
                  f"{'plan/m':>6s} {'s/step':>6s} | with critic: {'plan':>6s} {'rank0':>6s} "
                  f"{'rank1':>6s} {'GRPO/c':>6s} {'s/step':>6s}")
        lines += ["", f"[{section}]", header]
        for key, r in results.items():
            if "measured_peak_bytes_per_rank" not in r:
                why = r.get("skipped") or r.get("error", "").strip().splitlines()[-1:]
                lines.append(f"{key:32s} not measured: {why}")
                continue
            m = r["measured_peak_bytes_per_rank"]
            row = (f"{key:32s} {r['params'] / 1e6:6.0f}M {_g(r['planned_peak_bytes_per_rank'])} "
                   f"{_g(m[0])} {_g(m[1])} {r['planned_over_measured']:6.2f} "
                   f"{r['seconds_per_step']:6.1f}")
            if "critic" in r:
                c, cm = r["critic"], r["critic"]["measured_peak_bytes_per_rank"]
                row += (f" | {'':13s}{_g(c['planned_peak_bytes_per_rank'])} {_g(cm[0])} "
                        f"{_g(cm[1])} {c['grpo_over_with_critic']:6.2f} {c['seconds_per_step']:6.1f}")
            lines.append(row + f"   loss {r['steps'][0]['loss']:+.6f} grad norm "
                         f"{r['steps'][0]['grad_norm']:.6f} ref engines {r['reference_engines']}")
    if "logprobs" in report:
        lp = report["logprobs"]
        title = (f"[logprobs] vocab {lp['vocab']}, bf16: peak extra GiB (and its ratio to "
                 "chunk x vocab x 4 B)")
        header = (f"{'rows':>6s} {'chunk':>6s} {'forward':>15s} {'fwd+bwd':>15s} "
                  f"{'fwd+bwd+entropy':>16s}")
        lines += ["", title, header]
        for rows, variants in lp["rows"].items():
            for name, v in variants.items():
                cells = [f"{_g(v[m]['peak_extra_bytes'])} ({v[m]['over_chunk_x_vocab_x_4']:5.2f})"
                         for m in ("forward", "backward", "backward_entropy")]
                lines.append(f"{rows:>6s} {name:>6s} " + " ".join(f"{c:>15s}" for c in cells))
    lines += ["", "bars: " + json.dumps(report["bars"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-ds bench memory",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    parser.add_argument("--quick", action="store_true", help="tiny model, one step (tests)")
    parser.add_argument("--sections", default="presets,placement,activations,logprobs,knobs")
    parser.add_argument("--presets", help=f"default: {','.join(PRESETS)} (--quick: zero3)")
    parser.add_argument("--sizes", default="25M,300M")
    parser.add_argument("--lean-sizes", default="300M,570M", help="model sizes of the lean section")
    parser.add_argument("--no-critic", action="store_true", help="skip the with-critic steps")
    parser.add_argument("--probe", default="", help="sizes to probe in order, e.g. 1.1B,2.1B,3.0B")
    parser.add_argument("--probe-preset", default="zero3_nvme")
    parser.add_argument("--lora-sizes", default="1.1B,2.1B,7B",
                        help="model sizes of the lora section, in order (7B: Llama-2-7B's shape)")
    parser.add_argument("--lora-full-sizes", default="1.1B",
                        help="sizes of the lora section's full fine-tuning baseline ('' for none)")
    parser.add_argument("--lora-preset", default="zero3_lora_offload")
    parser.add_argument("--nvme-path", default="", help="swap folder (default: a temp dir)")
    parser.add_argument("--malloc", default="default", choices=["default", "mmap"],
                        help="default: the allocator training uses (tcmalloc when installed); "
                             "mmap: glibc, MALLOC_MMAP_THRESHOLD_=65536, RSS follows live memory")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per launch")
    args = parser.parse_args(argv)
    # DeepSpeed logs to stdout (e.g. "Setting accelerator to CPU"); keep stdout for the report.
    with contextlib.redirect_stdout(sys.stderr), \
            tempfile.TemporaryDirectory(prefix="grpo_ds_nvme_") as swap:
        args.nvme_path = args.nvme_path or swap
        report = {"machine": {"ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                              "cpus": os.cpu_count()}}
        for name, runs in section_runs(args).items():
            report[name] = run_section(name, runs, args.timeout)
        if "logprobs" in args.sections.split(",") and not args.quick:
            report["logprobs"] = logprob_section(args.timeout)
    report["bars"] = bars(report)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
