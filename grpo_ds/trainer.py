"""The GRPO training loop: sample, score, reference, advantages, update, log. Read top to bottom.

One step (DeepSeekMath, section 4, "iterative" GRPO without a value model):
  1. each rank samples G completions for its prompts from the current policy (= pi_old),
  2. rewards -> group-normalised advantages (no critic),
  3. the frozen reference scores the completions (skipped when beta = 0),
  4. mu optimizer steps over the batch, each a sum over micro-batches and ranks of the clipped
     surrogate + beta * KL, normalised by the step's global counts.
Each phase takes what it needs and returns a new value (sample.Sampled, Scored, the reference's
log-probs, update.Updated); the step joins them into a new batch with dataclasses.replace.
Old log-probs for mu > 1 are the detached log-probs of the first pass: that pass runs before the
first optimizer step, so it is pi_old exactly and costs no extra forward.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import deepspeed.comm as dist
import torch

from grpo_ds import hooks
from grpo_ds.advantages import (
    group_advantages,
    kl_reward_penalty,
    process_advantages,
    tied_group_mask,
)
from grpo_ds.batch import RolloutBatch
from grpo_ds.build import Run
from grpo_ds.checkpoint import Checkpointer, RunState
from grpo_ds.config import BatchPlan, Config
from grpo_ds.evaluate import evaluate, evaluate_pass_at_k
from grpo_ds.failures import (
    StopRequest,
    agree,
    broken_sampling_rows,
    check_bad_steps,
    count_bad_step,
)
from grpo_ds.metrics import peak_memory_metrics, synchronized_time
from grpo_ds.reduce import Metric, global_sum, reduce_metrics, tagged
from grpo_ds.refill import join_round, refill_groups
from grpo_ds.rewards import trainer_state
from grpo_ds.rollout import RolloutBackend, logprob_gap
from grpo_ds.rollout.passes import release_cached_memory
from grpo_ds.sample import generate_and_score, sample_seed, sampling_params
from grpo_ds.update import forward_logprobs, update


@dataclass
class Scored:
    """What the advantage phase returns."""

    advantages: torch.Tensor  # [B*G], or [B*G, Tc] with process supervision
    completion_mask: torch.Tensor  # [B*G, Tc] the loss's mask: 0 on filtered (tied) groups
    metrics: dict[str, Metric]


def score_advantages(cfg: Config, batch: RolloutBatch, rewards: torch.Tensor) -> Scored:
    """Group advantages of `rewards` [B*G] (optionally with KL folded into the reward, or tied
    groups filtered). Reads batch.ref_logprobs (KL in reward) and batch.process_steps."""
    g, G = cfg.grpo, cfg.rollout.group_size
    if g.kl_in_reward and batch.ref_logprobs is not None:
        rewards = rewards - kl_reward_penalty(batch.sampled_logprobs, batch.ref_logprobs,
                                              batch.completion_mask, g.beta, g.kl_estimator)
    advantages, metrics = group_advantages(rewards, G, scale=g.scale_rewards, std=g.std)
    mask = batch.completion_mask
    if batch.process_steps is not None:
        steps = batch.process_steps
        advantages, process_metrics = process_advantages(
            [[r for _, r in s] for s in steps], [[e for e, _ in s] for s in steps], G,
            batch.completion_ids.shape[1], std=g.std, device=mask.device)
        advantages = advantages * mask
        metrics.update({f"process/{k}": v for k, v in process_metrics.items()})
    if g.filter_tied_groups:
        keep, filter_metrics = tied_group_mask(rewards, G)
        mask = mask * keep[:, None].float()
        metrics["filtered_groups_fraction"] = filter_metrics["frac_reward_zero_std"]
    return Scored(advantages, mask, tagged(metrics, "mean"))


@dataclass
class StepResult:
    """One GRPO step, on this rank."""

    batch: RolloutBatch  # every field filled: advantages, ref/old log-probs where they exist
    rewards: torch.Tensor  # [B*G] combined rewards
    prompts: list  # [B*G]
    completions: list[str]  # [B*G]
    metrics: dict[str, float]  # reduced over ranks (peak memory per rank)


def grpo_step(cfg: Config, plan: BatchPlan, policy, reference, rollout: RolloutBackend,
              tokenizer, rows: list[dict], reward_fns, reward_names, step: int,
              reward_state=None, refill_rows=None) -> StepResult:
    """One GRPO step on this rank's prompt rows; reward functions get `reward_state` as TRL's
    `trainer_state`; with grpo.refill_max_rounds, `refill_rows(r)` gives the prompts of refill
    round r. Every tensor of the result's batch is on the policy's device."""
    rank, device = dist.get_rank(), policy.device
    t0 = synchronized_time()
    seed = sample_seed(cfg.train.seed, step, rank)
    sample = functools.partial(generate_and_score, cfg, rollout, tokenizer, reward_fns=reward_fns,
                               reward_names=reward_names, state=reward_state)
    sampled = sample(rows=rows, seed=seed)
    if cfg.grpo.refill_max_rounds:  # DAPO dynamic sampling: fresh prompts for tied groups
        idle = functools.partial(join_round, rollout, sampling_params(cfg, tokenizer),
                                 tokenizer.eos_token_id)
        sampled = refill_groups(cfg, sampled, sample, refill_rows, idle, seed,
                                tokenizer.pad_token_id)
    t1 = synchronized_time()
    batch = sampled.batch.slice(0, len(sampled.batch))  # detach from the rollout's tensors
    release_cached_memory()  # the rollout's KV cache and logits, before the update's shapes
    ref_logprobs = None if reference is None else forward_logprobs(  # [B*G, Tc]
        reference, batch, plan.micro_batch_size, cfg.rollout.temperature)
    batch = dataclasses.replace(batch, ref_logprobs=ref_logprobs)
    t2 = synchronized_time()
    scored = score_advantages(cfg, batch, sampled.rewards)
    # Rows sampled from non-finite logits are not the policy's: NaN advantages make the step a
    # NaN loss, which ZeRO-3 skips on every rank and the loop counts as a bad step.
    broken = broken_sampling_rows(batch.sampled_logprobs, batch.completion_mask)
    batch = dataclasses.replace(batch, completion_mask=scored.completion_mask,
                                advantages=scored.advantages * (float("nan") if broken else 1.0))
    batch = hooks.before_update(step, rank, batch)  # a no-op unless a test registered one
    updated = update(policy, batch, cfg, plan)
    batch = dataclasses.replace(batch, old_logprobs=updated.old_logprobs)
    t3 = synchronized_time()
    metrics = {**sampled.metrics, **scored.metrics, **updated.metrics,
               **step_metrics(batch, sampled.rewards, (t0, t1, t2, t3), device),
               "rollout/nonfinite_logit_rows_per_rank": Metric(float(broken), "mean")}
    metrics = finish_reward_mean(reduce_metrics(metrics, device))
    metrics.update(peak_memory_metrics(device))  # per rank, so after the reduction
    return StepResult(batch, sampled.rewards, sampled.prompts, sampled.completions, metrics)


def step_metrics(batch: RolloutBatch, rewards: torch.Tensor, stamps, device) -> dict:
    """Phase times, throughput, the sampler/trainer log-prob gap, and the reward's exact mean
    over all ranks' valid rewards (as a sum and a count; finish_reward_mean divides)."""
    t0, t1, t2, t3 = stamps
    tokens = global_sum(batch.attention_mask.sum().item(), device)
    valid = rewards[~rewards.isnan()].double()
    metrics = {**tagged({"time/generation": t1 - t0, "time/reference": t2 - t1,
                         "time/update": t3 - t2, "time/step": t3 - t0,
                         "throughput/tokens_per_second": tokens / (t3 - t0)}, "mean"),
               "reward": Metric(valid.sum().item(), "sum"),
               "reward/count": Metric(valid.numel(), "sum")}
    if batch.old_logprobs is not None:
        gap = logprob_gap(batch.sampled_logprobs, batch.old_logprobs, batch.completion_mask)
        metrics["rollout/logprob_gap_max_abs"] = Metric(gap["max_abs"], "max")
        metrics["rollout/logprob_gap_mean_abs"] = Metric(gap["mean_abs"], "mean")
    return metrics


def finish_reward_mean(metrics: dict[str, float]) -> dict[str, float]:
    """`reward`: the summed valid rewards over their count, all ranks."""
    count = metrics.pop("reward/count")
    return {**metrics, "reward": metrics["reward"] / max(count, 1)}


def run_grpo(run: Run, logger, state: RunState, checkpointer: Checkpointer) -> dict:
    """The loop, from `state.step` (0, or a resumed checkpoint's step). Returns the summary fields
    of the GRPO phase; {"preempted": True} when a signal stopped it after a checkpoint."""
    cfg, plan, (policy, reference, rollout, tokenizer) = run.setup.cfg, run.setup.plan, (
        run.engines.policy, run.engines.reference, run.engines.rollout, run.engines.tokenizer)
    source, reward_fns = run.inputs.source, run.inputs.reward_fns
    rank, last = dist.get_rank(), cfg.train.steps
    logger.attach_monitor(policy.monitor)  # the DS config's tensorboard/csv/wandb, if any
    evaluation = Evaluation(cfg, rollout, tokenizer, source, reward_fns[0], policy.device, rank)
    stop = StopRequest(rank).install()  # SIGTERM/SIGINT: finish the step, save, exit
    if state.step == 0:
        state.accuracy_before = evaluation.accuracy(0)
        logger.print(f"GRPO start: held-out greedy accuracy {state.accuracy_before:.3f}")
        logger.scalars(0, {"eval/accuracy": state.accuracy_before})
        state.history = [{"step": 0, "accuracy": state.accuracy_before}]
    for step in range(state.step + 1, last + 1):
        skipped_before = policy.skipped_steps
        result = grpo_step(cfg, plan, policy, reference, rollout, tokenizer,
                           source.step_rows(step), reward_fns, run.inputs.reward_names, step,
                           reward_state=evaluation.reward_state(step - 1),
                           refill_rows=functools.partial(source.refill_rows, step)
                           if cfg.grpo.refill_max_rounds else None)
        # One all-reduce per step: a signal may reach only some ranks, yet all stop together.
        stopping, bad = agree(stop.requested, policy.skipped_steps > skipped_before,
                              policy.device)
        result.metrics["nan_skipped_steps"] = count_bad_step(state, bad, result.metrics["loss"])
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < last:
            result.metrics.update(evaluation.periodic(step, state))
        log_step(logger, cfg, step, result)
        state.step = step
        check_bad_steps(state, cfg.checkpoint.max_bad_steps, checkpointer.latest())
        every = cfg.checkpoint.save_every
        if stopping or step == last or (every and step % every == 0):
            checkpointer.save(state)
        if stopping:
            return {"preempted": True}
    accuracy_after = evaluation.accuracy(last)
    logger.scalars(last, {"eval/accuracy": accuracy_after})
    return {"preempted": False, "accuracy_before": state.accuracy_before,
            "accuracy_after": accuracy_after,
            "eval_curve": state.history + [{"step": last, "accuracy": accuracy_after}]}


class Evaluation:
    """The held-out evaluations of a run, with the `trainer_state` reward functions get."""

    def __init__(self, cfg: Config, rollout, tokenizer, source, reward_fn, device, rank: int):
        self.cfg, self.rollout, self.tokenizer, self.source = cfg, rollout, tokenizer, source
        self.reward_fn, self.device, self.rank = reward_fn, device, rank
        self.rows = source.eval_rows()

    def reward_state(self, done: int):
        """The `trainer_state` reward functions get once `done` GRPO steps are complete."""
        epoch = self.source.epoch() if hasattr(self.source, "epoch") else None
        return trainer_state(done, self.cfg.train.steps, epoch=epoch,
                             is_world_process_zero=self.rank == 0)

    def accuracy(self, done: int) -> float:
        return evaluate(self.cfg, self.rollout, self.tokenizer, self.rows, self.reward_fn,
                        self.device, state=self.reward_state(done))

    def periodic(self, step: int, state: RunState) -> dict[str, float]:
        """Accuracy (recorded in the run's history) and, if asked, pass@k after `step`."""
        metrics = {"eval/accuracy": self.accuracy(step)}
        state.history.append({"step": step, "accuracy": metrics["eval/accuracy"]})
        if self.cfg.train.eval_pass_at_k:
            metrics.update(evaluate_pass_at_k(self.cfg, self.rollout, self.tokenizer, self.rows,
                                              self.reward_fn, self.device,
                                              self.reward_state(step)))
        return metrics


def log_step(logger, cfg: Config, step: int, result: StepResult) -> None:
    """Scalars, histograms, text samples and the progress line of one step."""
    rewards = result.rewards
    logger.scalars(step, result.metrics)
    logger.histogram(step, "rewards", rewards[~rewards.isnan()])
    logger.histogram(step, "advantages", result.batch.advantages)
    every = cfg.output.log_samples_every
    if every and step % every == 0:
        logger.samples(step, result.prompts[:8], result.completions[:8], rewards[:8].tolist())
    logger.progress(step, result.metrics)


def summary_path(run_dir: str) -> Path:
    return Path(run_dir) / "summary.json"
