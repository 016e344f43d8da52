"""Killing `grpo-ds train` kills the job: the launcher and every rank die with it.

`grpo-ds train` starts DeepSpeed's launcher in its own session (so that a terminal's Ctrl-C goes
to `grpo-ds train` alone, which forwards it), so a scheduler's `kill -9` of `grpo-ds train`
reaches nothing else: without a tie, the launcher and ranks trained on, unsupervised, to the end.
The chain is `grpo-ds train` -> deepspeed runner -> launch.py -> ranks, and Linux's parent-death
signal (prctl PR_SET_PDEATHSIG) only ties a process to its direct parent, set from inside the
child; launch.py is DeepSpeed's code. So:
- the runner gets PR_SET_PDEATHSIG=SIGKILL from `grpo-ds train` (`die_with_parent`, a preexec_fn);
- each rank sets it for itself (its parent is launch.py), and, when PARENT_ENV names a
  `grpo-ds train` process on this host, watches that process (pid + start time, so a reused pid
  does not count) every POLL_SECONDS and SIGKILLs itself once it is gone. launch.py then sees a
  rank die and stops the rest, and exits. The whole job is gone in about a second.
A scheduler's kill is a hard stop: no checkpoint is written; `latest` still names the last
complete one (saves are atomic). SIGTERM to `grpo-ds train` remains the graceful stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time

PARENT_ENV = "GRPO_DS_JOB_PARENT"  # "host:pid:start_time" of the `grpo-ds train` process
POLL_SECONDS = 0.5
PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """preexec_fn for the launcher: SIGKILL it when `grpo-ds train` dies (async-signal-safe)."""
    _set_parent_death_signal(signal.SIGKILL)


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def parent_token() -> str:
    """PARENT_ENV's value naming this process: the launcher's environment carries it to ranks."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _watched(token: str | None) -> tuple[int, float] | None:
    """(pid, start time) of the `grpo-ds train` to watch, if it runs on this host."""
    if not token:
        return None
    try:
        host, pid, started = token.rsplit(":", 2)
        pid, started = int(pid), float(started)
    except ValueError:
        return None
    return (pid, started) if host == socket.gethostname() else None


def parent_alive(pid: int, started: float) -> bool:
    return _start_time(pid) == started


def _stop_this_rank(pid: int) -> None:
    try:
        os.write(2, f"grpo-ds: grpo-ds train (pid {pid}) is gone: stopping this rank\n".encode())
    except OSError:
        pass  # its terminal or pipe may be gone with it
    os.kill(os.getpid(), signal.SIGKILL)


def tie_rank_to_job(environ=os.environ) -> threading.Thread | None:
    """At rank start: die with the launcher (PDEATHSIG) and with `grpo-ds train` (a watchdog)."""
    _set_parent_death_signal(signal.SIGKILL)
    watched = _watched(environ.get(PARENT_ENV))
    if watched is None:
        return None

    def watch() -> None:
        while parent_alive(*watched):
            time.sleep(POLL_SECONDS)
        _stop_this_rank(watched[0])

    thread = threading.Thread(target=watch, name="grpo-ds-lifeline", daemon=True)
    thread.start()
    return thread
