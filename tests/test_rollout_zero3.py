"""HybridRollout under real 2-rank ZeRO-3 (deepspeed launcher, CPU, gloo): ~40 s per launch.

One launch of tests/scripts/rollout_zero3.py runs every phase; the tests below read its facts.
A hang (ranks out of lockstep) shows up as the subprocess timeout, with the last printed PHASE.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "rollout_zero3.py")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("rollout_zero3") / "facts.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT,
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        phases = [l for l in (exc.stdout or b"").decode().splitlines() if "PHASE" in l]
        pytest.fail(f"2-rank rollout hung; completed phases: {phases}")
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        pytest.fail(f"2-rank rollout script failed with exit code {proc.returncode}")
    return json.loads(out.read_text())


@pytest.mark.multirank
def test_layer_groups_full_gather_and_plain_model_sample_identical_tokens(facts):
    for name in ("full", "layers1", "layers2", "auto"):
        assert facts[f"same_tokens_{name}_equal"], name
        assert facts[f"same_tokens_{name}_logprob_diff"] < 1e-5, name
    assert facts["same_tokens_full_mode"] == "full"
    assert facts["same_tokens_layers1_mode"] == "layers"
    assert facts["ranks_differ"]  # each rank sampled its own prompts


@pytest.mark.multirank
def test_ranks_finishing_at_different_lengths_do_not_hang(facts):
    rank0, rank1 = facts["uneven_full"]
    assert set(rank0["lengths"]) == {2} and set(rank1["lengths"]) == {48}
    assert rank0["forwards"] == 2 and rank1["forwards"] == 48  # full gather: no lockstep needed
    for key in ("uneven_layers", "uneven_layers_empty"):
        rank0, rank1 = facts[key]
        assert set(rank1["lengths"]) == {48}
        assert rank0["forwards"] == rank1["forwards"] == 48  # layer groups: lockstep
    assert facts["uneven_layers_empty"][0]["lengths"] == []  # a rank with no prompts joined in


@pytest.mark.multirank
def test_ranks_with_different_numbers_of_passes_do_not_hang(facts):
    # max_batch_rows=6 holds 2 groups of 3: rank 0's 5 prompts take 3 passes, rank 1's 1 prompt 1
    rank0, rank1 = facts["passes_full"]
    assert (rank0["passes"], rank1["passes"]) == (3, 1)  # full gather: passes run no collectives
    assert (rank0["rows"], rank1["rows"]) == (15, 3)
    for key in ("passes_layers", "passes_layers_empty"):
        rank0, rank1 = facts[key]
        assert rank0["passes"] == rank1["passes"] == 3, key  # layer groups: agreed, padded
        assert rank0["forwards"] == rank1["forwards"], key  # lockstep inside every pass
    empty = facts["passes_layers_empty"]
    assert (empty[0]["rows"], empty[1]["rows"]) == (0, 15)  # rank 0 joined 3 passes empty
    for key in ("passes_full", "passes_layers", "passes_layers_empty"):
        for rank in facts[key]:
            assert rank["equal"] and rank["logprob_diff"] < 1e-5, key  # as one pass returns


@pytest.mark.multirank
def test_auto_mode_follows_the_budget(facts):
    assert facts["auto_no_budget"] == "full"
    assert facts["auto_big_budget"] == "full"
    assert facts["auto_small_budget"] == "layers"
    # budget = half the model: embeddings + head are ~50% of this tiny model, so 1 layer/group
    assert facts["same_tokens_auto_mode"] == "layers" and facts["auto_layers_per_group"] >= 1


@pytest.mark.multirank
def test_engine_trains_after_generation(facts):
    assert facts["train_mode_restored"]
    assert facts["all_partitioned"]  # gathered weights were released
    assert facts["train_loss_finite"]


@pytest.mark.multirank
def test_packed_copies_stand_in_for_the_gathered_linears(facts):
    assert facts["packed_linears_partitioned"] and facts["packed_others_gathered"]
    assert facts["packed_bytes"] == facts["linear_weight_bytes"] > 0
