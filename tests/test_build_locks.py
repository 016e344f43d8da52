"""Stale build locks of DeepSpeed's JIT ops are found before launch (build_locks.py)."""

import os
from pathlib import Path

from grpo_ds import cli
from grpo_ds.build_locks import IDLE_SECONDS, build_lock_problem, stale_build_locks


def op_folder(root, name, age_seconds, lock=True):
    """An op's build folder under root/py311_cpu whose files were last written age_seconds ago."""
    folder = root / "py311_cpu" / name
    folder.mkdir(parents=True)
    files = [folder / "op.o"] + ([folder / "lock"] if lock else [])
    for f in files:
        f.write_text("")
        os.utime(f, (1000.0 - age_seconds, 1000.0 - age_seconds))
    return folder


def test_a_lock_in_a_folder_idle_past_the_limit_is_stale(tmp_path):
    killed = op_folder(tmp_path, "async_io", age_seconds=IDLE_SECONDS + 1)
    op_folder(tmp_path, "cpu_adam", age_seconds=IDLE_SECONDS - 1)  # still compiling
    op_folder(tmp_path, "shm_comm", age_seconds=10 * IDLE_SECONDS, lock=False)  # built
    assert stale_build_locks(tmp_path, now=1000.0) == [killed / "lock"]


def test_a_recent_write_beside_an_old_lock_means_a_build_is_running(tmp_path):
    folder = op_folder(tmp_path, "async_io", age_seconds=2 * IDLE_SECONDS)
    os.utime(folder / "op.o", (990.0, 990.0))  # an object file written 10 s ago
    assert stale_build_locks(tmp_path, now=1000.0) == []


def test_locks_directly_under_torch_extensions_dir_are_found(tmp_path):
    # with $TORCH_EXTENSIONS_DIR set torch builds in <dir>/<op>, without the variant folder
    (tmp_path / "async_io").mkdir()
    (tmp_path / "async_io" / "lock").write_text("")
    os.utime(tmp_path / "async_io" / "lock", (0.0, 0.0))
    assert stale_build_locks(tmp_path, now=IDLE_SECONDS + 1) == [tmp_path / "async_io" / "lock"]


def test_train_refuses_to_launch_onto_a_stale_lock_naming_it(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "async_io"
    folder.mkdir()
    (folder / "lock").write_text("")
    os.utime(folder / "lock", (0.0, 0.0))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    started = []
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: started.append(a))
    assert cli.main(["train"]) == 2
    assert not started
    err = capsys.readouterr().err
    assert f"rm {folder / 'lock'}" in err and "wait on them forever" in err
    (folder / "lock").unlink()
    assert build_lock_problem(tmp_path) is None


def test_a_lock_removed_while_it_is_looked_at_is_skipped(tmp_path, monkeypatch):
    op_folder(tmp_path, "async_io", age_seconds=2 * IDLE_SECONDS)

    def build_just_finished(folder):
        raise FileNotFoundError(folder / "lock")

    monkeypatch.setattr(Path, "iterdir", build_just_finished)
    assert stale_build_locks(tmp_path, now=1000.0) == []
