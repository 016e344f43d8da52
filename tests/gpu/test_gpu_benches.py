"""The benchmarks on one GPU: the GRPO step with its MFU against the GPU's bf16 matmul peak, and
generation (ours against Hugging Face `generate`). Their JSON reports go to gpu_results.json."""

import json

import pytest

from tests.gpu.check import MODE, SKIP_REASON, cli, record, run

if MODE is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

# A CPU's bf16 matmul peak is well under this; an H100's or H200's is about 8e14 FLOP/s.
GPU_PEAK_FLOOR = 1e14
QUICK = [] if MODE == "cuda" else ["--quick"]  # the full workloads take many minutes on a CPU


def report_of(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_step_bench_mfu_against_the_gpu_bf16_peak():
    proc = run(cli("bench", "step", "--json", "--ranks", "1", "--dtype", "bfloat16",
                   "--timeout", "240", *QUICK), timeout=270)
    report = report_of(proc)
    record("bench_step", report)
    for phase in ("generation", "reference", "update", "step"):
        assert report["phases"][phase]["seconds"] > 0, phase
    assert report["ranks"] == 1 and report["dtype"] == "bfloat16"
    if MODE == "cuda":
        # MFU is against the GPU's own bf16 peak, measured in the same run, not a CPU's
        assert report["peak_flops_per_rank"][0] > GPU_PEAK_FLOOR, report["peak_flops_per_rank"]
    for key in ("mfu_update", "mfu_step"):
        assert 0 < report[key] < 1, (key, report[key])


def test_generation_bench_against_hf_generate():
    # a: ours; b: HF generate on gathered weights; c: HF generate on sharded weights. d compiles
    # DeepSpeed's CUDA inference kernels first (minutes); the ceiling times CPU kernels.
    proc = run(cli("bench", "generation", "--json", "--ranks", "1", "--dtype", "bfloat16",
                   "--repeats", "1", "--methods", "a,b,c", "--timeout", "240", *QUICK),
               timeout=270)
    report = report_of(proc)
    record("bench_generation", report)
    w = report["workload"]
    expected = w["prompts_per_rank"] * w["group_size"] * w["new_tokens"]  # one rank, no EOS
    for scenario in ("no_eos", "eos"):
        results = report["scenarios"][scenario]
        for method in ("a", "b", "c"):
            assert "error" not in results[method], (scenario, method, results[method])
            assert results[method]["tokens_per_second"] > 0
        assert results["a"]["x_vs_b"] > 0
    assert all(report["scenarios"]["no_eos"][m]["tokens"] == expected for m in ("a", "b", "c"))
