"""Named points where a test may step into a run; with nothing registered each is a no-op.

The product only marks the points. What runs there is registered from outside: the fault
injection of the multi-rank failure tests (grpo_ds/faults.py, switched on by GRPO_DS_FAULT) or a
test's own function.

    before_update(step, rank, batch) -> batch   the step's batch, just before the mu updates
    files_written(step, rank, root)             a checkpoint's rank files are on disk
    before_commit(step, rank)                   rank 0, before it marks a checkpoint complete
"""

from __future__ import annotations

from collections.abc import Callable

_registered: dict[str, list[Callable]] = {}
POINTS = ("before_update", "files_written", "before_commit")


def register(point: str, fn: Callable) -> None:
    if point not in POINTS:
        raise ValueError(f"no hook point {point!r}; points: {POINTS}")
    _registered.setdefault(point, []).append(fn)


def clear() -> None:
    _registered.clear()


def before_update(step: int, rank: int, batch):
    for fn in _registered.get("before_update", ()):
        batch = fn(step, rank, batch)
    return batch


def files_written(step: int, rank: int, root) -> None:
    for fn in _registered.get("files_written", ()):
        fn(step, rank, root)


def before_commit(step: int, rank: int) -> None:
    for fn in _registered.get("before_commit", ()):
        fn(step, rank)
