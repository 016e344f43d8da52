"""One run per run directory: the lock, stale takeover, and no silent reuse of an earlier run."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_ds.cli import main as cli_main
from grpo_ds.run_lock import LOCK_NAME, RunDirError, RunLock, check_fresh_start

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from grpo_ds.run_lock import RunLock; RunLock(sys.argv[1]); " \
       "print('held', flush=True); time.sleep(60)"


@pytest.fixture
def holder(tmp_path):
    """Another live process holding tmp_path/run."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_named_and_a_second_lock_refused(tmp_path, holder):
    with pytest.raises(RunDirError, match=rf"in use by another run \(pid {holder.pid} on "
                                          rf"{socket.gethostname()}, started 20"):
        RunLock(tmp_path / "run")


def test_a_dead_holders_lock_is_taken_over_with_a_message(tmp_path, holder):
    holder.kill()
    holder.wait()
    said = []
    lock = RunLock(tmp_path / "run", said.append)
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "no longer running" in said[0]
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run", said.append).release()  # released cleanly: no takeover message
    assert len(said) == 1


def test_train_on_a_held_run_dir_is_refused_before_launch(tmp_path, holder, capsys):
    started = time.time()
    code = cli_main(["train", f"--output.run_dir={tmp_path / 'run'}", "--deepspeed.num_gpus=1"])
    err = capsys.readouterr().err
    assert code == 2 and time.time() - started < 5
    assert f"pid {holder.pid}" in err and "in use by another run" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # no failure.txt


def test_a_fresh_start_over_an_earlier_run_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "failure.txt").write_text("old")
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000001")
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl, tensorboard, "
                                          r".*latest\): pass --resume .* --overwrite"):
        check_fresh_start(run, run / "checkpoints", overwrite=False)
    said = []
    check_fresh_start(run, run / "checkpoints", overwrite=True, log=said.append)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"] and "abandoned" in said[0]


def test_cli_refuses_reusing_a_run_dir_without_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    code = cli_main(["train", f"--output.run_dir={tmp_path / 'run'}", "--deepspeed.num_gpus=1"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released on the way out
