"""GRPO loss: clipped surrogate, KL estimators, aggregations, gradients, split invariance.

Hand-worked numbers are derived in the comments next to them.
"""

import math

import pytest
import torch

from grpo_ds.advantages import group_advantages
from grpo_ds.loss import LossSettings, grpo_loss, merge_loss_metrics, per_token_kl

F64 = torch.float64


def hand_batch():
    """2 sequences, T = 4, old log-probs 0 so ratio = exp(policy) is chosen directly.

    row 0, A = +2, ratios [1.5, .5, 1.1, 1.25], all 4 tokens valid
    row 1, A = -1, ratios [1.5, .5, .9, .7], last token is padding
    """
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.25], [1.5, 0.5, 0.9, 0.7]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    return ratios.log(), torch.zeros_like(ratios), torch.tensor([2.0, -1.0], dtype=F64), mask


# Clip-higher, eps_low .2, eps_high .28 -> clip range [.8, 1.28].
# row 0 (A = 2): min(r*A, clip(r)*A) = 2 * min(r, clip(r)) = 2 * [1.28, .5, 1.1, 1.25]
#   = [2.56, 1, 2.2, 2.5]; token 0 is clipped on the high side. Per-token loss = -that, sum -8.26.
# row 1 (A = -1): -max(r, clip(r)) = -[1.5, .8, .9]; token 1 (r = .5 < .8) is clipped on the low
#   side. Per-token loss [1.5, .8, .9], sum 3.2.
ROW_SUMS, ROW_LENS = (-8.26, 3.2), (4, 3)


@pytest.mark.parametrize("aggregation, want", [
    ("grpo", (-8.26 / 4 + 3.2 / 3) / 2),      # mean of per-sequence means = -.49916667
    ("token_mean", (-8.26 + 3.2) / 7),        # 7 valid tokens: -.72285714
    ("bnpo", (-8.26 + 3.2) / 7),              # alias of token_mean
    ("dr_grpo", (-8.26 + 3.2) / (2 * 4)),     # N * max_completion_length = 8: -.6325
])
def test_clip_higher_loss_by_hand(aggregation, want):
    policy, old, adv, mask = hand_batch()
    loss, metrics = grpo_loss(policy, old, None, adv, mask, epsilon_low=0.2, epsilon_high=0.28,
                              aggregation=aggregation, max_completion_length=4)
    assert loss.item() == pytest.approx(want)
    assert metrics["loss"] == pytest.approx(want)
    assert metrics["token_count"] == 7 and metrics["sequence_count"] == 2
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 7)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 7)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 7)
    # ratios of valid tokens: 1.5 + .5 + 1.1 + 1.25 + 1.5 + .5 + .9 = 7.25 (the masked .7 is out)
    assert metrics["ratio/mean"] == pytest.approx(7.25 / 7)
    assert (metrics["ratio/min"], metrics["ratio/max"]) == pytest.approx((0.5, 1.5))
    # token advantages: four 2s and three -1s: mean 5/7, E[a^2] = 19/7, var 19/7 - 25/49 = 108/49
    assert metrics["advantage/mean"] == pytest.approx(5 / 7)
    assert metrics["advantage/std"] == pytest.approx(math.sqrt(108) / 7)
    assert "kl" not in metrics


def test_symmetric_clip_is_the_default():
    # epsilon_high=None -> .2: row 0 ratios 1.5 and 1.25 both clip to 1.2 -> 2.4 each,
    # row 0 sum -(2.4 + 1 + 2.2 + 2.4) = -8.0; row 1 unchanged 3.2 (low bound is .8 in both cases).
    policy, old, adv, mask = hand_batch()
    loss, metrics = grpo_loss(policy, old, None, adv, mask, aggregation="token_mean")
    assert loss.item() == pytest.approx((-8.0 + 3.2) / 7)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(2 / 7)


# policy [-1, -2], ref [-1.5, -1] -> log_r = ref - policy = [-.5, 1]
# k1 = -log_r = [.5, -1];  k2 = log_r^2 / 2 = [.125, .5];
# k3 = e^log_r - log_r - 1 = [e^-.5 - .5, e - 2] = [.10653066, .71828183]
KL_WANT = {"k1": [0.5, -1.0], "k2": [0.125, 0.5], "k3": [math.exp(-0.5) - 0.5, math.e - 2]}


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_by_hand(estimator):
    policy = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    assert per_token_kl(policy, ref, estimator)[0].tolist() == pytest.approx(KL_WANT[estimator])
    # Inside the loss with A = 0 only beta * KL is left: grpo -> beta * mean over the 2 tokens.
    loss, metrics = grpo_loss(policy, None, ref, torch.zeros(1, dtype=F64), torch.ones(1, 2),
                              beta=0.1, kl_estimator=estimator)
    assert loss.item() == pytest.approx(0.1 * sum(KL_WANT[estimator]) / 2)
    assert metrics["kl"] == pytest.approx(sum(KL_WANT[estimator]) / 2)


def test_kl_metric_without_penalty_and_entropy_metric():
    policy = torch.tensor([[-1.0, -2.0, 5.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    entropy = torch.tensor([[1.0, 3.0, 100.0]], dtype=F64)
    loss, metrics = grpo_loss(policy, None, ref, torch.zeros(1, dtype=F64), mask,
                              entropy=entropy)
    assert loss.item() == 0.0  # beta = 0: the reference only feeds the metric
    assert metrics["kl"] == pytest.approx(sum(KL_WANT["k3"]) / 2)
    assert metrics["entropy"] == pytest.approx(2.0)  # (1 + 3) / 2, the padded 100 is out


def test_k3_is_nonnegative_and_zero_at_ref():
    torch.manual_seed(0)
    for dtype in (torch.float32, F64):
        policy = torch.randn(10_000, dtype=dtype) * 5
        far = policy + torch.randn(10_000, dtype=dtype) * 30  # includes |log_r| > 20 (clamped)
        near = policy + torch.randn(10_000, dtype=dtype) * 1e-7  # where exp(x) - x - 1 cancels
        for ref in (far, near):
            assert (per_token_kl(policy, ref, "k3") >= 0).all()
        assert (per_token_kl(policy, policy.clone(), "k3") == 0).all()
    # Why expm1: the textbook form goes below 0 in float32 near log_r = 0.
    x = near.float() - policy.float()
    assert (torch.exp(x) - x - 1).min() < 0


def per_token_grad(policy, old, ref, adv, **kw):
    """d(sum of per-token losses)/d policy: token_mean with num_tokens = 1 sums the tokens."""
    policy = policy.clone().requires_grad_(True)
    loss, _ = grpo_loss(policy, old, ref, adv, torch.ones_like(policy), aggregation="token_mean",
                        num_tokens=1, **kw)
    (grad,) = torch.autograd.grad(loss, policy)
    return grad


def test_clipped_surrogate_gradient_closed_form():
    # ratios inside (1.1, .9) and outside (1.5, .5) the clip range [.8, 1.2], for A = +-1.5.
    # d(-min(r A, clip(r) A))/d log pi = -A r where the unclipped branch is the min, else 0:
    # A > 0: r = 1.5 clipped -> 0, r = .5 not (r A < clip A) -> -A r;  A < 0: r = .5 clipped -> 0.
    ratios = torch.tensor([[1.5, 1.1, 0.9, 0.5], [1.5, 1.1, 0.9, 0.5]], dtype=F64)
    adv = torch.tensor([1.5, -1.5], dtype=F64)
    grad = per_token_grad(ratios.log(), torch.zeros_like(ratios), None, adv)
    a = 1.5
    want = torch.tensor([[0, -a * 1.1, -a * 0.9, -a * 0.5],
                         [a * 1.5, a * 1.1, a * 0.9, 0]], dtype=F64)
    torch.testing.assert_close(grad, want)


def test_clipped_surrogate_gradcheck():
    ratios = torch.tensor([[1.5, 1.1, 0.9, 0.5], [1.5, 1.1, 0.9, 0.5]], dtype=F64)
    adv = torch.tensor([[1.5, -0.5, 2.0, 1.0], [-1.5, 0.5, -2.0, -1.0]], dtype=F64)  # [N, T]
    ref = torch.full_like(ratios, -0.3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    for agg in ("grpo", "token_mean", "dr_grpo"):
        def f(policy, agg=agg):
            return grpo_loss(policy, torch.zeros_like(policy), ref, adv, mask, beta=0.04,
                             aggregation=agg, max_completion_length=6)[0]
        assert torch.autograd.gradcheck(f, (ratios.log().requires_grad_(True),))


@pytest.mark.parametrize("estimator, closed_form", [
    ("k1", lambda p, r: torch.ones_like(p)),
    ("k2", lambda p, r: p - r),
    ("k3", lambda p, r: 1 - torch.exp(r - p)),
])
def test_kl_gradients_closed_form(estimator, closed_form):
    torch.manual_seed(1)
    policy = torch.randn(3, 5, dtype=F64) - 2
    ref = torch.randn(3, 5, dtype=F64) - 2
    adv = torch.zeros(3, dtype=F64)  # leaves only the KL term
    grad = per_token_grad(policy, None, ref, adv, beta=1.0, kl_estimator=estimator)
    torch.testing.assert_close(grad, closed_form(policy, ref))
    assert torch.autograd.gradcheck(
        lambda p: per_token_kl(p, ref, estimator), (policy.clone().requires_grad_(True),))


def test_k3_saturates_beyond_the_clamp():
    # log_r = 25 > 20: value expm1(20) - 20, gradient 0 (documented trade-off for finiteness).
    policy = torch.tensor([[-30.0]], dtype=F64)
    ref = torch.tensor([[-5.0]], dtype=F64)
    assert per_token_kl(policy, ref, "k3").item() == pytest.approx(math.expm1(20) - 20)
    grad = per_token_grad(policy, None, ref, torch.zeros(1, dtype=F64), beta=1.0)
    assert grad.item() == 0.0


def random_step(seed=0, dtype=torch.float32):
    """8 sequences, T = 7, uneven lengths (one empty), random log-probs and advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 3, 0, 5, 2, 6, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    policy = -torch.rand(8, 7, generator=g, dtype=dtype) * 3
    old = policy + torch.randn(8, 7, generator=g, dtype=dtype) * 0.3  # some tokens get clipped
    ref = policy + torch.randn(8, 7, generator=g, dtype=dtype) * 0.5
    adv = torch.randn(8, generator=g, dtype=dtype)
    return policy, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["grpo", "token_mean", "dr_grpo"])
def test_micro_batches_sum_to_the_whole_step(aggregation):
    policy, old, ref, adv, mask = random_step()
    kw = {"epsilon_high": 0.28, "beta": 0.05, "aggregation": aggregation,
          "max_completion_length": 7}

    whole_policy = policy.clone().requires_grad_(True)
    whole_loss, whole_metrics = grpo_loss(whole_policy, old, ref, adv, mask, **kw)
    whole_loss.backward()

    split_policy = policy.clone().requires_grad_(True)
    total, parts = 0.0, []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 8)):  # 4 uneven micro-batches
        loss, metrics = grpo_loss(split_policy[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                  num_sequences=8, num_tokens=int(mask.sum()), **kw)
        loss.backward()
        total += loss.item()
        parts.append(metrics)
    assert whole_metrics["clip_ratio/region_mean"] > 0  # the clip branch is exercised
    torch.testing.assert_close(split_policy.grad, whole_policy.grad, rtol=1e-5, atol=1e-7)
    assert total == pytest.approx(whole_loss.item(), rel=1e-5)
    merged = merge_loss_metrics(parts)
    assert merged.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert merged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_local_token_counts_would_break_the_invariance():
    # Control for the test above: dividing each micro-batch by its own token count is what other
    # trainers got wrong, and it does change the step's gradient.
    policy, old, ref, adv, mask = random_step()
    whole = policy.clone().requires_grad_(True)
    grpo_loss(whole, old, ref, adv, mask, aggregation="token_mean")[0].backward()
    split = policy.clone().requires_grad_(True)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 8)):
        grpo_loss(split[rows], old[rows], ref[rows], adv[rows], mask[rows],
                  aggregation="token_mean")[0].backward()
    assert not torch.allclose(split.grad, whole.grad, rtol=1e-3)


def test_mu_1_loss_is_zero_but_gradient_is_not():
    # old_logprobs=None: ratio == 1 in value, so each sequence's mean surrogate is A_i and
    # grpo loss = -(1/N) sum_i A_i = 0 for group-normalised advantages. The gradient is
    # d loss / d policy[i, t] = -A_i / (|o_i| * N) on valid tokens.
    torch.manual_seed(2)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5])
    adv, _ = group_advantages(rewards, 4)
    lengths = torch.tensor([5, 1, 3, 6, 2, 6, 4, 3])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    policy = (-torch.rand(8, 6) * 3).requires_grad_(True)
    loss, metrics = grpo_loss(policy, None, None, adv, mask)
    assert abs(loss.item()) < 1e-6
    assert metrics["ratio/min"] == metrics["ratio/max"] == 1.0
    loss.backward()
    want = -adv[:, None] / (lengths[:, None] * 8) * mask
    torch.testing.assert_close(policy.grad, want)
    assert policy.grad.abs().max() > 1e-3


def test_padding_garbage_and_empty_sequences_give_no_nan():
    policy, old, ref, adv, mask = random_step()
    pad = mask == 0
    policy = policy.masked_fill(pad, float("nan")).requires_grad_(True)
    old = old.masked_fill(pad, float("inf"))
    ref = ref.masked_fill(pad, -float("inf"))
    for agg in ("grpo", "token_mean", "dr_grpo"):
        loss, metrics = grpo_loss(policy, old, ref, adv, mask, beta=0.1, aggregation=agg,
                                  max_completion_length=7)
        (grad,) = torch.autograd.grad(loss, policy)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[pad] == 0).all()
        assert all(math.isfinite(v) for v in metrics.values())
    # A micro-batch that holds only an empty sequence contributes exactly 0.
    loss, metrics = grpo_loss(policy[3:4], old[3:4], ref[3:4], adv[3:4], mask[3:4], beta=0.1,
                              num_sequences=8, num_tokens=28)
    assert loss.item() == 0.0 and metrics["token_count"] == 0


def test_argument_errors():
    policy, old, ref, adv, mask = random_step()
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(policy, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(policy, old, ref, adv, mask, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(policy, old, ref, adv, mask, aggregation="seq_mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(policy, old, ref, adv, mask, beta=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(policy, old, ref, adv[:3], mask)


def test_loss_settings_are_checked_when_made_and_named():
    assert LossSettings(epsilon_low=0.3).epsilon_high == 0.3  # symmetric clip unless told
    assert LossSettings(epsilon_low=0.2, epsilon_high=0.28).epsilon_high == 0.28
    with pytest.raises(ValueError, match="aggregation"):
        LossSettings(aggregation="seq_mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        LossSettings(clip_ratio_c=0.5)
    policy, old, ref, adv, mask = random_step()
    with pytest.raises(TypeError, match="betta"):  # a misspelt setting is an error, not ignored
        grpo_loss(policy, old, ref, adv, mask, betta=0.1)
