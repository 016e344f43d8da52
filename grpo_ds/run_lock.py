"""One run per run directory: a lock file held by the live run, and no silent reuse of old output.

`<run_dir>/run.lock` holds the holder's pid, host and start time (JSON) and an exclusive
`flock` on it for as long as the holding process lives. The kernel drops the flock when that
process dies, however it dies, so "stale" needs no guessing: a lock file whose flock can be
taken belongs to a dead run, and is taken over with a message naming it. The holder is
`grpo-ds train` (the whole job, from validation to the launcher's exit) or, when the ranks are
launched directly with `deepspeed --module grpo_ds.train`, rank 0. The launcher's environment
carries HELD_ENV so that rank 0 of a `grpo-ds train` job does not try to lock it a second time.

A run directory that already holds a run's output (metrics, summary, a `latest` checkpoint) is
only reused with --resume (continue it) or --overwrite (start again: its metrics, summary,
failure report and event files are deleted; its checkpoints are set aside as `*.abandoned`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HELD_ENV = "GRPO_DS_RUN_LOCK_HELD"  # the run_dir a parent `grpo-ds train` already locked
OUTPUTS = ("metrics.jsonl", "summary.json", "failure.txt", "tensorboard")  # --overwrite deletes


class RunDirError(RuntimeError):
    """The run directory is held by a live run, or holds output the user did not say to reuse."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


class RunLock:
    """An exclusive lock on a run directory, held until `release()` or the process's death."""

    def __init__(self, run_dir: str | Path, log=print):
        self.path = Path(run_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = self._lock_current_file()
        previous = _read_holder(self.fd)
        if previous:  # the file outlived its holder: the kernel released the flock at its death
            log(f"{self.path}: taking over the lock of a run that is no longer running "
                f"({_describe(previous)})")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(holder).encode(), 0)

    def _lock_current_file(self) -> int:
        """flock the file at `path`; retried if a releasing holder unlinked it meanwhile."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirError(
                    f"{self.path.parent} is in use by another run ({_describe(holder)}): wait "
                    "for it to finish, or set another output.run_dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # we locked a file its holder had just removed: lock the new one

    def release(self) -> None:
        """Unlock and remove the file (a kill skips this; the next run then takes it over)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def rank_lock(run_dir: str | Path, rank: int, log=print) -> RunLock | None:
    """Rank 0 of a directly launched job locks the run dir; under `grpo-ds train` it is held."""
    if rank != 0 or os.environ.get(HELD_ENV) == str(Path(run_dir).resolve()):
        return None
    return RunLock(run_dir, log)


def previous_output(run_dir: str | Path, checkpoints: Path) -> list[str]:
    """What an earlier run left in `run_dir` that a fresh start would mix with."""
    run_dir = Path(run_dir)
    found = [name for name in OUTPUTS if (run_dir / name).exists() and name != "failure.txt"]
    if (checkpoints / "latest").is_file():
        found.append(str(checkpoints / "latest"))
    return found


def check_fresh_start(run_dir: str | Path, checkpoints: Path, overwrite: bool, log=print) -> None:
    """Refuse to start afresh over an earlier run's output, or delete that output (--overwrite)."""
    found = previous_output(run_dir, checkpoints)
    if not found:
        return
    if not overwrite:
        raise RunDirError(
            f"output.run_dir={str(run_dir)!r} already holds a run ({', '.join(found)}): pass "
            "--resume to continue it, --overwrite to start it again, or set another "
            "output.run_dir")
    for name in OUTPUTS:
        target = Path(run_dir) / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    log(f"--overwrite: deleted the earlier run's {', '.join(OUTPUTS)} in {run_dir}; its "
        "checkpoints are set aside as *.abandoned (pruned under checkpoint.keep_last)")
