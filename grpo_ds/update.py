"""The policy phases of a GRPO step: log-probs of a frozen engine (reference or old policy) and
the mu optimizer steps of the clipped surrogate, over length-sorted micro-batches.

The loss of each micro-batch is its share of the step's loss, normalised by the step's global
counts (all ranks, all micro-batches), so neither the split nor the order of rows changes the
loss or the gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import deepspeed.comm as dist
import torch

from grpo_ds.batch import RolloutBatch
from grpo_ds.config import BatchPlan, Config
from grpo_ds.failures import nan_gradient_loss
from grpo_ds.loss import grpo_loss, merge_loss_metrics
from grpo_ds.reduce import Metric, tagged


def length_sorted_micro_batches(batch: RolloutBatch, micro: int):
    """(micro-batches, order): the batch sorted by real length (order [B*G], stable) and split.

    The model trims each micro-batch to its longest sequence, so putting sequences of similar
    length together leaves less padding to compute on. The loss divides by the step's global
    counts, so the order of sequences changes neither the loss nor the gradient.
    """
    order = torch.argsort(batch.attention_mask.sum(1), stable=True)
    ordered = take_rows(batch, order)
    return [ordered.slice(start, start + micro) for start in range(0, len(batch), micro)], order


def take_rows(batch: RolloutBatch, index: torch.Tensor) -> RolloutBatch:
    """The batch's rows in `index` order (tensor fields and per-row list fields alike)."""
    def pick(value):
        if value is None or isinstance(value, torch.Tensor):
            return value if value is None else value[index.to(value.device)]
        return [value[i] for i in index.tolist()]

    return dataclasses.replace(batch, **{f.name: pick(getattr(batch, f.name))
                                         for f in dataclasses.fields(batch)})


def unsort(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in `order` back to the batch's own order."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


@torch.no_grad()
def forward_logprobs(engine, batch: RolloutBatch, micro: int, temperature: float) -> torch.Tensor:
    """Per-token log-probs [B*G, Tc] of the completions, micro-batched (reference or old policy)."""
    parts, order = length_sorted_micro_batches(batch, micro)
    chunks = [engine(p.input_ids, p.attention_mask, p.completion_ids, temperature)[0].float()
              for p in parts]
    return unsort(torch.cat(chunks), order)


def step_counts(batch: RolloutBatch, device) -> tuple[float, float]:
    """(sequences, completion tokens) of the whole optimizer step, all ranks: the loss normalisers."""
    counts = torch.tensor([(batch.completion_mask.sum(1) > 0).sum().item(),
                           batch.completion_mask.sum().item()], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)


def micro_batch_loss(engine, part: RolloutBatch, cfg: Config, counts: tuple[float, float],
                     old_logprobs: torch.Tensor | None):
    """This micro-batch's share of the step's GRPO loss. Returns (loss, logprobs, metrics)."""
    g = cfg.grpo
    logprobs, entropy = engine(part.input_ids, part.attention_mask, part.completion_ids,
                               cfg.rollout.temperature, with_entropy=True)
    # every micro-batch of the step, all ranks (bnpo's normaliser; config validated the division)
    micro_batches = (cfg.train.prompts_per_step * cfg.rollout.group_size
                     // cfg.train.micro_batch_size)
    loss, metrics = grpo_loss(
        logprobs, old_logprobs, part.ref_logprobs, part.advantages, part.completion_mask,
        epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
        beta=0.0 if g.kl_in_reward else g.beta, kl_estimator=g.kl_estimator,
        aggregation=g.loss_aggregation, num_sequences=counts[0], num_tokens=counts[1],
        num_micro_batches=micro_batches, max_completion_length=cfg.rollout.max_new_tokens,
        entropy=entropy.detach(), policy_loss=g.policy_loss, ratio_level=g.ratio_level,
        clip_ratio_c=g.clip_ratio_c, sampled_logprobs=part.sampled_logprobs,
        importance_sampling=g.importance_sampling,
        importance_sampling_cap=g.importance_sampling_cap)
    return loss, logprobs, metrics


@dataclass
class Updated:
    """What the mu optimizer steps return."""

    old_logprobs: torch.Tensor | None  # [B*G, Tc] first-pass policy log-probs; None when mu = 1
    metrics: dict[str, Metric]  # loss terms merged over micro-batches and ranks ("same")


def update(engine, batch: RolloutBatch, cfg: Config, plan: BatchPlan) -> Updated:
    """mu optimizer steps over this rank's batch; gradients summed over micro-batches and ranks."""
    counts = step_counts(batch, engine.device)
    parts, order = length_sorted_micro_batches(batch, plan.micro_batch_size)
    old_chunks, micro_metrics, old_logprobs = [], [], None
    for iteration in range(cfg.grpo.num_iterations):
        for index, part in enumerate(parts):
            old = old_chunks[index] if iteration > 0 else None
            loss, logprobs, metrics = micro_batch_loss(engine, part, cfg, counts, old)
            loss = nan_gradient_loss(loss, logprobs)  # a NaN/inf loss: ZeRO-3 skips the step
            if cfg.grpo.num_iterations > 1 and iteration == 0:
                old_chunks.append(logprobs.detach())
            # The loss is already this micro-batch's share of the step's loss. DeepSpeed
            # averages gradients over ranks, so scale by world and do not divide by accumulation.
            engine.backward(loss * plan.world_size, scale_wrt_gas=False)
            engine.step()
            micro_metrics.append(metrics)
        if iteration == 0 and old_chunks:
            old_logprobs = unsort(torch.cat(old_chunks), order)
    gathered = [None] * plan.world_size
    dist.all_gather_object(gathered, micro_metrics)
    merged = merge_loss_metrics([m for rank_metrics in gathered for m in rank_metrics])
    norm = engine.get_global_grad_norm()
    merged["grad_norm"] = float(norm) if norm is not None else float("nan")
    merged["learning_rate"] = engine.get_lr()[0]
    return Updated(old_logprobs, tagged(merged, "same"))
