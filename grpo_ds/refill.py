"""DAPO dynamic sampling with refill (Yu et al. 2025, DAPO section 3.2; verl's
`algorithm.filter_groups.max_num_gen_batches`): sample more prompts until each rank has its share
of groups whose rewards do not all tie.

A group whose G rewards all tie has advantage 0: it adds no gradient and only dilutes the step.
`grpo.filter_tied_groups` masks such groups; with `grpo.refill_max_rounds` = R > 0 a step also runs
up to R extra rollout rounds on fresh prompts and keeps, per rank, the first `target` non-tied
groups in draw order, where target is the rank's number of prompts in the step.

Per rank, because every rank must hold the same number of rows: the update's micro-batch count is
fixed and each micro-batch is a ZeRO-3 collective. The same number of rounds on every rank,
because generation gathers the parameters collectively under ZeRO-3: a rank that stopped sampling
while another samples would hang it. So the next round is decided by an all-reduce (the most
groups any rank still needs), and a rank that is already full joins the round with a one-row
throw-away generation.

Rounds spent and still short, the step trains on what it has: its non-tied groups plus the
earliest tied ones as filler, which the filter masks (no gradient); `refill/missing_groups` counts
them. verl raises an error there instead; one hard batch should not end a long run.

Every round draws a full batch from the source on every rank (`source.refill_rows(step, round)`),
so all ranks stay at the same place in the data and a resume repeats the draws exactly: a
dataset's sampler position, saved in the checkpoint after the step, includes them; the built-in
tasks draw a pure function of (seed, step, round).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import deepspeed.comm as dist
import torch
import torch.nn.functional as F

from grpo_ds.advantages import tied_group_mask
from grpo_ds.batch import RolloutBatch
from grpo_ds.reduce import Metric, tagged
from grpo_ds.sample import Sampled


def groups_needed(target: int, non_tied: int) -> int:
    """Non-tied groups a rank still lacks."""
    return max(target - non_tied, 0)


def another_round(rounds_done: int, max_rounds: int, most_needed: int) -> bool:
    """Run one more round? `most_needed` is the max of groups_needed over ranks, so every rank
    gets the same answer."""
    return rounds_done < max_rounds and most_needed > 0


def choose_groups(tied: Sequence[bool], target: int) -> list[int]:
    """Indices, in draw order, of the `target` groups to train on out of every group sampled
    this step (round 0's first): the first `target` non-tied groups; if there are fewer, the
    earliest tied groups fill up the rank's share (the filter masks them)."""
    if len(tied) < target:
        raise ValueError(f"{len(tied)} groups sampled, fewer than the target {target}")
    non_tied = [i for i, t in enumerate(tied) if not t][:target]
    filler = [i for i, t in enumerate(tied) if t][:target - len(non_tied)]
    return sorted(non_tied + filler)


def refill_seed(seed: int, round_number: int) -> int:
    """The sampling seed of refill round `round_number` (round 0 uses `seed` itself)."""
    return (seed + round_number * 1_000_000_007) % (2**63)


def group_ties(rewards: torch.Tensor, group_size: int) -> list[bool]:
    """Per group [B], whether its rewards all tie (the filter's own rule)."""
    keep, _ = tied_group_mask(rewards, group_size)
    return (~keep[::group_size]).tolist()


def join_round(rollout, params, token_id: int, seed: int) -> None:
    """A full rank's part in a refill round: one throw-away row, so that the rollout's collective
    weight gathering runs on every rank (as trainer.correct_counts does for uneven eval rows)."""
    rows = {"rows": []} if getattr(rollout, "takes_rows", False) else {}
    rollout.generate([[token_id]], group_size=1, params=params, seed=seed, **rows)


def _max_over_ranks(value: int, device) -> int:
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def refill_groups(cfg, first: Sampled, sample: Callable[..., Sampled],
                  draw: Callable[[int], list[dict]], idle: Callable[[int], object], seed: int,
                  pad_id: int) -> Sampled:
    """Refill the tied groups of a step's first round (sample.Sampled). `sample(rows=, seed=)`
    generates and scores rows, `draw(r)` is this rank's prompts of round r, `idle(seed)` a
    throw-away generation. Returns a Sampled with `target` groups; its metrics are round 0's
    (errors summed over rounds) plus the refill/ counts, global over ranks."""
    G, max_rounds = cfg.rollout.group_size, cfg.grpo.refill_max_rounds
    metrics = dict(first.metrics)
    device, target = first.rewards.device, len(first.batch) // G
    parts, tied = [first], group_ties(first.rewards, G)
    done, prompts_sampled = 0, 0
    while another_round(done, max_rounds,
                        _max_over_ranks(groups_needed(target, tied.count(False)), device)):
        done += 1
        rows = draw(done)  # every rank draws: the data order stays the same on all of them
        if groups_needed(target, tied.count(False)) == 0:
            idle(refill_seed(seed, done))  # full already; keeps the collective gather in step
            continue
        more = sample(rows=rows, seed=refill_seed(seed, done))
        parts.append(more)
        tied += group_ties(more.rewards, G)
        prompts_sampled += len(rows)
        for key, metric in more.metrics.items():
            if key.endswith("/errors"):
                metrics[key] = Metric(metrics[key].value + metric.value, metric.reduce)
    result = first
    if len(parts) > 1:  # else round 0 is the whole step, as without refill
        result = assemble(parts, choose_groups(tied, target), G, pad_id)
    counts = torch.tensor([done, prompts_sampled, groups_needed(target, tied.count(False)),
                           sum(tied), len(tied)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    world = dist.get_world_size()
    metrics.update(tagged({"refill/rounds": counts[0].item() / world,
                           "refill/prompts_sampled": counts[1].item(),
                           "refill/missing_groups": counts[2].item(),
                           "refill/tied_fraction": counts[3].item() / counts[4].item()},
                          "same"))  # already global
    return dataclasses.replace(result, metrics=metrics)


def assemble(parts: list[Sampled], chosen: list[int], group_size: int, pad_id: int) -> Sampled:
    """The `chosen` groups out of every round's Sampled, groups numbered in draw order
    (metrics: round 0's)."""
    rewards = torch.cat([p.rewards for p in parts])
    rows = torch.tensor([g * group_size + j for g in chosen for j in range(group_size)],
                        device=rewards.device)
    batch = take(concat_batches([p.batch for p in parts], pad_id), rows)
    prompts = [text for p in parts for text in p.prompts]
    completions = [text for p in parts for text in p.completions]
    picked = rows.tolist()
    return Sampled(batch, rewards[rows], [prompts[i] for i in picked],
                   [completions[i] for i in picked], parts[0].metrics)


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rounds' batches [N_r, ...] as one [sum N_r, ...]: prompts left-padded and completions
    right-padded to the widest round, so every completion still starts at the same column.
    Only the fields a batch has before the reference pass (no ref/old log-probs, no process
    steps: process supervision cannot be combined with the filter)."""
    if len(batches) == 1:
        return batches[0]
    prompt_width = max(b.input_ids.shape[1] - b.completion_ids.shape[1] for b in batches)
    width = max(b.completion_ids.shape[1] for b in batches)

    def widen(b: RolloutBatch) -> RolloutBatch:
        left = prompt_width - (b.input_ids.shape[1] - b.completion_ids.shape[1])
        right = width - b.completion_ids.shape[1]
        return RolloutBatch(
            input_ids=F.pad(b.input_ids, (left, right), value=pad_id),
            attention_mask=F.pad(b.attention_mask, (left, right), value=0),
            completion_ids=F.pad(b.completion_ids, (0, right), value=pad_id),
            completion_mask=F.pad(b.completion_mask, (0, right), value=0),
            advantages=b.advantages,
            sampled_logprobs=None if b.sampled_logprobs is None  # a backend without them
            else F.pad(b.sampled_logprobs, (0, right), value=0.0))

    wide = [widen(b) for b in batches]

    def cat(name: str):
        parts = [getattr(b, name) for b in wide]
        return None if parts[0] is None else torch.cat(parts)

    return RolloutBatch(**{name: cat(name) for name in (
        "input_ids", "attention_mask", "completion_ids", "completion_mask", "advantages",
        "sampled_logprobs")})


def take(batch: RolloutBatch, rows: torch.Tensor) -> RolloutBatch:
    """The batch's `rows`, with the padding columns no kept row uses trimmed off."""
    sampled = batch.sampled_logprobs
    kept = RolloutBatch(
        input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
        completion_ids=batch.completion_ids[rows], completion_mask=batch.completion_mask[rows],
        advantages=None if batch.advantages is None else batch.advantages[rows],
        sampled_logprobs=None if sampled is None else sampled[rows])
    used = kept.attention_mask.sum(0) > 0  # [Tp+Tc]
    prompt_width = kept.input_ids.shape[1] - kept.completion_ids.shape[1]
    first = int(used[:prompt_width].nonzero()[0]) if used[:prompt_width].any() else prompt_width
    last = int(used[prompt_width:].nonzero()[-1]) + 1 if used[prompt_width:].any() else 0
    return RolloutBatch(
        input_ids=kept.input_ids[:, first:prompt_width + last],
        attention_mask=kept.attention_mask[:, first:prompt_width + last],
        completion_ids=kept.completion_ids[:, :last],
        completion_mask=kept.completion_mask[:, :last],
        advantages=kept.advantages,
        sampled_logprobs=None if sampled is None else kept.sampled_logprobs[:, :last])
