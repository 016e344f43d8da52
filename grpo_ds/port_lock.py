"""Master ports without a race between two `grpo-ds train` runs on one machine.

Probing a port (bind, close) and launching are two moments: two runs started together with the
same `master_port` both found it free, and then one run's rank 1 joined the other run's
rendezvous and both died. A port cannot be handed from this process to the launcher's rank 0
still bound, so each run instead holds an exclusive flock on `<tmp>/grpo-ds-ports/<port>.lock`
from the probe until its job ends (the kernel drops it when the holder dies). The second run
finds it held and stops before launching, naming the run that has the port; the first is never
touched. A port picked automatically is retried until its lock is free. Listeners that are not
grpo-ds runs are still caught by `cli.port_problem`'s bind probe.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path


class PortTaken(RuntimeError):
    """Another grpo-ds run on this machine holds this master port."""


def lock_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "grpo-ds-ports"
    if not path.is_dir():
        path.mkdir(exist_ok=True)
        try:  # shared by every user of the machine, like /tmp itself
            os.chmod(path, 0o1777)
        except OSError:
            pass
    return path


class PortLock:
    """An exclusive claim on `port` among grpo-ds runs on this machine, until release or death."""

    def __init__(self, port: int, run_dir: str):
        self.port, self.fd = port, None
        path = lock_dir() / f"{port}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return  # e.g. another user's file without write access: the bind probe still runs
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            raise PortTaken(
                f"master port {port} is held by another grpo-ds run on this machine (pid "
                f"{holder.get('pid', '?')}, run_dir {holder.get('run_dir', '?')}): set another "
                "deepspeed.master_port, or leave it unset to pick a free one") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "run_dir": str(run_dir),
                                  "started": time.time()}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the file stays: unlinking it would race with a new locker
            self.fd = None


def claim_port(port: int | None, run_dir: str, pick, tries: int = 20) -> PortLock:
    """The lock of `port`, or of a port `pick()` returns whose lock is free (PortTaken if none)."""
    if port:
        return PortLock(port, run_dir)
    for _ in range(tries - 1):
        try:
            return PortLock(pick(), run_dir)
        except PortTaken:
            continue
    return PortLock(pick(), run_dir)
