"""Fault injection for the multi-rank failure tests, kept out of the product's code paths.

GRPO_DS_FAULT="name@steps[:rank],..." (steps `3` or `2-3`; all ranks when no rank is given)
registers the named faults at grpo_ds/hooks.py's points when a rank starts (train.main calls
`install_from_env`; unset, nothing is registered and every hook point stays a no-op):

    raise          an exception before the update
    nan            NaN advantages before the update
    sigterm        the rank signals itself before the update
    sleep_in_save  hang in a checkpoint save after writing the rank's files, before `latest` moves
    disk_full      ENOSPC while rank 0 commits the checkpoint
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from pathlib import Path

from grpo_ds import hooks


@functools.lru_cache(maxsize=4)
def _faults(spec: str) -> list[tuple[str, int, int, int | None]]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, where = item.partition("@")
        steps, _, rank = where.partition(":")
        first, _, last = steps.partition("-")
        faults.append((name, int(first), int(last or first), int(rank) if rank else None))
    return faults


def fault(name: str, step: int, rank: int) -> bool:
    """Whether GRPO_DS_FAULT asks for fault `name` at this step on this rank."""
    spec = os.environ.get("GRPO_DS_FAULT", "")
    return bool(spec) and any(n == name and lo <= step <= hi and r in (None, rank)
                              for n, lo, hi, r in _faults(spec))


def inject_before_update(step: int, rank: int, batch):
    """The faults that happen inside a step, just before the update."""
    if fault("nan", step, rank):
        batch = dataclasses.replace(batch, advantages=batch.advantages * float("nan"))
    if fault("sigterm", step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
    if fault("raise", step, rank):
        raise RuntimeError(f"injected failure at step {step} on rank {rank} (GRPO_DS_FAULT)")
    return batch


def sleep_in_save(step: int, rank: int, root) -> None:
    if fault("sleep_in_save", step, rank):
        (Path(root) / f"sleeping_in_save_rank{rank}").touch()
        time.sleep(600)


def disk_full(step: int, rank: int) -> None:
    if fault("disk_full", step, rank):
        raise OSError(28, "No space left on device (GRPO_DS_FAULT=disk_full)")


def install_from_env() -> None:
    """Register the fault hooks when GRPO_DS_FAULT is set."""
    if os.environ.get("GRPO_DS_FAULT"):
        hooks.register("before_update", inject_before_update)
        hooks.register("files_written", sleep_in_save)
        hooks.register("before_commit", disk_full)
