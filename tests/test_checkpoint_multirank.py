"""Checkpoints, exact resume, preemption and failures in real 2-rank DeepSpeed ZeRO-3 runs.

One reference run (warm-up + STEPS GRPO steps, a checkpoint every step) is shared by the module.
Every other run is compared with it or starts from its checkpoints. The reward adds a length term
to exact-answer, so every group has distinct rewards and every step a non-zero gradient: resume
bugs show up in the numbers (the warm-up is too short for exact answers alone).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from grpo_ds.checkpoint_files import STATE_FILE, latest_name
from grpo_ds.export import consolidated_weights
from tests.multirank import free_port

pytestmark = pytest.mark.multirank

REPO = Path(__file__).resolve().parents[1]
REWARD = REPO / "tests" / "scripts" / "ckpt_reward.py"
STEPS = 5
LR = 1e-3
NOT_COMPARED = ("time/", "throughput/", "memory/")  # wall-clock and allocator numbers


def settings(run_dir: Path, *extra: str) -> list[str]:
    return [f"--output.run_dir={run_dir}", f"--train.steps={STEPS}", f"--train.lr={LR}",
            "--train.prompts_per_step=4", "--rollout.group_size=4", "--train.micro_batch_size=8",
            "--rollout.max_new_tokens=6", "--task.eval_size=16", "--train.eval_every=0",
            "--warmup.max_steps=4", "--warmup.eval_every=2", "--warmup.batch_size=16",
            "--grpo.beta=0.04", "--output.log_samples_every=0",
            f"--rewards.functions=grpo_ds.tasks.arithmetic:exact_answer,{REWARD}:length_reward",
            *extra]


class Job:
    """A launched run: its own session (so the test can kill it whole), output read as it comes."""

    def __init__(self, command: list[str], faults: str | None = None):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPO_DS_FAULT": faults or ""}
        self.start = time.time()
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time() - self.start, line))

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_until(self, condition, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended early:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"timed out waiting:\n{self.output[-3000:]}"
            time.sleep(0.1)

    def finish(self, timeout: float = 400) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.ended = time.time() - self.start
        self.kill()
        self.reader.join(timeout=10)
        assert code is not None, f"no exit after {timeout} s:\n{self.output[-6000:]}"
        return code

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(run_dir: Path, *extra: str, ranks: int = 2, faults: str | None = None) -> Job:
    """`deepspeed --num_gpus N --module grpo_ds.train ...`, as users and `grpo-ds train` run it."""
    return Job([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                "--master_port", str(free_port()), "--module", "grpo_ds.train",
                *settings(run_dir, *extra)], faults)


def run(run_dir: Path, *extra: str, ranks: int = 2, faults: str | None = None,
        expect: int | None = 0) -> Job:
    job = launch(run_dir, *extra, ranks=ranks, faults=faults)
    code = job.finish()
    if expect is not None:
        assert code == expect, f"exit {code}, expected {expect}:\n{job.output[-4000:]}"
    job.code = code
    return job


def step_metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for row in rows:
        if "loss" in row:
            assert row["step"] not in by_step, f"step {row['step']} logged twice"
            by_step[row["step"]] = {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}
    return by_step


def assert_same_metrics(reference: dict[int, dict], other: dict[int, dict]) -> None:
    assert sorted(other) == sorted(reference)
    for step, expected in reference.items():
        different = {k: (v, other[step].get(k)) for k, v in expected.items()
                     if other[step].get(k) != v}
        assert not different, f"step {step}: {different}"


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return consolidated_weights(run_dir / "checkpoints" / f"step_{step:06d}")


def adam_step_shape(before: dict, after: dict) -> tuple[float, float]:
    """(largest |change|, share of elements that moved by exactly lr) between two checkpoints.

    Adam's first step from zero moments moves every element by lr * m/sqrt(v) = lr * g/|g|, i.e.
    exactly lr; with moments carried over, |m|/sqrt(v) < 1 for most elements. So a share near 1
    means the moments were lost, and a largest change above lr means the weights were not the
    checkpoint's (they would be several steps away)."""
    change = torch.cat([(after[k] - before[k]).flatten() for k in before]).abs()
    return change.max().item(), ((change - LR).abs() < 1e-6).float().mean().item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: warm-up, STEPS steps, a checkpoint after every step, all kept."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(run_dir, "--checkpoint.save_every=1", "--checkpoint.keep_last=0")
    assert latest_name(run_dir / "checkpoints") == f"step_{STEPS:06d}"
    return run_dir


def test_preempt_crash_during_save_and_resume_give_the_uninterrupted_metrics(reference, tmp_path):
    run_dir = tmp_path / "run"
    # 1. `grpo-ds train` gets SIGTERM after step 1 (as from a scheduler): the ranks finish their
    #    step, save, and the job exits with 143.
    cli = Job([sys.executable, "-m", "grpo_ds.cli", "train",
               *settings(run_dir, "--checkpoint.save_every=100")])
    cli.wait_until(lambda: "step 1/" in cli.output)
    cli.proc.send_signal(signal.SIGTERM)
    assert cli.finish() == 143, cli.output[-4000:]
    preempted_at = int(latest_name(run_dir / "checkpoints").removeprefix("step_"))
    assert 1 <= preempted_at < STEPS, "the signal came too late to test a resume"
    assert "warm-up step" in cli.output

    # 2. Resume; at the last step only rank 1 gets a SIGTERM, yet both ranks agree to save, and
    #    are SIGKILLed mid-save (after writing the step's files, before `latest` moves).
    checkpoints = run_dir / "checkpoints"
    crashed = launch(run_dir, "--checkpoint.save_every=100", "--checkpoint.resume=auto",
                     faults=f"sigterm@{STEPS}:1,sleep_in_save@{STEPS}")
    crashed.wait_until(lambda: all((checkpoints / f"sleeping_in_save_rank{r}").exists()
                                   for r in (0, 1)))
    crashed.kill()
    crashed.finish()
    assert f"resumed from {checkpoints / f'step_{preempted_at:06d}'}" in crashed.output
    assert "warm-up step" not in crashed.output  # the warm-up model is reused, not retrained
    assert latest_name(checkpoints) == f"step_{preempted_at:06d}"  # untouched by the dead save
    assert not (checkpoints / f"step_{STEPS:06d}" / STATE_FILE).exists()

    # 3. resume=auto follows `latest` to the last complete checkpoint and finishes the run.
    resumed = run(run_dir, "--checkpoint.save_every=100", "--checkpoint.resume=auto")
    assert f"resumed from {checkpoints / f'step_{preempted_at:06d}'}" in resumed.output
    assert latest_name(checkpoints) == f"step_{STEPS:06d}"
    # Three processes, one run: every step's metrics equal the uninterrupted run's, exactly.
    assert_same_metrics(step_metrics(reference), step_metrics(run_dir))
    # ...and so do the accuracies in its summary (accuracy_after was once NaN after a resume).
    summaries = [json.loads((d / "summary.json").read_text()) for d in (reference, run_dir)]
    for key in ("accuracy_before", "accuracy_after"):
        assert summaries[1][key] == summaries[0][key] and summaries[0][key] is not None, key


def test_nan_steps_are_skipped_on_every_rank_then_abort(reference, tmp_path):
    # NaN advantages on rank 1 only, at steps 2 and 3; two bad steps in a row abort.
    job = run(tmp_path, f"--model.path={reference / 'sft_model'}", "--checkpoint.save_every=1",
              "--checkpoint.keep_last=0", "--checkpoint.max_bad_steps=2", faults="nan@2-3:1",
              expect=None)
    assert job.code != 0
    assert "steps 2..3 all had a NaN/inf loss or gradient" in job.output
    assert job.output.count("grpo-ds: rank") == 2 and job.output.count(" failed: ") == 1
    metrics = step_metrics(tmp_path)
    assert [metrics[s]["nan_skipped_steps"] for s in (1, 2, 3)] == [0, 1, 2]
    # Step 1 ran as in the reference run; step 2 was skipped on both ranks, so the weights did
    # not move (step 1 == step 2, exactly), where the reference run's step 2 moved them.
    one, two = weights(tmp_path, 1), weights(tmp_path, 2)
    assert adam_step_shape(weights(reference, 1), one)[0] == 0.0
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert adam_step_shape(one, weights(reference, 2))[0] > 0
    # The abort saved nothing more: `latest` is the last good checkpoint.
    assert latest_name(tmp_path / "checkpoints") == "step_000002"
    assert not (tmp_path / "checkpoints" / "step_000003").exists()


def test_an_exception_on_one_rank_ends_the_job_once_and_quickly(reference, tmp_path):
    job = run(tmp_path, f"--model.path={reference / 'sft_model'}", faults="raise@2:1",
              expect=None)
    assert job.code != 0
    out = job.output
    # Printed once: one traceback, from rank 1; rank 0 (cut off mid-collective) says one line.
    assert out.count("Traceback") == 1 and "[rank1]: Traceback" in out
    assert "grpo-ds: rank 1 failed: RuntimeError: injected failure at step 2 on rank 1" in out
    assert "grpo-ds: rank 0 stopped too" in out
    failed_at = next(t for t, line in job.lines if "rank 1 failed" in line)
    assert job.ended - failed_at < 60  # a rank left waiting in gloo would wait 30 minutes
    assert "injected failure" in (tmp_path / "failure.txt").read_text()


def mount_tiny_disk(where: Path, size_kb: int) -> bool:
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                             str(where)], capture_output=True, check=False)
    return result.returncode == 0


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(reference, tmp_path):
    one = reference / "checkpoints" / "step_000001"
    size_kb = sum(f.stat().st_size for f in one.rglob("*")) // 1024
    disk = tmp_path / "disk"
    # Room for one checkpoint and a half: step 1 fits, step 2 (saved before step 1 may go) not.
    real = mount_tiny_disk(disk, size_kb * 3 // 2)
    try:
        job = run(tmp_path / "run", f"--model.path={reference / 'sft_model'}",
                  f"--checkpoint.dir={disk}", "--checkpoint.save_every=1",
                  "--checkpoint.keep_last=1", expect=None,
                  faults=None if real else "disk_full@2:0")  # no mount rights: simulate
        assert job.code != 0
        assert f"saving checkpoint {disk / 'step_000002'} failed" in job.output
        assert f"The previous checkpoint {disk / 'step_000001'} is intact" in job.output
        assert latest_name(disk) == "step_000001"
        assert consolidated_weights(disk / "step_000001")  # still loadable
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)


def test_resume_on_a_different_number_of_ranks(reference, tmp_path):
    one_rank, two_ranks = tmp_path / "one", tmp_path / "two"
    # 2 -> 1: DeepSpeed's universal checkpoint carries weights and Adam moments.
    job = run(one_rank, f"--checkpoint.resume={reference / 'checkpoints' / 'step_000002'}",
              f"--train.steps={3}", ranks=1)
    assert "moved from 2 to 1 ranks" in job.output
    largest, at_lr = adam_step_shape(weights(reference, 2), weights(one_rank, 3))
    assert 0 < largest < 1.5 * LR and at_lr < 0.5
    # 1 -> 2, from the checkpoint the 1-rank run just wrote.
    job = run(two_ranks, f"--checkpoint.resume={one_rank / 'checkpoints'}", "--train.steps=4")
    assert "moved from 1 to 2 ranks" in job.output
    largest, at_lr = adam_step_shape(weights(one_rank, 3), weights(two_ranks, 4))
    assert 0 < largest < 1.5 * LR and at_lr < 0.5


def test_export_writes_a_model_transformers_loads_without_deepspeed(reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_ds.export import main as export_main

    assert export_main([str(reference), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").state_dict()
    final = AutoModelForCausalLM.from_pretrained(reference / "model").state_dict()
    # The last checkpoint is the end-of-training model, bit for bit.
    assert sorted(exported) == sorted(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)
    step = str(reference / "checkpoints" / "step_000002")
    assert export_main([step, str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bf16")
    out = model.generate(**tokenizer(["12+34="], return_tensors="pt"), min_new_tokens=3,
                         max_new_tokens=3)
    assert out.shape == (1, 10)  # <bos> 1 2 + 3 4 = (7 tokens), then 3 new ones
    shutil.rmtree(tmp_path / "fp32")
