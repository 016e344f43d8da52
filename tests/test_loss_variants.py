"""Loss variants: GSPO / GSPO-token, CISPO, dual clip, TIS/MIS, bnpo.

Hand-worked numbers are derived in the comments next to them. `peer_loss` is an independent
per-token loop of the published formulas (TRL's grpo_trainer `_compute_loss`, verl's
core_algos `compute_policy_loss_{vanilla,gspo,cispo}`), checked in value and gradient.
"""

import math

import pytest
import torch

from grpo_ds.loss import grpo_loss, merge_loss_metrics

F64 = torch.float64


def grad_of(policy, *args, **kw):
    policy = policy.clone().requires_grad_(True)
    loss, metrics = grpo_loss(policy, *args, **kw)
    (grad,) = torch.autograd.grad(loss, policy)
    return loss.item(), grad, metrics


# --- GSPO ------------------------------------------------------------------------------------
# One sequence, log-ratios [.3, -.1] (old = 0, policy = the log-ratios), A = +1, eps .2.
# GSPO: s = exp(mean(.3, -.1)) = e^.1 = 1.105171 inside [.8, 1.2]: every token's loss is -s, the
#   grpo mean is -s; ds/dp_t = s / 2, so the gradient is -s/2 = -.552585 on both tokens.
# token level: r = [e^.3 = 1.349859 (clipped high: gradient 0), e^-.1 = .904837]:
#   loss -(1.2 + .904837) / 2, gradient [0, -.904837 / 2].
S = math.exp(0.1)


def test_gspo_sequence_ratio_by_hand():
    policy, old = torch.tensor([[0.3, -0.1]], dtype=F64), torch.zeros(1, 2, dtype=F64)
    adv, mask = torch.ones(1, dtype=F64), torch.ones(1, 2)
    value, grad, metrics = grad_of(policy, old, None, adv, mask, ratio_level="sequence")
    assert value == pytest.approx(-S)
    torch.testing.assert_close(grad, torch.full((1, 2), -S / 2, dtype=F64))
    assert metrics["ratio/mean"] == pytest.approx(S) and metrics["clip_ratio/high_mean"] == 0
    value, grad, _ = grad_of(policy, old, None, adv, mask)  # token level, for contrast
    assert value == pytest.approx(-(1.2 + math.exp(-0.1)) / 2)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -math.exp(-0.1) / 2]], dtype=F64))


def test_gspo_clips_the_whole_sequence():
    # log-ratios [.5, .3]: s = e^.4 = 1.4918 > 1.2 with A > 0: loss -1.2, no gradient at all,
    # although token 1 alone (e^.3 = 1.35) and the pair's mean are what decide, not each token.
    policy = torch.tensor([[0.5, 0.3]], dtype=F64)
    value, grad, metrics = grad_of(policy, torch.zeros(1, 2, dtype=F64), None,
                                   torch.ones(1, dtype=F64), torch.ones(1, 2),
                                   ratio_level="sequence")
    assert value == pytest.approx(-1.2)
    assert (grad == 0).all() and metrics["clip_ratio/high_mean"] == 1.0


@pytest.mark.parametrize("level, want_grad", [
    # per-token advantages [1, -2] on log-ratios [.3, -.1]; s = e^.1 inside the clip range.
    # value (both): tokens -s * 1 and +2s, mean s/2 = .552585.
    # GSPO-token: token t's gradient is -A_t s / 2: [-s/2, +s].
    ("sequence_token", [-S / 2, S]),
    # GSPO: d/dp_t of mean_t(-A_t s) = -(A_0 + A_1) / 2 * s / 2 = s / 4 on both tokens.
    ("sequence", [S / 4, S / 4]),
])
def test_gspo_token_differs_only_with_token_advantages(level, want_grad):
    policy, old = torch.tensor([[0.3, -0.1]], dtype=F64), torch.zeros(1, 2, dtype=F64)
    adv = torch.tensor([[1.0, -2.0]], dtype=F64)
    value, grad, _ = grad_of(policy, old, None, adv, torch.ones(1, 2), ratio_level=level)
    assert value == pytest.approx(S / 2)
    torch.testing.assert_close(grad, torch.tensor([want_grad], dtype=F64))


def test_gspo_token_equals_gspo_for_sequence_advantages():
    policy, old, ref, _, adv, mask = random_step()
    for aggregation in ("grpo", "token_mean"):
        kw = {"beta": 0.05, "aggregation": aggregation, "epsilon_high": 0.28}
        a = grad_of(policy, old, ref, adv, mask, ratio_level="sequence", **kw)
        b = grad_of(policy, old, ref, adv, mask, ratio_level="sequence_token", **kw)
        assert a[0] == pytest.approx(b[0], abs=1e-12)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-12)


# --- CISPO -----------------------------------------------------------------------------------
# ratios [1.5, .5, 1.1], policy log-probs p = [-1, -2, -.5] (old = p - log r), A = +2,
# clip range [.8, 1.28] -> weights sg[.] = [1.28, .8, 1.1].
# loss_t = -w A p = [2.56, 3.2, 1.1]; token_mean 6.86 / 3 = 2.286667.
# gradient -w A / 3 = [-2.56, -1.6, -2.2] / 3: token 0 keeps a gradient although clipped.
def test_cispo_by_hand():
    p = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    old = p - torch.tensor([[1.5, 0.5, 1.1]], dtype=F64).log()
    value, grad, metrics = grad_of(p, old, None, torch.tensor([2.0], dtype=F64), torch.ones(1, 3),
                                   policy_loss="cispo", epsilon_high=0.28,
                                   aggregation="token_mean")
    assert value == pytest.approx(6.86 / 3)
    torch.testing.assert_close(grad, torch.tensor([[-2.56, -1.6, -2.2]], dtype=F64) / 3)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 3)  # weight capped, grad kept
    assert metrics["clip_ratio/low_mean"] == pytest.approx(1 / 3)


# --- dual clip -------------------------------------------------------------------------------
# A = -1, ratios [4, 2, .5], eps .2, c = 3. PPO: loss_t = max(r, clip(r)) = [4, 2, .8];
# dual clip caps it at c |A| = 3: [3, 2, .8], token_mean 5.8 / 3.
# gradient (d loss_t / d log pi = r on the unclipped branch): [0 (capped), 2, 0 (clipped)] / 3.
def test_dual_clip_by_hand():
    p = torch.tensor([[4.0, 2.0, 0.5]], dtype=F64).log()
    kw = {"aggregation": "token_mean"}
    args = (torch.zeros(1, 3, dtype=F64), None, torch.tensor([-1.0], dtype=F64), torch.ones(1, 3))
    value, grad, metrics = grad_of(p, *args, clip_ratio_c=3.0, **kw)
    assert value == pytest.approx(5.8 / 3)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0, 0.0]], dtype=F64) / 3)
    assert metrics["clip_ratio/dual_mean"] == pytest.approx(1 / 3)
    assert metrics["clip_ratio/region_mean"] == pytest.approx(2 / 3)
    value, grad, _ = grad_of(p, *args, **kw)  # without it, ratio 4 pushes with gradient 4
    assert value == pytest.approx(6.8 / 3)
    torch.testing.assert_close(grad, torch.tensor([[4.0, 2.0, 0.0]], dtype=F64) / 3)


# --- TIS / MIS -------------------------------------------------------------------------------
# mu = 1 (trainer ratio 1), A = +1, trainer/sampler ratios exp(old - sampled) = [3, 1.5, .5],
# cap 2. Per-token loss -w (r = 1), token_mean = -sum(w) / 3, gradient -w / 3.
#   token_truncate w = [2, 1.5, .5]    token_mask w = [0, 1.5, .5]
#   sequence: the product 3 * 1.5 * .5 = 2.25 > 2 -> truncate w = 2 on every token, mask w = 0.
TIS_CASES = {
    "token_truncate": ([2.0, 1.5, 0.5], 1 / 3, 5 / 3, 4 / 3),
    "token_mask": ([0.0, 1.5, 0.5], 1 / 3, 5 / 3, 2 / 3),
    "sequence_truncate": ([2.0, 2.0, 2.0], 1.0, 2.25, 2.0),
    "sequence_mask": ([0.0, 0.0, 0.0], 1.0, 2.25, 0.0),
}


@pytest.mark.parametrize("mode", TIS_CASES)
def test_rollout_correction_by_hand(mode):
    weights, capped, ratio_mean, weight_mean = TIS_CASES[mode]
    p = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    sampled = p - torch.tensor([[3.0, 1.5, 0.5]], dtype=F64).log()
    value, grad, metrics = grad_of(p, None, None, torch.ones(1, dtype=F64), torch.ones(1, 3),
                                   aggregation="token_mean", sampled_logprobs=sampled,
                                   importance_sampling=mode, importance_sampling_cap=2.0)
    w = torch.tensor([weights], dtype=F64)
    assert value == pytest.approx(-w.sum().item() / 3)
    torch.testing.assert_close(grad, -w / 3)
    assert metrics["importance_sampling/capped_fraction"] == pytest.approx(capped)
    assert metrics["importance_sampling/ratio_mean"] == pytest.approx(ratio_mean)
    assert metrics["importance_sampling/weight_mean"] == pytest.approx(weight_mean)


def test_rollout_correction_leaves_the_kl_term_alone():
    # A = 0: only beta * KL is left, and the weights (here all 0, masked) must not touch it.
    p = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    loss, _ = grpo_loss(p, None, ref, torch.zeros(1, dtype=F64), torch.ones(1, 2), beta=0.1,
                        sampled_logprobs=p - 5.0, importance_sampling="token_mask")
    assert loss.item() == pytest.approx(0.1 * (math.exp(-0.5) - 0.5 + math.e - 2) / 2)


# --- bnpo ------------------------------------------------------------------------------------
def test_bnpo_is_a_mean_of_micro_batch_token_means():
    # test_loss.hand_batch: row sums -8.26 (4 tokens) and 3.2 (3 tokens), clip [.8, 1.28].
    # One call over both rows: (-8.26 + 3.2) / 7. Two micro-batches of one row each, counted as
    # 2: (-8.26 / 4) / 2 + (3.2 / 3) / 2 = -.49916667: the split changes the loss (TRL's bnpo).
    from tests.test_loss import hand_batch

    policy, old, adv, mask = hand_batch()
    kw = {"epsilon_high": 0.28, "aggregation": "bnpo"}
    whole, _ = grpo_loss(policy, old, None, adv, mask, **kw)
    assert whole.item() == pytest.approx((-8.26 + 3.2) / 7)
    halves = [grpo_loss(policy[r], old[r], None, adv[r], mask[r], num_micro_batches=2, **kw)[0]
              for r in (slice(0, 1), slice(1, 2))]
    assert sum(h.item() for h in halves) == pytest.approx(-8.26 / 8 + 3.2 / 6)


# --- every variant against the peer formula, as a per-token loop -----------------------------
def random_step(seed=0):
    """8 sequences, T = 7, uneven lengths (one empty), float64, ratios and rollout gaps mixed."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 3, 0, 5, 2, 6, 4])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    policy = -torch.rand(8, 7, generator=g, dtype=F64) * 3
    old = policy + torch.randn(8, 7, generator=g, dtype=F64) * 0.6  # ratios ~ 0.3 .. 3
    ref = policy + torch.randn(8, 7, generator=g, dtype=F64) * 0.5
    sampled = old + torch.randn(8, 7, generator=g, dtype=F64) * 0.5
    adv = torch.randn(8, generator=g, dtype=F64)
    return policy, old, ref, sampled, adv, mask


def peer_loss(policy, old, ref, sampled, adv, mask, *, policy_loss="clip", ratio_level="token",
              clip_ratio_c=None, importance_sampling="none", importance_sampling_cap=2.0,
              epsilon_low=0.2, epsilon_high=0.28, beta=0.0, aggregation="grpo",
              max_completion_length=7):
    """The published formulas token by token (TRL _compute_loss, verl compute_policy_loss_*)."""
    lo, hi, cap = 1 - epsilon_low, 1 + epsilon_high, importance_sampling_cap
    rows = []
    for i in range(policy.shape[0]):
        ts = [t for t in range(policy.shape[1]) if mask[i, t]]
        seq_log = sum((policy[i, t] - old[i, t] for t in ts), torch.tensor(0.0, dtype=F64))
        seq_log = seq_log / max(len(ts), 1)
        seq_is = sum((old[i, t] - sampled[i, t] for t in ts), torch.tensor(0.0, dtype=F64))
        terms = []
        for t in ts:
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            if ratio_level == "token":
                r = torch.exp(policy[i, t] - old[i, t])
            elif ratio_level == "sequence":
                r = torch.exp(seq_log)
            else:  # GSPO-token: sg[s_i] * pi_t / sg[pi_t]
                r = torch.exp(seq_log).detach() * torch.exp(policy[i, t] - policy[i, t].detach())
            rc = torch.clamp(r, lo, hi)
            if policy_loss == "cispo":
                term = -rc.detach() * a * policy[i, t]
            else:
                term = -torch.min(r * a, rc * a)
                if clip_ratio_c is not None and a < 0:
                    term = torch.min(term, -clip_ratio_c * a)
            if importance_sampling != "none":
                w = torch.exp((seq_is if importance_sampling.startswith("sequence")
                               else old[i, t] - sampled[i, t]).detach())
                if importance_sampling.endswith("truncate"):
                    w = torch.clamp(w, max=cap)
                elif w > cap:
                    w = w * 0
                term = term * w
            if beta:
                d = ref[i, t] - policy[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        rows.append(terms)
    n_tokens = sum(len(r) for r in rows)
    if aggregation == "grpo":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    if aggregation == "token_mean":
        return sum(sum(r) for r in rows) / n_tokens
    return sum(sum(r) for r in rows) / (len(rows) * max_completion_length)  # dr_grpo


VARIANTS = {
    "gspo": {"ratio_level": "sequence"},
    "gspo_token": {"ratio_level": "sequence_token"},
    "cispo": {"policy_loss": "cispo", "epsilon_low": 1.0, "epsilon_high": 4.0},
    "cispo_clipped": {"policy_loss": "cispo"},
    "dual_clip": {"clip_ratio_c": 1.5},
    "tis_token": {"importance_sampling": "token_truncate", "importance_sampling_cap": 1.5},
    "mis_token": {"importance_sampling": "token_mask", "importance_sampling_cap": 1.5},
    "tis_sequence": {"importance_sampling": "sequence_truncate", "importance_sampling_cap": 1.5},
    "mis_sequence": {"importance_sampling": "sequence_mask", "importance_sampling_cap": 1.5},
    "gspo_cispo_tis": {"ratio_level": "sequence", "policy_loss": "cispo",
                       "importance_sampling": "token_truncate"},
}


@pytest.mark.parametrize("aggregation", ["grpo", "token_mean", "dr_grpo"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_the_peer_formula(variant, aggregation):
    policy, old, ref, sampled, adv, mask = random_step()
    kw = {"epsilon_high": 0.28, "beta": 0.05, "aggregation": aggregation, **VARIANTS[variant]}
    value, grad, metrics = grad_of(policy, old, ref, adv, mask, sampled_logprobs=sampled,
                                   max_completion_length=7, **kw)
    peer_policy = policy.clone().requires_grad_(True)
    peer = peer_loss(peer_policy, old, ref, sampled, adv, mask, **kw)
    (peer_grad,) = torch.autograd.grad(peer, peer_policy)
    assert abs(value - peer.item()) < 1e-6
    assert (grad - peer_grad).abs().max().item() < 1e-6
    assert grad.abs().max() > 1e-3  # a real gradient
    if "clip_ratio_c" in kw:
        assert metrics["clip_ratio/dual_mean"] > 0  # the dual clip is exercised
    if "importance_sampling" in kw:
        assert 0 < metrics["importance_sampling/capped_fraction"] < 1  # some capped, not all


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_micro_batches_sum_to_the_whole_step(variant):
    policy, old, ref, sampled, adv, mask = random_step(1)
    kw = {"epsilon_high": 0.28, "beta": 0.05, "aggregation": "token_mean", **VARIANTS[variant]}
    whole_value, whole_grad, whole_metrics = grad_of(policy, old, ref, adv, mask,
                                                     sampled_logprobs=sampled, **kw)
    split = policy.clone().requires_grad_(True)
    total, parts = 0.0, []
    for rows in (slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 8)):
        loss, metrics = grpo_loss(split[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                  sampled_logprobs=sampled[rows], num_sequences=8,
                                  num_tokens=int(mask.sum()), **kw)
        loss.backward()
        total += loss.item()
        parts.append(metrics)
    torch.testing.assert_close(split.grad, whole_grad)
    assert total == pytest.approx(whole_value)
    merged = merge_loss_metrics(parts)
    assert merged.keys() == whole_metrics.keys()
    for key, value in whole_metrics.items():
        assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_variant_argument_errors():
    policy, old, ref, sampled, adv, mask = random_step()
    bad = [({"ratio_level": "seq"}, "ratio_level"), ({"policy_loss": "ppo"}, "policy_loss"),
           ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
           ({"clip_ratio_c": 3.0, "policy_loss": "cispo"}, "dual clip"),
           ({"importance_sampling": "token"}, "importance_sampling"),
           ({"importance_sampling": "token_mask", "importance_sampling_cap": 0.5}, "cap")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            grpo_loss(policy, old, ref, adv, mask, sampled_logprobs=sampled, **kw)
    with pytest.raises(ValueError, match="sampled_logprobs"):
        grpo_loss(policy, old, ref, adv, mask, importance_sampling="token_truncate")
