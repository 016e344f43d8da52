"""Engine set-up helpers that need no process group."""

import os

import pytest

from grpo_ds.engine import refuse_stale_build_locks


def killed_build(root, age_seconds: float):
    """<root>/<py_cpu>/<op>/lock with nothing written beside it for `age_seconds`."""
    lock = root / "py312_cpu" / "async_io" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    (lock.parent / "build.ninja").touch()
    for f in lock.parent.iterdir():
        os.utime(f, (os.path.getmtime(f) - age_seconds,) * 2)
    return lock


def test_a_rank_refuses_a_stale_build_lock_and_leaves_it_alone(tmp_path, monkeypatch):
    # One policy with `grpo-ds train` (build_locks.py): name the lock, delete nothing.
    lock = killed_build(tmp_path, age_seconds=3600)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match=f"stale torch extension build lock.*{lock}"):
        refuse_stale_build_locks()
    assert lock.exists()


def test_a_running_build_and_other_local_ranks_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    killed_build(tmp_path, age_seconds=60)  # written a minute ago: a build may be running
    monkeypatch.setenv("LOCAL_RANK", "0")
    refuse_stale_build_locks()
    monkeypatch.setenv("LOCAL_RANK", "1")  # only local rank 0 looks
    os.utime(tmp_path / "py312_cpu" / "async_io" / "lock", (0, 0))
    os.utime(tmp_path / "py312_cpu" / "async_io" / "build.ninja", (0, 0))
    refuse_stale_build_locks()
