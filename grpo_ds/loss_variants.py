"""The policy-loss variants `grpo_loss` composes: ratio level, per-token objective, rollout correction.

All tensors [N, T] (N sequences, T padded length), padded positions already zeroed by the caller;
log_r_t = policy_logprobs - old_logprobs, |o_i| = completion length of sequence i.

Importance ratio (`ratio_level`):
    "token"           rho_{i,t} = exp(log_r_t)                                  GRPO / PPO
    "sequence"        s_i = exp(1/|o_i| sum_t log_r_t), one ratio per sequence  GSPO (Zheng et al.
                      2025, arXiv:2507.18071; TRL importance_sampling_level="sequence")
    "sequence_token"  s_{i,t} = sg[s_i] * pi_t / sg[pi_t]: the value of s_i, the gradient of
                      token t alone                                             GSPO-token (same
                      paper; verl's "gspo" loss). Equal to GSPO in value and gradient when A is
                      per sequence; differs only for per-token advantages (process supervision).

Per-token objective (`policy_loss`), with r the ratio above and clip(r) = clip(r, 1-eps_lo, 1+eps_hi):
    "clip"   loss_t = -min(r A, clip(r) A)                                 PPO / GRPO surrogate
             dual clip (`clip_ratio_c` = c > 1; Ye et al. 2019, arXiv:1912.09729, as verl):
             for A < 0, loss_t = min(-min(r A, clip(r) A), -c A): a ratio above c stops pushing.
    "cispo"  loss_t = -sg[clip(r)] A log pi_t                              CISPO (MiniMax-M1,
             arXiv:2506.13585; verl's "cispo"): every token keeps a gradient, its weight clipped.
             MiniMax sets no lower bound (eps_lo >= 1) and a wide upper one (TRL suggests a cap
             of 5, eps_hi = 4).

Rollout correction (`importance_sampling`): the sampler's log-probs (sampled_logprobs, from the
rollout engine) differ from the trainer's pi_old (kernels, dtype, an external engine). TIS/MIS
weight the policy-gradient term by the detached ratio w = pi_old / pi_sampler (Yao et al. 2025,
"Your efficient RL framework secretly brings you off-policy RL training"; TRL's
vllm_importance_sampling_mode, verl's rollout correction):
    "token_truncate"     w_t = min(exp(old_t - sampled_t), C)               TIS
    "token_mask"         w_t = exp(old_t - sampled_t), 0 where it exceeds C  MIS
    "sequence_truncate"  w_i = min(exp(sum_t (old_t - sampled_t)), C)       per sequence (a product)
    "sequence_mask"      w_i = exp(sum_t (old_t - sampled_t)), 0 where it exceeds C
"""

from __future__ import annotations

import math

import torch

RATIO_LEVELS = ("token", "sequence", "sequence_token")
POLICY_LOSSES = ("clip", "cispo")
IMPORTANCE_SAMPLING = ("none", "token_truncate", "token_mask", "sequence_truncate",
                       "sequence_mask")

# Only for the logged raw rollout ratio: a sequence's log-ratio is a sum over its tokens and can
# exceed float32's exp range. The applied weights never exponentiate above log(C).
_METRIC_LOG_RATIO_LIMIT = 20.0


def importance_log_ratio(policy: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
                         level: str) -> torch.Tensor:
    """log of the importance ratio: [N, T] for "token" and "sequence_token", [N, 1] for "sequence"."""
    log_r = policy - old
    if level == "token":
        return log_r
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # an empty sequence: ratio 1
    seq = torch.where(mask, log_r, 0.0).sum(dim=1, keepdim=True) / lengths  # [N, 1]
    if level == "sequence":
        return seq
    return seq.detach() + policy - policy.detach()  # sequence_token


def policy_token_loss(ratio: torch.Tensor, policy: torch.Tensor, adv: torch.Tensor,
                      policy_loss: str, epsilon_low: float, epsilon_high: float,
                      clip_ratio_c: float | None) -> torch.Tensor:
    """Per-token policy-gradient loss [N, T] (to minimise); ratio may be [N, 1] (broadcast)."""
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    if policy_loss == "cispo":
        return -clipped.detach() * adv * policy
    loss = -torch.minimum(ratio * adv, clipped * adv)
    if clip_ratio_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -clip_ratio_c * adv), loss)
    return loss


def clip_flags(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, policy_loss: str,
               epsilon_low: float, epsilon_high: float, clip_ratio_c: float | None):
    """(low, high, dual) [N, T] bool: tokens where a clip is active.

    "clip": low = A < 0 and r < 1 - eps_lo, high = A > 0 and r > 1 + eps_hi (their gradient is 0);
    dual = A < 0 and r > c. "cispo": low / high = the weight is clipped (the gradient stays).
    """
    below, above = ratio < 1.0 - epsilon_low, ratio > 1.0 + epsilon_high
    if policy_loss == "cispo":
        return below & mask, above & mask, torch.zeros_like(mask)
    dual = (adv < 0) & (ratio > clip_ratio_c) if clip_ratio_c is not None else torch.zeros_like(mask)
    return below & (adv < 0) & mask, above & (adv > 0) & mask, dual & mask


@torch.no_grad()
def rollout_correction(old: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached TIS/MIS weights ([N, T] or [N, 1]) and their raw sums for the metrics.

    old: the trainer's log pi_old; sampled: the sampler's log-probs of the same tokens.
    Sums (over tokens for token modes, over non-empty sequences for sequence modes):
    "importance_sampling/count", "/ratio_sum" (raw ratio, log clamped at +-20), "/weight_sum"
    (the applied weight) and "/capped_sum" (ratios above the cap: truncated or masked).
    """
    log_w = torch.where(mask, old - sampled, 0.0)
    units = mask
    if mode.startswith("sequence"):
        log_w = log_w.sum(dim=1, keepdim=True)  # the product of the token ratios
        units = mask.any(dim=1, keepdim=True)
    log_cap = math.log(cap)
    capped = log_w > log_cap
    weight = torch.exp(log_w.clamp(max=log_cap))  # min(ratio, C) without overflow
    if mode.endswith("mask"):
        weight = torch.where(capped, 0.0, weight)
    raw = torch.exp(log_w.clamp(-_METRIC_LOG_RATIO_LIMIT, _METRIC_LOG_RATIO_LIMIT))
    sums = {
        "importance_sampling/count": units.sum(),
        "importance_sampling/ratio_sum": torch.where(units, raw, 0.0).sum(),
        "importance_sampling/weight_sum": torch.where(units, weight, 0.0).sum(),
        "importance_sampling/capped_sum": (capped & units).sum(),
    }
    return weight, sums


def check_variant_args(policy_loss: str, ratio_level: str, clip_ratio_c: float | None,
                       importance_sampling: str, importance_sampling_cap: float) -> None:
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {policy_loss!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (a cap on the ratio for A < 0), "
                         f"got {clip_ratio_c}")
    if clip_ratio_c is not None and policy_loss != "clip":
        raise ValueError(f"clip_ratio_c (dual clip) applies to policy_loss='clip' only, "
                         f"got {policy_loss!r}")
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, "
                         f"got {importance_sampling!r}")
    if not importance_sampling_cap >= 1.0:
        raise ValueError(f"importance_sampling_cap must be >= 1, got {importance_sampling_cap}")
