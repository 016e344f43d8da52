"""Group advantages, reward combination, tied-group filter, process supervision, KL-in-reward.

Every expected number is worked out by hand in the comment above it.
"""

import math

import pytest
import torch

from grpo_ds.advantages import (
    combine_rewards,
    group_advantages,
    kl_reward_penalty,
    process_advantages,
    tied_group_mask,
)

NAN = float("nan")
EPS = 1e-4

# Two groups of G = 4: A = [1, 0, 0, 0], B = [0, 0, 2, 2].
# A: mean 0.25, deviations [.75, -.25, -.25, -.25], squared sum .5625 + 3 * .0625 = .75
#    sample var .75 / 3 = .25 -> std .5;  population var .75 / 4 = .1875
# B: mean 1, deviations [-1, -1, 1, 1], squared sum 4
#    sample var 4 / 3;  population var 4 / 4 = 1 -> std 1
REWARDS = torch.tensor([1.0, 0, 0, 0, 0, 0, 2, 2], dtype=torch.float64)
DEV_A = [0.75, -0.25, -0.25, -0.25]
DEV_B = [-1.0, -1.0, 1.0, 1.0]


def expected(dev_a, std_a, dev_b, std_b):
    return torch.tensor([d / (std_a + EPS) for d in dev_a] + [d / (std_b + EPS) for d in dev_b],
                        dtype=torch.float64)


def test_group_scale_sample_std():
    adv, metrics = group_advantages(REWARDS, 4)
    torch.testing.assert_close(adv, expected(DEV_A, 0.5, DEV_B, math.sqrt(4 / 3)))
    assert metrics["reward"] == pytest.approx(5 / 8)  # (1 + 2 + 2) / 8
    assert metrics["reward_std"] == pytest.approx((0.5 + math.sqrt(4 / 3)) / 2)
    assert metrics["frac_reward_zero_std"] == 0.0


def test_group_scale_population_std():
    adv, _ = group_advantages(REWARDS, 4, std="population")
    torch.testing.assert_close(adv, expected(DEV_A, math.sqrt(0.1875), DEV_B, 1.0))


def test_batch_scale_uses_batch_std_and_group_mean():
    # All 8 rewards: mean 5/8 = .625; squared deviations: one 1 -> .375^2 = .140625,
    # five 0s -> 5 * .625^2 = 1.953125, two 2s -> 2 * 1.375^2 = 3.78125; sum 5.875.
    # sample var 5.875 / 7, population var 5.875 / 8. The mean subtracted stays per group.
    adv, metrics = group_advantages(REWARDS, 4, scale="batch")
    std = math.sqrt(5.875 / 7)
    torch.testing.assert_close(adv, expected(DEV_A, std, DEV_B, std))
    assert metrics["reward_std"] == pytest.approx(std)
    adv, _ = group_advantages(REWARDS, 4, scale="batch", std="population")
    std = math.sqrt(5.875 / 8)
    torch.testing.assert_close(adv, expected(DEV_A, std, DEV_B, std))


def test_no_scale_is_dr_grpo_mean_subtraction_only():
    adv, _ = group_advantages(REWARDS, 4, scale="none")
    torch.testing.assert_close(adv, torch.tensor(DEV_A + DEV_B, dtype=torch.float64))


def test_eps_bounds_the_scaling():
    # Group [0, 0, 0, 1e-6]: mean 2.5e-7, deviation of the last 7.5e-7, sample std 5e-7.
    # Without eps the advantage would be 1.5; eps=1e-4 keeps it ~ 7.5e-7 / 1.005e-4 = 7.46e-3.
    adv, _ = group_advantages(torch.tensor([0, 0, 0, 1e-6], dtype=torch.float64), 4)
    assert adv[3].item() == pytest.approx(7.5e-7 / (5e-7 + 1e-4))


def test_nan_rewards_are_left_out_not_counted_as_zero():
    # Group A = [1, nan, 0, 0]: valid [1, 0, 0], mean 1/3, deviations [2/3, -1/3, -1/3],
    # squared sum 4/9 + 1/9 + 1/9 = 2/3, sample var (2/3) / 2 = 1/3.
    # (Counting the NaN as 0 would give mean 1/4, i.e. different numbers.)
    # Group B = [3, nan, nan, nan]: a single valid reward -> all 0, counted as a tied group.
    rewards = torch.tensor([1, NAN, 0, 0, 3, NAN, NAN, NAN], dtype=torch.float64)
    adv, metrics = group_advantages(rewards, 4)
    s = math.sqrt(1 / 3) + EPS
    torch.testing.assert_close(
        adv, torch.tensor([2 / 3 / s, 0, -1 / 3 / s, -1 / 3 / s, 0, 0, 0, 0], dtype=torch.float64))
    assert metrics["reward"] == pytest.approx(4 / 4)  # valid rewards 1, 0, 0, 3
    assert metrics["frac_reward_zero_std"] == 0.5


def test_all_nan_group_gives_zero_not_nan():
    adv, metrics = group_advantages(torch.tensor([NAN, NAN, 1.0, 0.0]), 2)
    assert adv.tolist()[:2] == [0.0, 0.0]
    assert not torch.isnan(adv).any()
    assert metrics["frac_reward_zero_std"] == 0.5


def test_tied_group_is_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in float: without the tie rule the group would get ~1e-13, not 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.0])
    for scale in ("group", "batch", "none"):
        adv, metrics = group_advantages(rewards, 3, scale=scale)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
        assert metrics["frac_reward_zero_std"] == 0.5


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 4, scale="global")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 4, std="biased")


def test_combine_rewards_weights_and_none():
    # weights [1, .5]: row 0 -> 1*1 (fmt None) = 1; row 1 -> .5 + .5*2 = 1.5;
    # row 2 -> every function None -> NaN; row 3 -> 0 + .5*1 = .5.
    # acc values [1, .5, 0]: mean .5, deviations [.5, 0, -.5], sample var .5 / 2 -> std .5.
    # fmt values [2, 1]: mean 1.5, deviations [.5, -.5], sample var .5 / 1 -> std sqrt(.5).
    per_func = torch.tensor([[1, NAN], [0.5, 2], [NAN, NAN], [0, 1]], dtype=torch.float64)
    total, metrics = combine_rewards(per_func, [1.0, 0.5], names=["acc", "fmt"])
    torch.testing.assert_close(total, torch.tensor([1, 1.5, NAN, 0.5], dtype=torch.float64),
                               equal_nan=True)
    assert metrics == pytest.approx({"rewards/acc/mean": 0.5, "rewards/acc/std": 0.5,
                                     "rewards/fmt/mean": 1.5, "rewards/fmt/std": math.sqrt(0.5)})


def test_combine_rewards_default_names_and_empty_function():
    per_func = torch.tensor([[1.0, NAN], [3.0, NAN]])
    total, metrics = combine_rewards(per_func, torch.tensor([2.0, 1.0]))
    assert total.tolist() == [2.0, 6.0]
    assert metrics["rewards/0/mean"] == 2.0 and metrics["rewards/0/std"] == pytest.approx(
        math.sqrt(2.0))  # deviations [-1, 1], sample var 2
    assert math.isnan(metrics["rewards/1/mean"]) and metrics["rewards/1/std"] == 0.0
    with pytest.raises(ValueError):
        combine_rewards(per_func, [1.0])


def test_tied_group_mask_and_fraction():
    # group 0: valid [1, 1, 1] tie; group 1: [0, 1, 0, 0] does not; group 2: all None -> tied.
    rewards = torch.tensor([1, 1, NAN, 1, 0, 1, 0, 0, NAN, NAN, NAN, NAN])
    keep, metrics = tied_group_mask(rewards, 4)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)
    _, adv_metrics = group_advantages(rewards, 4)
    assert adv_metrics["frac_reward_zero_std"] == metrics["frac_reward_zero_std"]


def test_process_supervision_by_hand():
    # One group (G = 2), T = 6.
    # completion 0: step rewards [1, 0] ending at tokens [1, 4]
    # completion 1: step rewards [0, 1, 1] ending at tokens [0, 2, 5]
    # all steps [1, 0, 0, 1, 1]: mean .6, deviations [.4, -.6, -.6, .4, .4],
    # squared sum 3 * .16 + 2 * .36 = 1.2, sample var 1.2 / 4 = .3; s = sqrt(.3) + eps.
    # completion 0: tokens 0-1 see both steps (.4 - .6) / s = -.2/s, tokens 2-4 see the second
    #   -.6/s, token 5 is after the last step end -> 0.
    # completion 1: token 0 sees all three (-.6 + .4 + .4) / s = .2/s, tokens 1-2 see the last
    #   two .8/s, tokens 3-5 the last one .4/s.
    adv, metrics = process_advantages([[1, 0], [0, 1, 1]], [[1, 4], [0, 2, 5]], 2, 6,
                                      dtype=torch.float64)
    s = math.sqrt(0.3) + EPS
    want = torch.tensor([[-0.2, -0.2, -0.6, -0.6, -0.6, 0.0],
                         [0.2, 0.8, 0.8, 0.4, 0.4, 0.4]], dtype=torch.float64) / s
    torch.testing.assert_close(adv, want)
    assert metrics["step_reward"] == pytest.approx(0.6)
    assert metrics["step_reward_std"] == pytest.approx(math.sqrt(0.3))
    assert metrics["steps_per_completion"] == 2.5
    assert metrics["frac_reward_zero_std"] == 0.0


def test_process_supervision_groups_are_normalised_separately():
    # Group 0: steps [2, 0] (one per completion), ends [0, 0]: mean 1, deviations [1, -1],
    # population var 1 -> [1, -1] / (1 + eps) on token 0 only (T = 2, token 1 is after the end).
    # Group 1: steps [5, 5] tie -> 0; the third completion has no steps at all.
    adv, metrics = process_advantages([[2], [0], [5, 5], []], [[0], [0], [0, 1], []], 2, 2,
                                      std="population", dtype=torch.float64)
    c = 1 / (1 + EPS)
    torch.testing.assert_close(
        adv, torch.tensor([[c, 0], [-c, 0], [0, 0], [0, 0]], dtype=torch.float64))
    assert metrics["frac_reward_zero_std"] == 0.5


def test_process_supervision_nan_step_is_left_out():
    # steps [1, nan] and [0]: valid [1, 0], mean .5, deviations [.5, -.5], sample var .5.
    # completion 0, T = 3: the NaN step (ending at 2) adds nothing; tokens 0-1 get .5/s.
    adv, _ = process_advantages([[1, NAN], [0]], [[1, 2], [0]], 2, 3, dtype=torch.float64)
    s = math.sqrt(0.5) + EPS
    torch.testing.assert_close(
        adv, torch.tensor([[0.5 / s, 0.5 / s, 0], [-0.5 / s, 0, 0]], dtype=torch.float64))


def test_process_supervision_rejects_bad_steps():
    with pytest.raises(ValueError):
        process_advantages([[1.0], [0.0]], [[6], [0]], 2, 6)  # end outside the completion
    with pytest.raises(ValueError):
        process_advantages([[1.0, 2.0], [0.0]], [[1], [0]], 2, 6)  # lengths differ


def test_kl_reward_penalty_by_hand():
    # token 2 is padding (its garbage -inf must not matter).
    # k1 = old - ref = [-1 + 1.5, -2 + 2] = [.5, 0] -> sum .5, times beta .1 = .05.
    # k3 with log_r = ref - old = [-.5, 0]: e^-.5 + .5 - 1 = .10653066 and 0 -> times .1.
    old = torch.tensor([[-1.0, -2.0, -float("inf")]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    penalty = kl_reward_penalty(old, ref, mask, 0.1)
    assert penalty.tolist() == pytest.approx([0.05])
    penalty = kl_reward_penalty(old, ref, mask, 0.1, estimator="k3")
    assert penalty.tolist() == pytest.approx([0.1 * (math.exp(-0.5) - 0.5)])
    # Folded into rewards before normalisation: r' = r - penalty.
    rewards = torch.tensor([1.0, 1.0], dtype=torch.float64)
    penalty = kl_reward_penalty(old.repeat(2, 1), ref.repeat(2, 1),
                                torch.tensor([[1, 1, 0], [0, 1, 0]]), 0.1)
    assert (rewards - penalty).tolist() == pytest.approx([0.95, 1.0])
