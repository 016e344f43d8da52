"""A job dies with `grpo-ds train`: the parent-death signal and the rank watchdog, on real processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from grpo_ds.lifeline import _watched, parent_token

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `grpo-ds train`: starts a child (the stand-in for the launcher or a rank), prints
# its pid, and waits. MODE picks how the child is tied to it.
PARENT = """
import os, subprocess, sys, time
from grpo_ds.lifeline import PARENT_ENV, die_with_parent, parent_token
mode = sys.argv[1]
child_code = "import time\\nfrom grpo_ds.lifeline import tie_rank_to_job\\n" + (
    "tie_rank_to_job()\\n" if mode == "watchdog" else "") + "time.sleep(120)\\n"
env = {**os.environ, PARENT_ENV: parent_token()} if mode == "watchdog" else dict(os.environ)
child = subprocess.Popen([sys.executable, "-c", child_code], env=env, start_new_session=True,
                         preexec_fn=die_with_parent if mode == "pdeathsig" else None)
print(child.pid, flush=True)
time.sleep(120)
"""


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog"])
def test_kill_9_of_the_parent_ends_the_child(mode):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    try:
        time.sleep(2.0 if mode == "watchdog" else 0.3)  # the child has imported and tied itself
        assert psutil.pid_exists(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert gone_within(child, 5), f"{mode}: the child outlived its parent's kill -9"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_untied_child_outlives_its_parent():
    # The control: without a tie, a child in its own session survives (the bug being fixed).
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "none"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    try:
        assert not gone_within(child, 1.5)
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_watchdog_only_watches_a_process_of_this_host():
    assert _watched(parent_token())[0] == os.getpid()
    assert _watched(f"elsewhere.example:{os.getpid()}:1.0") is None
    assert _watched("garbage") is None and _watched(None) is None
