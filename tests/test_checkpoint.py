"""Checkpoint bookkeeping without ranks: the `latest` pointer, retention, resume lookup, RNG."""

import json
import random

import numpy as np
import pytest
import torch

from grpo_ds.checkpoint import (
    CheckpointError,
    capture_rng,
    find_checkpoint,
    find_resume,
    restore_rng,
)
from grpo_ds.checkpoint_files import (
    STATE_FILE,
    latest_name,
    point_latest,
    prune,
    set_aside_newer,
    step_name,
    trim_metrics,
)


def make_step(root, step, complete=True):
    path = root / step_name(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if complete:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_point_latest_replaces_the_name_and_leaves_no_temporary(tmp_path):
    point_latest(tmp_path, "step_000002")
    point_latest(tmp_path, "step_000004")
    assert latest_name(tmp_path) == "step_000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_prune_keeps_the_newest_complete_and_never_the_future(tmp_path):
    for step in (1, 2, 4, 5, 7):
        make_step(tmp_path, step)
    make_step(tmp_path, 3, complete=False)  # a failed save's leftovers
    point_latest(tmp_path, step_name(5))
    prune(tmp_path, keep_last=2, current=5)
    # complete and <= 5: 1, 2, 4, 5 -> keep the last two (4, 5); 3 is incomplete and older;
    # 7 is newer than the current step, so it is not ours to delete.
    assert sorted(p.name for p in tmp_path.glob("step_??????")) == [
        "step_000004", "step_000005", "step_000007"]


def test_prune_with_keep_last_zero_keeps_every_complete_checkpoint(tmp_path):
    for step in (1, 2, 3):
        make_step(tmp_path, step)
    prune(tmp_path, keep_last=0, current=3)
    assert len(list(tmp_path.glob("step_*"))) == 3


def test_find_resume(tmp_path):
    root = tmp_path / "checkpoints"
    assert find_resume(None, root) is None
    assert find_resume("auto", root) is None  # nothing yet: start fresh
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_resume("latest", root)
    make_step(root, 2)
    make_step(root, 4, complete=False)
    point_latest(root, step_name(2))
    assert find_resume("auto", root) == root / "step_000002"
    assert find_resume("latest", root) == root / "step_000002"
    # A run directory, a checkpoints directory and a step directory all name it.
    assert find_checkpoint(tmp_path) == find_checkpoint(root) == root / "step_000002"
    with pytest.raises(CheckpointError, match="not a complete"):
        find_resume(str(root / "step_000004"), root)


def test_set_aside_newer_moves_the_abandoned_future_and_repoints_latest(tmp_path):
    for step in (2, 4):
        make_step(tmp_path, step)
    point_latest(tmp_path, step_name(4))
    set_aside_newer(tmp_path, 2, log=lambda message: None)
    assert latest_name(tmp_path) == "step_000002"
    assert [p.name for p in tmp_path.glob("step_??????")] == ["step_000002"]
    assert len(list(tmp_path.glob("step_000004.abandoned-*"))) == 1
    set_aside_newer(tmp_path, 0, log=lambda message: None)  # a fresh start
    assert latest_name(tmp_path) is None


def test_trim_metrics_drops_lines_past_the_checkpoint(tmp_path):
    lines = [{"step": s, "loss": 0.1 * s} for s in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    trim_metrics(tmp_path, 2)
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in kept] == [0, 1, 2]


def test_rng_states_round_trip():
    np.random.standard_normal()  # leaves a cached Gaussian, part of numpy's state too
    state = json.loads(json.dumps(capture_rng()))  # as the per-rank JSON file stores them
    first = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move on
    restore_rng(state)
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == first


def test_cli_refuses_resume_latest_without_a_checkpoint_before_launching(tmp_path, capsys):
    from grpo_ds.cli import main

    assert main(["train", "--resume=latest", f"--output.run_dir={tmp_path}"]) == 2
    assert "checkpoint.resume=latest: no checkpoint" in capsys.readouterr().err


def test_abandoned_checkpoints_count_against_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        make_step(tmp_path, step)
    point_latest(tmp_path, step_name(4))
    set_aside_newer(tmp_path, 1, lambda _msg: None)  # a resume from step 1: 2..4 set aside
    assert len(list(tmp_path.glob("step_*.abandoned-*"))) == 3
    make_step(tmp_path, 2)
    prune(tmp_path, keep_last=3, current=2)  # only 2 of the run's own: the abandoned stay
    assert len(list(tmp_path.glob("step_*.abandoned-*"))) == 3
    make_step(tmp_path, 3)
    prune(tmp_path, keep_last=3, current=3)  # 3 of its own: the abandoned go
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_000001", "step_000002", "step_000003"]


def test_abandoned_checkpoints_are_kept_with_keep_last_zero(tmp_path):
    for step in (1, 2):
        make_step(tmp_path, step)
    set_aside_newer(tmp_path, 1, lambda _msg: None)
    make_step(tmp_path, 2)
    prune(tmp_path, keep_last=0, current=2)
    assert len(list(tmp_path.glob("step_*.abandoned-*"))) == 1
