"""Memory benchmark: the critic's value loss by hand, the RSS peak bookkeeping, the presets, and
`grpo-ds bench memory --quick --json` end to end (2 real ranks, tiny model)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from grpo_ds.tools.critic import value_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_value_loss_by_hand():
    # token 1: V=1.0, V_old=1.5, R=1: clipped V = 1.5 + clamp(-0.5, -0.2, 0.2) = 1.3;
    #          max((1-1)^2, (1.3-1)^2) = 0.09 -> 0.5 * 0.09 = 0.045 (the clipped branch wins)
    # token 2: V=2.0, clipped 1.7: max(1.0, 0.49) = 1.0 -> 0.5
    # sum 0.545 over the step's 4 tokens -> 0.13625
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    old, returns = torch.tensor([[1.5, 1.5]]), torch.tensor([[1.0, 1.0]])
    loss, metrics = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2, num_tokens=4)
    assert loss.item() == pytest.approx(0.13625)
    assert metrics == {"value_loss/sum": pytest.approx(0.545), "tokens": 2.0}
    loss.backward()
    # token 1's winner is clipped (saturated clamp): no gradient; token 2: (V - R) / 4 = 0.25
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.25])
    masked, _ = value_loss(values, old, returns, torch.tensor([[1.0, 0.0]]), 0.2, 4)
    assert masked.item() == pytest.approx(0.045 / 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_peak_restarts_at_current_rss():
    from grpo_ds.tools.bench.common import memory_status, restart_peaks

    block = torch.ones(50 * 2**20)  # 200 MiB, touched
    del block
    status = memory_status()
    assert status["hwm"] - status["rss"] > 150 * 2**20  # the freed block is in the peak only
    assert restart_peaks()
    status = memory_status()
    assert status["hwm"] - status["rss"] < 20 * 2**20


def test_presets_offload_where_their_names_say():
    from grpo_ds.config import load_ds_preset
    from grpo_ds.tools import planner
    from grpo_ds.tools.bench.memory import PRESETS
    from grpo_ds.tools.bench.memory_worker import fill_nvme_path

    expected = {"zero3": ("none", "none"), "zero3_lean": ("none", "none"),
                "zero3_offload_optimizer": ("cpu", "none"),
                "zero3_offload_all": ("cpu", "cpu"), "zero3_nvme": ("nvme", "cpu")}
    assert set(PRESETS) == set(expected)
    for name, devices in expected.items():
        ds = fill_nvme_path(load_ds_preset(f"ds_configs/{name}.json"), "/scratch/swap")
        zero = planner.zero_settings(ds)
        assert (zero.stage, zero.offload_optimizer, zero.offload_param) == (3, *devices), name
        for key in ("offload_optimizer", "offload_param"):
            if ds["zero_optimization"].get(key, {}).get("device") == "nvme":
                assert ds["zero_optimization"][key]["nvme_path"] == "/scratch/swap"


def run_quick(*extra: str) -> dict:
    """`grpo-ds bench memory --quick --json ...` in its own process group (killed on timeout)."""
    command = [sys.executable, "-m", "grpo_ds.cli", "bench", "memory", "--quick", "--json",
               "--timeout", "500", *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1, out[-2000:]
    return json.loads(lines[0])


def check_measured(result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["planned_peak_bytes_per_rank"] > 0
    assert len(result["measured_peak_bytes_per_rank"]) == 2
    assert all(b > 0 for b in result["measured_peak_bytes_per_rank"])
    assert result["planned_over_measured"] > 0
    assert {"generation", "reference", "update"} <= set(result["phases"])
    critic = result["critic"]
    assert critic["params"] > 0 and critic["planned_peak_bytes_per_rank"] > 0
    assert all(b > 0 for b in critic["measured_peak_bytes_per_rank"])
    assert 0 < critic["grpo_over_with_critic"] <= 1  # the critic run includes the GRPO steps


@pytest.mark.multirank
def test_quick_bench_reports_planned_and_measured_peaks():
    report = run_quick()
    assert set(report) >= {"machine", "presets", "bars"}
    check_measured(report["presets"]["zero3/tiny"])
    assert set(report["bars"]) >= {"planner_within_20pct", "grpo_at_most_60pct_of_critic"}


def libaio_problem() -> str | None:
    from grpo_ds.tools.bench.memory import nvme_problem

    return nvme_problem()


@pytest.mark.multirank
def test_quick_bench_nvme_preset():
    # builds DeepSpeed's async_io op where it can (about 7 minutes the first time on a 2-core
    # Zen3), in this process: the bench's launches and their timeouts find it built
    problem = libaio_problem()
    if problem:
        pytest.skip(f"NVMe offload {problem}")
    report = run_quick("--presets", "zero3_nvme")
    check_measured(report["presets"]["zero3_nvme/tiny"])
