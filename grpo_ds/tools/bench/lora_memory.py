"""The `lora` section of `grpo-ds bench memory`: the largest policy that completes two GRPO steps
with LoRA adapters and the reference as the adapter-free base, beside full fine-tuning.

    grpo-ds bench memory --sections lora [--lora-sizes 1.1B,2.1B,7B] [--lora-full-sizes 1.1B]
                         [--lora-preset zero3_lora_offload] [--probe-preset zero3_nvme] --json

Two groups of fresh 2-rank launches (memory_worker.py), each in size order and stopping at its
first failure (a larger size would fail too):
  lora_full  the same steps without LoRA (full fine-tuning, the probe preset, reference engine
             cpu_offload), the baseline every LoRA ratio is taken against, measured in this run
  lora       model.lora.rank = 8 on all-linear, the LoRA preset, beta > 0: the reference is the
             policy with its adapters off; "7B" is Llama-2-7B's shape (6.74B parameters)
Workload of both: 1 prompt per rank of 16 random tokens x G = 4, 16 new tokens, 2 steps, bf16,
beta = 0.04, generation on layer groups, activation checkpointing.
Before each launch it waits until the machine has the planned peak of both ranks plus
RESERVE_BYTES available (the machine is shared: the others keep that much).
The reference engines a run built are counted in the ranks after the steps (live DeepSpeed
engines besides the policy's), not assumed.
"""

from __future__ import annotations

import os
from dataclasses import replace

from grpo_ds.tools.bench.memory_worker import GIB, Run

LORA_RANK = 8
RESERVE_BYTES = 4 * GIB  # left to the machine's other users while a launch runs
SECTIONS = ("lora_full", "lora")  # report keys, in launch order


def lora_runs(args, base: Run) -> dict[str, dict[str, Run]]:
    """The launches of the lora section: full fine-tuning baseline first, then LoRA by size."""
    workload = replace(base, prompts_per_rank=1, prompt_len=16, gather="layers",
                       checkpointing=True, critic=False, beta=0.04, reference="cpu_offload")
    return {
        "lora_full": {s: replace(workload, preset=args.probe_preset, size=s)
                      for s in args.lora_full_sizes.split(",") if s},
        "lora": {s: replace(workload, preset=args.lora_preset, size=s, lora_rank=LORA_RANK)
                 for s in args.lora_sizes.split(",")}}


def planned_node_bytes(run: Run, world: int = 2) -> int:
    """The planner's peak RAM of all `world` ranks of `run` (CPU host: device memory is RAM)."""
    from grpo_ds.tools.bench.memory_worker import planned, run_config

    # the planner counts the allocator's kept heap unless glibc returns freed blocks (mmap),
    # as the ranks of this run will have it
    mmap = run.malloc == "mmap" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    if mmap:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        cfg, _, ds = run_config(run, world)
        return world * planned(run, cfg, ds, world)["grpo"]
    finally:
        if mmap:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")


def needed_free_bytes(run: Run) -> int:
    return planned_node_bytes(run) + RESERVE_BYTES


def _completed(results: dict) -> list[tuple[str, dict]]:
    return [(k, r) for k, r in results.items() if "measured_peak_bytes_per_rank" in r]


def lora_bars(report: dict) -> dict:
    """The lora section's bars: largest LoRA size completed, reference engines it built, the
    planner against each peak, LoRA over full fine-tuning where both ran at one size, and the
    largest LoRA run over the largest full fine-tuning run."""
    lora, full = _completed(report.get("lora", {})), _completed(report.get("lora_full", {}))
    ratios = [r["planned_over_measured"] for _, r in lora + full]
    largest = lora[-1] if lora else None
    shared = [k for k, _ in lora if k in dict(full)]
    fulls = dict(full)
    return {
        "lora_largest_completed": largest[0] if largest else None,
        "lora_largest_completed_params": largest[1]["params"] if largest else None,
        "lora_reference_engines": largest[1]["reference_engines"] if largest else None,
        "lora_causal_lms_per_rank": largest[1]["causal_lms"] if largest else None,
        "lora_at_least_6_5B": bool(largest) and largest[1]["params"] >= 6.5e9,
        "lora_planner_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "lora_planner_within_20pct": bool(ratios) and all(abs(x - 1) <= 0.2 for x in ratios),
        "full_largest_completed": full[-1][0] if full else None,
        "full_largest_completed_params": full[-1][1]["params"] if full else None,
        "full_reference_engines": full[-1][1]["reference_engines"] if full else None,
        "lora_over_full": {k: {
            "peak": max(r["measured_peak_bytes_per_rank"])
            / max(fulls[k]["measured_peak_bytes_per_rank"]),
            "seconds_per_step": r["seconds_per_step"] / fulls[k]["seconds_per_step"]}
            for k, r in lora if k in shared},
        "largest_lora_over_largest_full": _largest_over_largest(largest, full[-1] if full else None)}


def _largest_over_largest(lora: tuple | None, full: tuple | None) -> dict | None:
    """The largest LoRA run against the largest full fine-tuning run: how many times the
    parameters, in how many times the peak per rank (bytes per parameter: peak / params)."""
    if lora is None or full is None:
        return None
    (_, l), (_, f) = lora, full
    peak = max(l["measured_peak_bytes_per_rank"]) / max(f["measured_peak_bytes_per_rank"])
    params = l["params"] / f["params"]
    return {"params": params, "peak": peak, "bytes_per_param": peak / params,
            "seconds_per_step": l["seconds_per_step"] / f["seconds_per_step"]}
