"""The GRPO policy loss (DeepSeekMath, Shao et al. 2024, eq. 3) with its common variants.

Per completion token t of completion o_i (all tensors [N, T], N sequences, T padded length):

    rho_t     = exp(policy_logprobs - old_logprobs)                       (pi_theta / pi_old)
    surrogate = min(rho_t * A, clip(rho_t, 1 - epsilon_low, 1 + epsilon_high) * A)
    loss_t    = -surrogate + beta * KL_t                                  KL_t ~ KL(pi_theta || pi_ref)

KL estimators (Schulman, "Approximating KL divergence"), with log_r = ref_logprobs - policy_logprobs:
    k1 = -log_r                  unbiased, can be negative per token
    k2 = 0.5 * log_r**2          biased, >= 0
    k3 = exp(log_r) - log_r - 1  unbiased, >= 0 (the paper's choice and our default)

The surrogate above is the default variant. GSPO's sequence-level ratio, CISPO, dual clip and the
TIS/MIS rollout correction are in loss_variants.py, with their formulas and papers.

Aggregation over the tokens of ONE optimizer step (all ranks, all accumulation micro-batches):
    "grpo"        1/num_sequences * sum_i (1/|o_i| sum_t loss_t)       (paper: 1/G sum_i 1/|o_i| sum_t)
    "token_mean"  1/num_tokens * sum_{i,t} loss_t                      (DAPO; TRL's "dapo")
    "dr_grpo"     1/(num_sequences * max_completion_length) * sum_{i,t} loss_t   (Dr. GRPO)
    "bnpo"        1/num_micro_batches * sum_b (1/tokens_b sum_{(i,t) in b} loss_t)   (TRL's "bnpo")
A call sees one micro-batch but divides by the step's GLOBAL counts, so summing the returned losses
over micro-batches and ranks gives the step's loss, however the step was split. "bnpo" alone is a
mean of per-micro-batch token means, as TRL defines it: it DOES depend on the split
(train.micro_batch_size, ranks); token_mean is its split-invariant form.

With mu = 1 (old_logprobs=None) rho is exactly 1 in value but still carries the gradient, so the
loss value of group-normalised advantages is 0 while its gradient is not ("loss is 0" is expected).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from grpo_ds.loss_variants import (
    check_variant_args,
    clip_flags,
    importance_log_ratio,
    policy_token_loss,
    rollout_correction,
)

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("grpo", "token_mean", "bnpo", "dr_grpo")

# k3 needs exp(log_r). |log_r| > 20 means one policy is e^20 ~ 5e8 times likelier than the other on
# that token: the run is already broken there, and we prefer a finite, saturated value (gradient 0
# for that token) over inf/NaN reaching the optimizer. Inside the range k3 is exact.
K3_LOG_RATIO_LIMIT = 20.0

# Mean metrics: mean key -> (the summed key, the summed count it is divided by).
_IS = "importance_sampling"
_MEAN_OF_SUM = {
    "kl": ("kl/sum", "token_count"),
    "entropy": ("entropy/sum", "token_count"),
    "clip_ratio/low_mean": ("clip_ratio/low_sum", "token_count"),
    "clip_ratio/high_mean": ("clip_ratio/high_sum", "token_count"),
    "clip_ratio/region_mean": ("clip_ratio/region_sum", "token_count"),
    "clip_ratio/dual_mean": ("clip_ratio/dual_sum", "token_count"),
    "ratio/mean": ("ratio/sum", "token_count"),
    "advantage/mean": ("advantage/sum", "token_count"),
    f"{_IS}/ratio_mean": (f"{_IS}/ratio_sum", f"{_IS}/count"),
    f"{_IS}/weight_mean": (f"{_IS}/weight_sum", f"{_IS}/count"),
    f"{_IS}/capped_fraction": (f"{_IS}/capped_sum", f"{_IS}/count"),
}
_SUMMED = ("loss", "token_count", "sequence_count", "advantage/sq_sum", f"{_IS}/count",
           *(sum_key for sum_key, _ in _MEAN_OF_SUM.values()))


def per_token_kl(
    policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs, same shape.

    Gradients wrt policy_logprobs: k1 -> 1, k2 -> policy - ref, k3 -> 1 - exp(ref - policy)
    (k3: 0 where |ref - policy| > K3_LOG_RATIO_LIMIT, see the constant).
    """
    log_r = ref_logprobs - policy_logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        log_r = log_r.clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
        # expm1(x) - x rather than exp(x) - x - 1: no cancellation near 0, so never below 0.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


@dataclass(frozen=True)
class LossSettings:
    """The loss's hyperparameters, the same for every micro-batch of a run (config: grpo.*).
    `grpo_loss` takes them by name; they are checked when made."""

    epsilon_low: float = 0.2  # clip range below 1 (PPO's epsilon)
    epsilon_high: float | None = None  # clip range above 1 (DAPO's clip-higher); None: epsilon_low
    beta: float = 0.0  # KL coefficient; ref_logprobs may be None only when it is 0
    kl_estimator: str = "k3"  # KL_ESTIMATORS, see per_token_kl
    aggregation: str = "grpo"  # AGGREGATIONS, see the module docstring
    max_completion_length: int | None = None  # dr_grpo's constant normaliser (required for it)
    policy_loss: str = "clip"  # "clip" | "cispo" (loss_variants.py)
    ratio_level: str = "token"  # "token" | "sequence" | "sequence_token" (loss_variants.py)
    clip_ratio_c: float | None = None  # dual clip's cap on the ratio for A < 0; None = off
    # rollout correction (TIS/MIS): "none", "token_truncate", "token_mask", "sequence_truncate",
    # "sequence_mask"; its weight multiplies the policy term, not the KL term
    importance_sampling: str = "none"
    importance_sampling_cap: float = 2.0

    def __post_init__(self):
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon_low)
        _check_settings(self)
        check_variant_args(self.policy_loss, self.ratio_level, self.clip_ratio_c,
                           self.importance_sampling, self.importance_sampling_cap)


def grpo_loss(policy_logprobs: torch.Tensor, old_logprobs: torch.Tensor | None,
              ref_logprobs: torch.Tensor | None, advantages: torch.Tensor,
              completion_mask: torch.Tensor, *, num_sequences: int | None = None,
              num_tokens: int | None = None, num_micro_batches: int | None = None,
              entropy: torch.Tensor | None = None, sampled_logprobs: torch.Tensor | None = None,
              **settings) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss of one micro-batch, scaled as its share of the whole optimizer step.

    policy_logprobs [N, T]: log pi_theta of the sampled tokens (carries the gradient).
    old_logprobs [N, T] or None: log pi_old at sampling time; None means mu = 1 (ratio == 1).
    ref_logprobs [N, T] or None: log pi_ref; with beta == 0 it feeds the "kl" metric only.
    advantages [N] (outcome, broadcast over tokens) or [N, T] (process supervision); detached.
    completion_mask [N, T]: 1 for completion tokens, 0 for padding. Values at padded positions are
        ignored, even NaN/inf, and sequences with no tokens add 0 (no NaN).
    num_sequences, num_tokens: GLOBAL counts of the optimizer step (all ranks and micro-batches);
        None means this call is the whole step. num_micro_batches: "bnpo" only (None = 1).
    entropy [N, T] or None: per-token entropy, for the "entropy" metric only.
    sampled_logprobs [N, T] or None: the sampler's log-probs, for importance_sampling.
    **settings: LossSettings' fields by name (epsilon_low=0.2, beta=0.04, aggregation=...).

    Returns (loss: 0-dim tensor, metrics: dict of python floats, see `_loss_metrics`).
    """
    s = LossSettings(**settings)
    _check_tensors(policy_logprobs, advantages, completion_mask, ref_logprobs, sampled_logprobs, s)
    mask = completion_mask.bool()
    dtype = torch.promote_types(policy_logprobs.dtype, torch.float32)

    def valid(x: torch.Tensor) -> torch.Tensor:
        # Zero padded positions BEFORE any exp, so garbage there cannot make inf/NaN (or NaN grads).
        return torch.where(mask, x.to(dtype), 0.0)

    policy = valid(policy_logprobs)
    old = policy.detach() if old_logprobs is None else valid(old_logprobs)
    adv = advantages.detach().to(dtype)
    adv = valid(adv[:, None].expand_as(policy) if adv.dim() == 1 else adv)

    # [N, T], or [N, 1] at the sequence level; exactly 1 in value when old is None
    ratio = torch.exp(importance_log_ratio(policy, old, mask, s.ratio_level))
    per_token = policy_token_loss(ratio, policy, adv, s.policy_loss, s.epsilon_low,
                                  s.epsilon_high, s.clip_ratio_c)
    is_sums = None
    if s.importance_sampling != "none":
        weight, is_sums = rollout_correction(old.detach(), valid(sampled_logprobs), mask,
                                             s.importance_sampling, s.importance_sampling_cap)
        per_token = per_token * weight
    kl = None if ref_logprobs is None else per_token_kl(policy, valid(ref_logprobs),
                                                         s.kl_estimator)
    if s.beta != 0.0:
        per_token = per_token + s.beta * kl
    per_token = torch.where(mask, per_token, 0.0)

    loss = _aggregate(per_token, mask, s.aggregation, num_sequences, num_tokens,
                      num_micro_batches, s.max_completion_length)
    flags = clip_flags(ratio.detach(), adv, mask, s.policy_loss, s.epsilon_low, s.epsilon_high,
                       s.clip_ratio_c)
    metrics = _loss_metrics(loss, ratio.detach().expand_as(policy), adv, mask, flags, kl,
                            entropy, is_sums)
    return loss, metrics


def _aggregate(per_token, mask, aggregation, num_sequences, num_tokens, num_micro_batches,
               max_completion_length):
    """Reduce [N, T] per-token losses (0 at padding) to this micro-batch's share of the step."""
    n_seq = float(per_token.shape[0] if num_sequences is None else num_sequences)
    if aggregation == "grpo":
        lengths = mask.sum(dim=1).clamp(min=1)  # empty sequences: 0 / 1 = 0, not NaN
        return (per_token.sum(dim=1) / lengths).sum() / max(n_seq, 1.0)
    if aggregation == "token_mean":
        if num_tokens is None:  # stay on the device: no host sync for the local count
            return per_token.sum() / mask.sum().clamp(min=1)
        return per_token.sum() / max(float(num_tokens), 1.0)
    if aggregation == "bnpo":  # this micro-batch's own token mean, one share of the step
        return per_token.sum() / mask.sum().clamp(min=1) / max(num_micro_batches or 1, 1)
    # dr_grpo: a constant normaliser, so no length bias between short and long completions.
    return per_token.sum() / max(n_seq * max_completion_length, 1.0)


@torch.no_grad()
def _loss_metrics(loss, ratio, adv, mask, flags, kl=None, entropy=None, is_sums=None):
    """Detached metrics over this micro-batch's valid tokens, as python floats.

    Mergeable raw values: "loss" (this micro-batch's share; sums to the step loss), "token_count",
    "sequence_count", every "*/sum" and "*_sum", "advantage/sq_sum" and "importance_sampling/count"
    (add them up), "ratio/min" (take the min) and "ratio/max" (take the max). The means (every
    `_MEAN_OF_SUM` key) and "advantage/std" are derived from those; `merge_loss_metrics`
    recomputes them exactly for several micro-batches or ranks. "kl" is the chosen estimator's
    mean (k3 by default, as TRL logs). "ratio/*" is the ratio the loss used (a GSPO sequence's
    ratio counts once per token). "clip_ratio/low", "high" and "dual" are the token fractions of
    `loss_variants.clip_flags`. "kl", "entropy" and "importance_sampling/*" (the rollout
    correction's count, raw ratio mean, applied weight mean and fraction above the cap) are
    present only when ref_logprobs / entropy / importance_sampling were given.
    """
    low, high, dual = flags
    inf = torch.tensor(math.inf, dtype=ratio.dtype, device=ratio.device)
    raw = {
        "loss": loss.detach(),
        "token_count": mask.sum(),
        "sequence_count": torch.tensor(mask.shape[0], device=mask.device),
        "clip_ratio/low_sum": low.sum(),
        "clip_ratio/high_sum": high.sum(),
        "clip_ratio/region_sum": (low | high | dual).sum(),
        "clip_ratio/dual_sum": dual.sum(),
        "ratio/sum": torch.where(mask, ratio, 0.0).sum(),
        "ratio/min": torch.where(mask, ratio, inf).min() if mask.numel() else inf,
        "ratio/max": torch.where(mask, ratio, -inf).max() if mask.numel() else -inf,
        "advantage/sum": torch.where(mask, adv, 0.0).sum(),
        "advantage/sq_sum": torch.where(mask, adv.square(), 0.0).sum(),
    }
    if kl is not None:
        raw["kl/sum"] = torch.where(mask, kl, 0.0).sum()
    if entropy is not None:
        raw["entropy/sum"] = torch.where(mask, entropy.detach().to(ratio.dtype), 0.0).sum()
    raw.update(is_sums or {})
    # One device->host copy for all values instead of one sync per .item().
    values = torch.stack([v.to(ratio.dtype) for v in raw.values()]).tolist()
    return _with_means(dict(zip(raw, values)))


def merge_loss_metrics(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Combine `grpo_loss` metrics of several micro-batches and/or ranks exactly.

    Sums the summed keys, takes min/max of "ratio/min"/"ratio/max", and recomputes the means, so
    merging the 4 micro-batches of a step gives the same numbers as one call over the whole step.
    Across ranks: gather each rank's (merged) dict, e.g. with all_gather_object, and merge again.
    """
    parts = list(parts)
    merged = {k: sum(p[k] for p in parts) for k in _SUMMED if k in parts[0]}
    merged["ratio/min"] = min(p["ratio/min"] for p in parts)
    merged["ratio/max"] = max(p["ratio/max"] for p in parts)
    return _with_means(merged)


def _with_means(raw: dict[str, float]) -> dict[str, float]:
    count = raw["token_count"]
    out = dict(raw)
    for mean_key, (sum_key, count_key) in _MEAN_OF_SUM.items():
        if sum_key in raw:
            out[mean_key] = raw[sum_key] / raw[count_key] if raw[count_key] else 0.0
    mean_sq = raw["advantage/sq_sum"] / count if count else 0.0
    out["advantage/std"] = math.sqrt(max(mean_sq - out["advantage/mean"] ** 2, 0.0))
    return out


def _check_settings(s: LossSettings) -> None:
    if s.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {s.kl_estimator!r}")
    if s.aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {s.aggregation!r}")
    if s.aggregation == "dr_grpo" and not s.max_completion_length:
        raise ValueError("aggregation='dr_grpo' needs max_completion_length")
    if s.epsilon_low < 0 or s.epsilon_high < 0:
        raise ValueError(f"clip epsilons must be >= 0, got {s.epsilon_low}, {s.epsilon_high}")


def _check_tensors(policy, advantages, mask, ref, sampled, s: LossSettings) -> None:
    if policy.dim() != 2 or mask.shape != policy.shape:
        raise ValueError(f"policy_logprobs and completion_mask must both be [N, T], got "
                         f"{tuple(policy.shape)} and {tuple(mask.shape)}")
    if advantages.shape not in (policy.shape[:1], policy.shape):
        raise ValueError(f"advantages must be [N] or [N, T], got {tuple(advantages.shape)} "
                         f"for logprobs {tuple(policy.shape)}")
    if ref is None and s.beta != 0.0:
        raise ValueError("beta != 0 needs ref_logprobs")
    if s.importance_sampling != "none" and sampled is None:
        raise ValueError(f"importance_sampling={s.importance_sampling!r} needs the sampler's "
                         "log-probs (sampled_logprobs); this rollout backend returns none")
