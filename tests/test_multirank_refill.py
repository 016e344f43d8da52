"""grpo.refill_max_rounds under the real 2-rank ZeRO-3 engine (deepspeed launcher, CPU, gloo):
ranks that need different numbers of refill rounds run the same number of generations, and
neither hangs (a hang is the launch's timeout). The script scripts each rank's ties by its
reward-call count; see tests/scripts/refill_zero3.py."""

import json

import pytest

from tests.multirank import launch

pytestmark = pytest.mark.multirank


def test_ranks_needing_different_refill_rounds_run_the_same_rounds(tmp_path):
    launch("refill_zero3.py", str(tmp_path), timeout=400)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    step1 = [r["steps"][0] for r in ranks]
    step2 = [r["steps"][1] for r in ranks]
    # Step 1: rank 0 tied in round 0 and round 1, was full after round 2; rank 1 was full at
    # once and joined both rounds with a throw-away generation: 3 generate calls each.
    assert [s["generate_calls"] for s in step1] == [3, 3]
    for s in step1:
        assert s["refill/rounds"] == 2.0 and s["refill/prompts_sampled"] == 4.0
        assert s["refill/missing_groups"] == 0.0 and s["refill/tied_fraction"] == 0.5
        assert s["rows"] == s["trained_rows"] == 8 and s["filtered_groups_fraction"] == 0.0
    assert step1[0]["rewards"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # round 2's groups
    # Step 2: rank 1 tied in every round and ran out of its 3; rank 0 idled through them.
    assert [s["generate_calls"] for s in step2] == [4, 4]
    for s in step2:
        assert s["refill/rounds"] == 3.0 and s["refill/prompts_sampled"] == 6.0
        assert s["refill/missing_groups"] == 2.0 and s["refill/tied_fraction"] == 0.8
        assert s["rows"] == 8 and s["filtered_groups_fraction"] == 0.5
    assert [s["trained_rows"] for s in step2] == [8, 0]  # rank 1 trains on nothing it has
