"""Real `grpo-ds train` jobs: one run per run dir and per port, and kill -9 ends the whole job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo_ds.failures import rank_processes
from tests.multirank import free_port

pytestmark = pytest.mark.multirank

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train.prompts_per_step=2", "--rollout.group_size=2", "--train.micro_batch_size=4",
        "--rollout.max_new_tokens=4", "--task.eval_size=8", "--train.eval_every=0",
        "--warmup.max_steps=2", "--warmup.eval_every=2", "--warmup.batch_size=8",
        "--output.log_samples_every=0", "--output.quiet=true", "--checkpoint.save_every=0"]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
       "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grpo_ds.cli", "train", *TINY, *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_ranks(job: subprocess.Popen, count: int, timeout: float = 120) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert job.poll() is None, job.stdout.read()[-3000:]
        launchers = psutil.Process(job.pid).children()
        ranks = rank_processes(launchers[0].pid) if launchers else []
        if len(ranks) == count:
            return ranks
        time.sleep(0.2)
    raise AssertionError("the ranks never started")


def test_a_second_run_on_a_live_run_dir_or_port_is_refused_and_the_first_finishes(tmp_path):
    port = free_port()
    first = start(f"--output.run_dir={tmp_path / 'a'}", "--deepspeed.num_gpus=1",
                  f"--deepspeed.master_port={port}", "--train.steps=6")
    try:
        wait_for_ranks(first, 1)
        for second_args, named in (
                ([f"--output.run_dir={tmp_path / 'a'}"], f"pid {first.pid}"),
                ([f"--output.run_dir={tmp_path / 'b'}", f"--deepspeed.master_port={port}"],
                 f"master port {port} is held by another grpo-ds run on this machine (pid {first.pid}")):
            began = time.time()
            second = subprocess.run([sys.executable, "-m", "grpo_ds.cli", "train",
                                     "--deepspeed.num_gpus=1", *second_args, *TINY], cwd=REPO,
                                    env=ENV, capture_output=True, text=True, timeout=60, check=False)
            assert second.returncode == 2 and time.time() - began < 5, second.stderr
            assert named in second.stderr and "launching" not in second.stdout
            assert "Traceback" not in second.stderr
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 7))  # each step once
    assert not (tmp_path / "a" / "failure.txt").exists()
    assert not (tmp_path / "b").exists() or not (tmp_path / "b" / "failure.txt").exists()


def training(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and '"loss"' in metrics.read_text()


@pytest.mark.parametrize("when", ["ranks_starting", "training"])
def test_kill_9_of_grpo_ds_train_leaves_no_process_of_the_job(tmp_path, when):
    job = start(f"--output.run_dir={tmp_path / 'run'}", "--deepspeed.num_gpus=2",
                "--train.micro_batch_size=2", "--train.steps=100000")
    try:
        wait_for_ranks(job, 2)
        deadline = time.time() + 300
        while when == "training" and not training(tmp_path / "run"):
            assert time.time() < deadline and job.poll() is None, "training never started"
            time.sleep(0.2)
        family = psutil.Process(job.pid).children(recursive=True)  # runner, launch.py, ranks
        assert len(family) >= 4
        job.send_signal(signal.SIGKILL)
        job.wait()
        killed = time.time()
        alive = family
        while alive and time.time() - killed < 10:
            alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        assert not alive, f"still running 10 s after kill -9: {[p.cmdline() for p in alive]}"
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_a_direct_launch_on_a_held_run_dir_stops_on_rank_0_and_writes_nothing_there(tmp_path):
    from grpo_ds.run_lock import RunLock

    held = RunLock(tmp_path / "run", log=lambda _msg: None)  # another run, live
    try:
        done = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                               "--master_port", str(free_port()), "--module", "grpo_ds.train",
                               *TINY, f"--output.run_dir={tmp_path / 'run'}"], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        held.release()
    out = done.stdout + done.stderr
    assert done.returncode != 0 and f"in use by another run (pid {os.getpid()}" in out, out[-3000:]
    assert list((tmp_path / "run").iterdir()) == []  # no failure.txt, no metrics in its directory
