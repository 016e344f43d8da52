"""How the trainer turns rewards into advantages: outcome, process supervision, tied-group
filtering and KL-in-reward, on hand-worked numbers (pure; no engine)."""

import math

import pytest
import torch

from grpo_ds.batch import RolloutBatch
from grpo_ds.config import load_config
from grpo_ds.trainer import score_advantages


def batch(rows: int, length: int, **fields) -> RolloutBatch:
    return RolloutBatch(
        input_ids=torch.zeros(rows, length + 1, dtype=torch.long),
        attention_mask=torch.ones(rows, length + 1, dtype=torch.long),
        completion_ids=torch.zeros(rows, length, dtype=torch.long),
        completion_mask=torch.ones(rows, length), sampled_logprobs=torch.zeros(rows, length), **fields)


def test_outcome_advantages_per_group():
    cfg = load_config(None, ["--rollout.group_size=2"])
    b = batch(4, 3)
    scored = score_advantages(cfg, b, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    # Group 1: mean 0.5, sample std sqrt(0.5) = 0.7071 -> +-0.7071; group 2 ties -> 0.
    assert scored.advantages.tolist() == pytest.approx([0.7070, -0.7070, 0.0, 0.0], abs=1e-3)
    assert b.advantages is None  # a value is returned; the batch is left as it was


def test_process_supervision_sums_normalised_step_rewards_from_t_on():
    cfg = load_config(None, ["--rollout.group_size=2", "--grpo.process_reward=x:y"])
    b = batch(2, 3, process_steps=[[(0, 1.0), (2, 0.0)], [(1, 0.0)]])
    scored = score_advantages(cfg, b, torch.tensor([1.0, 0.0]))
    # Steps of the group: [1, 0, 0]: mean 1/3, sample std sqrt(1/3) = 0.5774.
    # Normalised: 1 -> 1.1547, 0 -> -0.5774. Token t sums the steps that end at or after t.
    hi, lo = (2 / 3) / math.sqrt(1 / 3), -(1 / 3) / math.sqrt(1 / 3)
    expected = [[hi + lo, lo, lo], [lo, lo, 0.0]]
    assert scored.advantages.tolist() == [pytest.approx(r, abs=1e-3) for r in expected]


def test_filtering_tied_groups_masks_them_out_and_logs_the_fraction():
    cfg = load_config(None, ["--rollout.group_size=2", "--grpo.filter_tied_groups=true"])
    b = batch(4, 2)
    scored = score_advantages(cfg, b, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert scored.metrics["filtered_groups_fraction"].value == 0.5
    assert scored.metrics["filtered_groups_fraction"].reduce == "mean"
    assert scored.completion_mask.sum(1).tolist() == [2.0, 2.0, 0.0, 0.0]
    assert b.completion_mask.sum().item() == 8  # the sampled mask is left as it was


def test_kl_in_reward_lowers_the_reward_of_the_sample_that_drifted():
    cfg = load_config(None, ["--rollout.group_size=2", "--grpo.kl_in_reward=true",
                             "--grpo.beta=1.0", "--grpo.kl_estimator=k1"])
    b = batch(2, 2, ref_logprobs=torch.zeros(2, 2))
    b.sampled_logprobs = torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # k1 sums: 1.0 and 0.0
    scored = score_advantages(cfg, b, torch.tensor([1.0, 1.0]))
    # Rewards become [0, 1]: the drifted sample gets the negative advantage.
    assert scored.advantages.tolist() == pytest.approx([-0.7070, 0.7070], abs=1e-3)


def test_summary_is_strict_json_with_null_where_there_is_no_value():
    import json

    from grpo_ds.train import strict_json

    summary = {"accuracy_before": float("nan"), "accuracy_after": 0.5, "steps": 2,
               "eval_curve": [{"step": 0, "accuracy": float("nan")}], "warmup_curve": None}
    text = json.dumps(strict_json(summary), allow_nan=False)
    assert json.loads(text) == {"accuracy_before": None, "accuracy_after": 0.5, "steps": 2,
                                "eval_curve": [{"step": 0, "accuracy": None}],
                                "warmup_curve": None}
