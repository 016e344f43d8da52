"""Engine set-up helpers that need no process group."""

import os
import time

from grpo_ds.engine import clear_stale_build_locks


def test_stale_op_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    # A killed JIT build leaves <root>/<py_cpu>/<op>/lock; torch then waits on it forever.
    stale = tmp_path / "py311_cpu" / "async_io" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")

    clear_stale_build_locks(max_age_seconds=1800)

    assert not stale.exists()
    assert fresh.exists()  # a build may be running right now


def test_only_local_rank_zero_touches_locks(tmp_path, monkeypatch):
    stale = tmp_path / "py311_cpu" / "async_io" / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    os.utime(stale, (0, 0))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")

    clear_stale_build_locks()

    assert stale.exists()
