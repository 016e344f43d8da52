"""A short run through launch/local.sh, read back with TensorBoard's own reader: every tag that
docs/metrics.md documents is there, with one point per step, and nothing undocumented is.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.multirank

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "metrics.md"
STEPS = 3
REWARD_NAMES = ["exact_answer"]  # the default task's reward function
WORLD = 2


def documented(section: str) -> list[str]:
    """Tags in the first column of the table under `## section`, patterns expanded."""
    body = DOCS.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    tags = []
    for tag in re.findall(r"^\| `([^`]+)` \|", body, flags=re.MULTILINE):
        names = REWARD_NAMES if "{name}" in tag else [None]
        ranks = range(WORLD) if "{r}" in tag else [None]
        tags += [tag.replace("{name}", str(n)).replace("{r}", str(r)) for n in names for r in ranks]
    return tags


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    args = ["--warmup.max_steps=20", "--warmup.eval_every=10", "--warmup.batch_size=32",
            f"--train.steps={STEPS}", "--train.eval_every=2", "--task.eval_size=64",
            "--train.prompts_per_step=8", "--rollout.group_size=4",
            "--train.micro_batch_size=16", "--output.save_model=false",
            "--output.log_samples_every=1", f"--output.run_dir={run_dir}"]
    env = {**os.environ, "NPROC": str(WORLD), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([ROOT / "launch" / "local.sh", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = EventAccumulator(str(run_dir / "tensorboard"),
                              size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return run_dir, events, result


def test_documented_tags_parse():
    per_step = documented("Every GRPO step")
    assert len(per_step) >= 30
    assert {"reward", "kl", "rewards/exact_answer/mean", "memory/peak_bytes_rank1"} <= set(per_step)


def test_every_documented_per_step_tag_has_one_point_per_step(short_run):
    _, events, _ = short_run
    logged = set(events.Tags()["scalars"])
    missing = [tag for tag in documented("Every GRPO step") if tag not in logged]
    assert not missing, f"documented but not logged: {missing}"
    for tag in documented("Every GRPO step"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, STEPS + 1)), tag


def test_evaluation_histograms_and_text(short_run):
    _, events, _ = short_run
    # Before GRPO, at train.eval_every=2, and after the last step.
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 2, STEPS]
    for tag in ("rewards", "advantages"):
        assert [e.step for e in events.Histograms(tag)] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Tensors("samples/text_summary")] == list(range(1, STEPS + 1))
    assert documented("Histograms and text") == ["rewards", "advantages", "samples"]


def test_nothing_is_logged_that_the_docs_do_not_list(short_run):
    _, events, _ = short_run
    listed = set()
    for section in ("Every GRPO step", "Evaluation", "Only with some settings"):
        listed |= set(documented(section))
    assert set(events.Tags()["scalars"]) <= listed


def test_console_has_one_progress_line_per_step_from_rank_0(short_run):
    _, _, result = short_run
    for step in range(1, STEPS + 1):
        lines = [line for line in result.stdout.splitlines()
                 if line.startswith(f"step {step}/{STEPS}  reward ")]
        assert len(lines) == 1
        assert " kl " in lines[0] and "s/step  eta " in lines[0]
    assert "eval " in next(line for line in result.stdout.splitlines() if line.startswith("step 2/"))
    output = result.stdout + result.stderr
    assert "FutureWarning" not in output  # DeepSpeed's use of renamed torch collectives


def test_plot_reads_the_run(short_run, tmp_path):
    pytest.importorskip("matplotlib")
    from grpo_ds.plot import main

    run_dir, _, _ = short_run
    assert main([str(run_dir), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 30_000
