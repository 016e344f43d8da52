"""The step benchmark: FLOP formulas by hand, and `grpo-ds bench step --quick --json` on 2 ranks."""

import json
import subprocess
import sys

import pytest

from grpo_ds.tools.bench.mfu import ModelShape, forward_flops, generation_flops, train_flops
from grpo_ds.tools.bench.step_worker import Workload, build_lm, phase_flops


def test_flop_formulas_by_hand():
    shape = ModelShape(layers=2, hidden=4, mlp=8, vocab=10, heads=2, kv_heads=1)
    # per layer: q, o 4x4 = 16 each; k, v 4x2 = 8 each; gate, up, down 4x8 = 32 each -> 144
    assert shape.body == 2 * 144 and shape.head == 40
    # T = 3 tokens, 2 scored: 2*288*3 + 2*40*2 + 2*L*T^2*d = 1728 + 160 + 2*2*9*4 = 2032
    assert forward_flops(shape, seq_len=3, scored=2) == 2032
    assert train_flops(shape, seq_len=3, scored=2) == 3 * 2032
    # prefill of 2 tokens: 2*288*2 + 2*2*2^2*4 = 1152 + 64 = 1216, once per prompt;
    # per sample of 3 new tokens: head 2*40*3 = 240, body for the 2 fed-back tokens
    # 2*288*2 = 1152, attention over contexts 3 and 4: 4*L*d*(3+4) = 4*2*4*7 = 224 -> 1616
    assert generation_flops(shape, prompt_len=2, new_tokens=3, group=2) == 1216 + 2 * 1616


def test_flop_parameters_match_the_model():
    w = Workload()
    flops = phase_flops(w, mu=1)
    lm = build_lm(w)
    embedding, norms = w.vocab * w.hidden, (2 * w.layers + 1) * w.hidden
    # body + head are exactly the matmul weights; the rest is the embedding lookup and norms
    assert flops["body_params"] + flops["head_params"] + embedding + norms == sum(
        p.numel() for p in lm.parameters())
    assert flops["update"] == 3 * flops["reference"] == 3 * flops["update/forward"]


@pytest.mark.multirank
def test_bench_step_quick_prints_one_json_line():
    proc = subprocess.run([sys.executable, "-m", "grpo_ds.cli", "bench", "step", "--quick",
                           "--json", "--ranks", "2", "--timeout", "400",
                           "--compare", "ranks=1", "--rounds", "1"],
                          capture_output=True, text=True, timeout=450, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    report = json.loads(lines[0])
    assert report["ranks"] == 2 and report["threads_per_rank"] >= 1
    phases = report["phases"]
    for name in ("generation", "rewards", "reference", "update", "update/forward",
                 "update/backward", "update/optimizer_step", "step"):
        assert phases[name]["seconds"] > 0, name
    assert phases["old_logprobs"]["seconds"] == 0  # mu = 1: there are none, by design
    for key in ("mfu_update", "mfu_step"):
        assert 0 < report[key] < 1, key
    assert len(report["peak_flops_per_rank"]) == 2 and report["peak_flops_aggregate"] > 0
    assert len(report["peak_memory_bytes_per_rank"]) == 2
    assert all(b > 0 for b in report["peak_memory_bytes_per_rank"])
    # the same workload on one rank, launched by the same invocation, as a ratio to the main run
    compare = report["compare"]
    assert compare["main"]["ranks"] == 2 and compare["main"]["step_seconds_over_main"] == 1.0
    one = compare["ranks=1"]
    assert one["ranks"] == 1 and one["step_seconds"] > 0
    assert one["step_seconds_over_main"] == pytest.approx(one["step_seconds"]
                                                          / report["step_seconds"])


def test_matmul_peak_is_the_fastest_kernel_and_size():
    import torch

    from grpo_ds.tools.bench.mfu import matmul_peak, peak_kernels

    peak = matmul_peak(torch.float32, seconds_per_size=0.01, sizes=(32, 64))
    kernels = peak_kernels(torch.float32)
    assert set(peak["by_size"]) == {f"{k}/{n}" for k in kernels for n in (32, 64)}
    assert peak["flops"] == max(peak["by_size"].values()) > 0
