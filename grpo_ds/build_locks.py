"""Stale build locks of DeepSpeed's JIT-built ops: found before launch, not as a silent hang.

DeepSpeed builds its C++ ops (shared-memory comm and CPU Adam on CPU, FusedAdam on a GPU, async_io
for NVMe offload) with torch's cpp_extension the first time a rank loads them. The first process to build an op
creates `<extensions root>/<build dir>/<op>/lock`; every other process waits until that file
is gone, with no timeout and no message. A build killed with SIGKILL (a job's time limit, an OOM
kill, a benchmark's timeout) never removes it, and from then on every rank of every run waits
on it forever after printing "Using ... as PyTorch extensions root". A lock whose folder has
seen no write for `IDLE_SECONDS` belongs to no running build: a compile step writes its object
file within a few minutes (the slowest seen here, async_io's, about 80 s a file on 2 cores).

One policy: such a lock is named and the run refuses to start; nothing deletes it (a build in
another job may own it). `grpo-ds train` and the benchmarks check before they launch ranks, and
engine.init_distributed checks again for ranks started by the user's own launcher. It is not in
grpo_ds/cpu/: the GPU path JIT-builds FusedAdam behind the same lock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

IDLE_SECONDS = 600.0


def extensions_root() -> Path:
    """Where torch's cpp_extension builds: $TORCH_EXTENSIONS_DIR or its default cache folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def stale_build_locks(root: Path, now: float | None = None,
                      idle_seconds: float = IDLE_SECONDS) -> list[Path]:
    """`lock` files under `root` (an op folder, or one per build-variant folder) whose folder's
    newest file is older than `idle_seconds`."""
    now = time.time() if now is None else now
    stale = []
    for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            newest = max(f.stat().st_mtime for f in lock.parent.iterdir())
        except FileNotFoundError:  # a build finished (and removed its lock) while we looked
            continue
        if now - newest > idle_seconds:
            stale.append(lock)
    return stale


def build_lock_problem(root: Path | None = None) -> str | None:
    """Why ranks started now would wait forever on a DeepSpeed op build, or None."""
    stale = stale_build_locks(extensions_root() if root is None else root)
    if not stale:
        return None
    paths = " ".join(str(p) for p in stale)
    return (f"stale torch extension build lock(s), nothing written beside them for over "
            f"{IDLE_SECONDS / 60:.0f} minutes: {paths}. A killed build of a DeepSpeed op left "
            f"them, and every rank loading that op would wait on them forever. If no build is "
            f"running, remove them (rm {paths}) and launch again")
