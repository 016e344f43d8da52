"""The README's first command, as a user runs it: `grpo-ds train` on the embedded default.

It launches 2 ZeRO-3 ranks, runs the supervised warm-up to its plateau and then GRPO, and must
lift held-out greedy accuracy by at least 20 points above that plateau (issue 2's bar).
"""

import json
import shutil
import subprocess

import pytest

from grpo_ds.cpu.host_memory import find_tcmalloc

pytestmark = [pytest.mark.slow, pytest.mark.multirank]


def test_default_run_lifts_accuracy_above_the_supervised_plateau(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [shutil.which("grpo-ds"), "train", f"--output.run_dir={run_dir}"],
        check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["world_size"] == 2
    # The launcher gave the ranks tcmalloc where it is installed (CI installs it), and said so.
    assert summary["host_allocator"] == ("tcmalloc" if find_tcmalloc() else "glibc")
    assert "host allocator: " in result.stdout
    # The warm-up really plateaued: its last evaluations did not improve on the best by > 1 pt.
    curve = [point["accuracy"] for point in summary["warmup_curve"]]
    assert max(curve[-3:]) <= max(curve[:-3]) + 0.01 + 1e-9
    assert summary["accuracy_before"] < 0.7
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.20
    # The run printed the same summary and wrote the documented outputs.
    assert f'"accuracy_after": {summary["accuracy_after"]}' in result.stdout
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if '"loss"' in line]
    assert len(steps) == 60
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
