"""The lora section of `grpo-ds bench memory`: its launches and its bars, on hand-made results
(no ranks start here; the section itself is run by hand, see the README's LoRA table)."""

import argparse

import pytest

from grpo_ds.tools.bench import lora_memory, memory
from grpo_ds.tools.bench.memory_worker import GIB, SIZES, Run


def _result(params, peaks, plan, seconds, engines):
    return {"params": params, "measured_peak_bytes_per_rank": peaks,
            "planned_over_measured": plan / max(peaks), "seconds_per_step": seconds,
            "reference_engines": engines, "causal_lms": 1 + engines}


def test_seven_b_is_llama_2_7b_shape():
    assert SIZES["7B"] == (32000, 4096, 32, 11008, 32, 32)


def test_lora_runs_full_baseline_first_then_lora_by_size():
    args = argparse.Namespace(probe_preset="zero3_nvme", lora_preset="zero3_lora_offload",
                              lora_sizes="1.1B,7B", lora_full_sizes="1.1B")
    runs = lora_memory.lora_runs(args, Run(nvme_path="/swap"))
    assert list(runs) == ["lora_full", "lora"]
    full, lora = runs["lora_full"]["1.1B"], runs["lora"]["7B"]
    assert (full.lora_rank, full.preset, lora.lora_rank, lora.preset) == (
        0, "zero3_nvme", 8, "zero3_lora_offload")
    for run in (full, lora):  # the workload: G >= 4, beta > 0, two steps
        assert run.group_size >= 4 and run.beta > 0 and run.steps == 2 and not run.critic
        assert run.gather == "layers" and run.nvme_path == "/swap"
    assert list(runs["lora"]) == ["1.1B", "7B"]


def test_lora_bars_from_measured_results():
    report = {
        "lora_full": {"1.1B": _result(1.1e9, [10 * GIB, 9 * GIB], 9 * GIB, 100.0, 1)},
        "lora": {"1.1B": _result(1.1e9, [4 * GIB, 5 * GIB], 5.5 * GIB, 50.0, 0),
                 "7B": _result(6.74e9, [8 * GIB, 8 * GIB], 8 * GIB, 400.0, 0),
                 "13B": {"error": "out of memory"}}}
    bars = lora_memory.lora_bars(report)
    assert bars["lora_largest_completed"] == "7B"  # the failed 13B does not count
    assert bars["lora_largest_completed_params"] == 6.74e9 and bars["lora_at_least_6_5B"]
    assert bars["lora_reference_engines"] == 0 and bars["full_reference_engines"] == 1
    assert bars["lora_planner_ratio_range"] == pytest.approx([0.9, 1.1])
    assert bars["lora_planner_within_20pct"]
    assert bars["lora_over_full"] == {"1.1B": pytest.approx({"peak": 0.5,
                                                             "seconds_per_step": 0.5})}
    # 7B over 1.1B: 6.74e9 / 1.1e9 = 6.127x the parameters in 8 / 10 = 0.8x the peak per rank,
    # so 0.8 / 6.127 = 0.1306x the bytes per parameter, in 400 / 100 = 4x the step time
    assert bars["largest_lora_over_largest_full"] == pytest.approx(
        {"params": 6.127, "peak": 0.8, "bytes_per_param": 0.1306, "seconds_per_step": 4.0},
        rel=1e-3)
    assert memory.bars(report)["lora_largest_completed"] == "7B"  # wired into the bench's bars


def test_lora_bars_when_nothing_completed():
    bars = lora_memory.lora_bars({"lora": {"7B": {"error": "killed"}}})
    assert bars["lora_largest_completed"] is None and not bars["lora_at_least_6_5B"]
    assert bars["lora_reference_engines"] is None and not bars["lora_planner_within_20pct"]
    assert bars["lora_over_full"] == {} and bars["largest_lora_over_largest_full"] is None
