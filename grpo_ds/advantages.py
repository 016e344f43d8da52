"""Group-relative advantages for GRPO (DeepSeekMath, Shao et al. 2024, sections 4.1.2 and 4.1.3).

GRPO has no value model: the baseline of a completion is the mean reward of the G completions
sampled for the same prompt.

Outcome supervision, every token of completion o_i gets
    A_i = (r_i - mean(r_group)) / (std + eps)
with std the group's ("group"), the whole batch's ("batch"), or no scaling at all ("none", Dr. GRPO).

Process supervision, step j of o_i has reward r_i^j; all steps of the group are normalised together
    r~_i^j = (r_i^j - mean(all steps of the group)) / (std + eps)
and token t gets A_{i,t} = sum of r~_i^j over the steps j that end at or after t.

Layout: rewards [N] with N = num_prompts * G; rows i*G .. (i+1)*G - 1 are one prompt's group.
NaN means "no reward" (a reward function returned None): it is left out of its group's mean and
std (not counted as 0) and its advantage is 0. A group whose valid rewards all tie, including a
group with fewer than 2 valid rewards, carries no signal: its advantages are exactly 0.
Metrics are python floats, named like TRL's ("reward", "reward_std", "frac_reward_zero_std").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grpo_ds.loss import per_token_kl

SCALES = ("group", "batch", "none")
STDS = ("sample", "population")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    std: str = "sample",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Outcome-supervision advantages, rewards [N] (NaN = none) -> (advantages [N], metrics).

    std="sample" (divide by n - 1, torch.std's default) is the default because TRL, OpenRLHF and
    verl all use it, so runs compare with theirs; "population" divides by n. eps = 1e-4 (TRL's
    value) is added to the std, not under a square root: a tied group gives 0 / eps = 0, and a
    near-tied group is amplified at most 1/eps. scale="batch" takes the std of all valid rewards
    of the batch (pass the global batch), the mean stays per group.
    Metrics: "reward" (mean valid reward), "reward_std" (mean group std, or the batch std for
    scale="batch"), "frac_reward_zero_std" (fraction of tied groups).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    grouped = _grouped(rewards, group_size)  # [P, G]
    valid = ~torch.isnan(grouped)
    mean, group_std = _masked_mean_std(grouped, valid, std)  # [P], [P]
    tied = _tied_groups(grouped, valid)  # [P]
    # Tied groups get exactly 0, even where the float mean of equal values is off by an ulp.
    deviation = torch.where(valid & ~tied[:, None], grouped - mean[:, None], 0.0)
    if scale == "group":
        advantages = deviation / (group_std[:, None] + eps)
        reward_std = group_std.mean()
    elif scale == "batch":
        _, batch_std = _masked_mean_std(grouped.reshape(1, -1), valid.reshape(1, -1), std)
        advantages = deviation / (batch_std + eps)
        reward_std = batch_std[0]
    else:
        advantages = deviation
        reward_std = group_std.mean()
    metrics = {
        "reward": _nanmean(grouped).item(),
        "reward_std": reward_std.item(),
        "frac_reward_zero_std": tied.float().mean().item(),
    }
    return advantages.reshape(-1), metrics


def combine_rewards(
    rewards_per_func: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of reward functions, rewards_per_func [N, F] (NaN = None) -> rewards [N].

    A function that returned None for a sample is skipped in that sample's sum; a sample where
    every function returned None gets NaN (so group_advantages leaves it out).
    Metrics "rewards/{name}/mean" and "rewards/{name}/std" (sample std) over each function's
    non-None values, before weighting; name defaults to the column index. A function with no
    values has mean NaN; with fewer than 2 values, std 0.
    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [N, F], got {tuple(rewards_per_func.shape)}")
    n_funcs = rewards_per_func.shape[1]
    w = torch.as_tensor(weights, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    names = [str(i) for i in range(n_funcs)] if names is None else list(names)
    if w.shape != (n_funcs,) or len(names) != n_funcs:
        raise ValueError(f"need {n_funcs} weights and names, got {tuple(w.shape)}, {len(names)}")
    valid = ~torch.isnan(rewards_per_func)
    total = torch.where(valid, rewards_per_func * w, 0.0).sum(dim=1)
    total = torch.where(valid.any(dim=1), total, torch.nan)
    mean, func_std = _masked_mean_std(rewards_per_func.T, valid.T, "sample")  # [F], [F]
    mean = torch.where(valid.any(dim=0), mean, torch.nan)
    metrics = {}
    for name, m, s in zip(names, mean.tolist(), func_std.tolist()):
        metrics[f"rewards/{name}/mean"] = m
        metrics[f"rewards/{name}/std"] = s
    return total, metrics


def tied_group_mask(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO dynamic sampling: keep [N] bool, False for every sample of a group whose valid rewards
    all tie (std 0; also groups with fewer than 2 valid rewards). Their advantages are 0, so they
    only dilute the batch. Metric "frac_reward_zero_std": fraction of groups (= of samples) dropped.
    Ties are exact equality: the filter is for the discrete rewards (0/1 correctness) it targets.
    """
    grouped = _grouped(rewards, group_size)
    tied = _tied_groups(grouped, ~torch.isnan(grouped))  # [P]
    keep = (~tied)[:, None].expand_as(grouped).reshape(-1)
    return keep, {"frac_reward_zero_std": tied.float().mean().item()}


def process_advantages(
    step_rewards: Sequence[Sequence[float]],
    step_ends: Sequence[Sequence[int]],
    group_size: int,
    completion_length: int,
    *,
    eps: float = 1e-4,
    std: str = "sample",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Process-supervision advantages (DeepSeekMath 4.1.3) -> (advantages [N, T], metrics).

    step_rewards[i]: the rewards of completion i's reasoning steps (NaN = none: left out).
    step_ends[i]: the token index (0-based in the completion, inclusive) where each step ends.
    completion_length: T, the padded completion length of the batch.
    Each step reward is normalised by mean/std over ALL steps of the group (std and eps as in
    group_advantages), and token t gets the sum of the normalised rewards of the steps ending at or
    after t; tokens after the last step end get 0. A completion without steps gets 0.
    Metrics: "step_reward" (mean), "step_reward_std" (mean group std), "frac_reward_zero_std",
    "steps_per_completion".
    """
    n = len(step_rewards)
    if len(step_ends) != n or n % group_size:
        raise ValueError(f"need equal-length step lists with N % group_size == 0, got "
                         f"{n} rewards, {len(step_ends)} ends, group_size {group_size}")
    advantages = torch.zeros(n, completion_length, dtype=dtype, device=device)
    all_rewards, group_stds, tied_groups = [], [], []
    for start in range(0, n, group_size):
        rows = range(start, start + group_size)
        rewards, row_of_step, ends = _flatten_steps(step_rewards, step_ends, rows,
                                                    completion_length, dtype, device)
        valid = ~torch.isnan(rewards)
        mean, step_std = _masked_mean_std(rewards[None], valid[None], std)
        tied = _tied_groups(rewards[None], valid[None])[0]
        normalised = torch.where(valid & ~tied, (rewards - mean) / (step_std + eps), 0.0)
        # Put each normalised reward at its step's end token, then a reverse cumulative sum gives
        # every token the sum over the steps that end at or after it.
        per_end = torch.zeros(group_size, completion_length, dtype=dtype, device=device)
        per_end.index_put_((row_of_step, ends), normalised, accumulate=True)
        advantages[start:start + group_size] = per_end.flip(-1).cumsum(-1).flip(-1)
        all_rewards.append(rewards)
        group_stds.append(step_std[0])
        tied_groups.append(tied)
    flat = torch.cat(all_rewards)
    metrics = {
        "step_reward": _nanmean(flat).item() if flat.numel() else float("nan"),
        "step_reward_std": torch.stack(group_stds).mean().item(),
        "frac_reward_zero_std": torch.stack(tied_groups).float().mean().item(),
        "steps_per_completion": flat.numel() / n,
    }
    return advantages, metrics


@torch.no_grad()
def kl_reward_penalty(
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """PPO-style KL in the reward (InstructGPT; DeepSeekMath eq. 2): penalty [N] = beta * sum_t KL_t.

    The alternative to GRPO's KL term in the loss: subtract it from the reward BEFORE group
    normalisation, r_i' = r_i - penalty_i, and run the loss with beta = 0. KL_t is estimated at the
    sampled tokens from the sampling policy's log-probs (old_logprobs [N, T]) and the reference's
    (ref_logprobs [N, T]); k1 = log pi_old/pi_ref is PPO's per-token penalty, summed undiscounted
    over the completion's tokens (completion_mask [N, T]). No gradient: it is part of the reward.
    """
    mask = completion_mask.bool()
    old = torch.where(mask, old_logprobs, 0.0)
    ref = torch.where(mask, ref_logprobs, 0.0)
    return beta * torch.where(mask, per_token_kl(old, ref, estimator), 0.0).sum(dim=1)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    return rewards.reshape(-1, group_size)


def _masked_mean_std(x: torch.Tensor, valid: torch.Tensor, std: str):
    """Row-wise mean and std of x [R, K] over entries where valid [R, K]; rows with < 2 valid
    entries get std 0 (and rows with none get mean 0)."""
    if std not in STDS:
        raise ValueError(f"std must be one of {STDS}, got {std!r}")
    count = valid.sum(dim=1)
    mean = torch.where(valid, x, 0.0).sum(dim=1) / count.clamp(min=1)
    sq_dev = torch.where(valid, (x - mean[:, None]) ** 2, 0.0).sum(dim=1)
    dof = count - 1 if std == "sample" else count
    var = torch.where(count >= 2, sq_dev / dof.clamp(min=1), 0.0)
    return mean, var.sqrt()


def _tied_groups(grouped: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[P] bool: the group's valid values are all equal (true for groups with < 2 valid values)."""
    if grouped.shape[1] == 0:  # a group with no steps at all (amax cannot reduce an empty dim)
        return torch.ones(grouped.shape[0], dtype=torch.bool, device=grouped.device)
    high = torch.where(valid, grouped, -torch.inf).amax(dim=1)
    low = torch.where(valid, grouped, torch.inf).amin(dim=1)
    return (valid.sum(dim=1) < 2) | (high == low)


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    return torch.nanmean(x) if x.numel() else torch.tensor(float("nan"))


def _flatten_steps(step_rewards, step_ends, rows, completion_length, dtype, device):
    """One group's steps as flat tensors: rewards [S], local row index [S], end token [S]."""
    rewards, row_of_step, ends = [], [], []
    for local, i in enumerate(rows):
        if len(step_rewards[i]) != len(step_ends[i]):
            raise ValueError(f"completion {i}: {len(step_rewards[i])} step rewards but "
                             f"{len(step_ends[i])} step ends")
        for reward, end in zip(step_rewards[i], step_ends[i]):
            if not 0 <= end < completion_length:
                raise ValueError(f"completion {i}: step end {end} outside [0, {completion_length})")
            rewards.append(float(reward))
            row_of_step.append(local)
            ends.append(int(end))
    return (torch.tensor(rewards, dtype=dtype, device=device),
            torch.tensor(row_of_step, dtype=torch.long, device=device),
            torch.tensor(ends, dtype=torch.long, device=device))
