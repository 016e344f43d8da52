"""The GRPO training loop: rollout, score, advantages, reference, update, log. Read top to bottom.

One step (DeepSeekMath, section 4, "iterative" GRPO without a value model):
  1. each rank samples G completions for its prompts from the current policy (= pi_old),
  2. rewards -> group-normalised advantages (no critic),
  3. the frozen reference scores the completions (skipped when beta = 0),
  4. mu optimizer steps over the batch, each a sum over micro-batches and ranks of the clipped
     surrogate + beta * KL, normalised by the step's global counts.
Old log-probs for mu > 1 are the detached log-probs of the first pass: that pass runs before the
first optimizer step, so it is pi_old exactly and costs no extra forward.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import deepspeed.comm as dist
import torch

from grpo_ds.advantages import (
    combine_rewards,
    group_advantages,
    process_advantages,
    tied_group_mask,
)
from grpo_ds.batch import RolloutBatch, join
from grpo_ds.checkpoint import Checkpointer, RunState
from grpo_ds.config import BatchPlan, Config
from grpo_ds.failures import (
    StopRequest,
    agree,
    check_bad_steps,
    count_bad_step,
    inject_faults,
    nan_gradient_loss,
    poison_broken_sampling,
)
from grpo_ds.loss import grpo_loss, merge_loss_metrics
from grpo_ds.metrics import peak_memory_metrics, synchronized_time
from grpo_ds.refill import join_round, refill_groups
from grpo_ds.rewards import call_reward, compute_rewards, load_reward_function, trainer_state
from grpo_ds.rollout import RolloutBackend, SamplingParams, logprob_gap
from grpo_ds.rollout.passes import release_cached_memory
from grpo_ds.rollout.select import build_rollout


@functools.lru_cache
def process_reward_fn(spec: str):
    """The process-supervision function: per completion, a list of (step_end_token, reward)."""
    return load_reward_function(spec)


def sampling_params(cfg: Config, tokenizer, greedy: bool = False) -> SamplingParams:
    """Training and evaluation sample alike but for greedy's temperature, top-p and top-k."""
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=0.0 if greedy else r.temperature,
        top_p=1.0 if greedy else r.top_p,
        top_k=0 if greedy else r.top_k,
        stop_token_ids=() if r.ignore_eos else (tokenizer.eos_token_id,),
        stop_strings=tuple(r.stop),
        min_new_tokens=r.min_new_tokens,
        repetition_penalty=r.repetition_penalty,
    )


def sample_seed(base: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, rank)."""
    return (base * 1_000_003 + step * 1_009 + rank) % (2**63)


PROMPT_KEYS = ("prompt", "prompt_ids")


def prompt_token_ids(tokenizer, row: dict) -> list[int]:
    """A dataset row arrives tokenised (and truncated); a built-in task row is tokenised here."""
    return row["prompt_ids"] if "prompt_ids" in row else tokenizer(row["prompt"])["input_ids"]


def decode(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(ids.cpu(), mask.cpu())]


def reward_inputs(rows: list[dict], texts: list[str], ids: torch.Tensor, mask: torch.Tensor,
                  group: int):
    """(prompts, completions, columns) [B*G] as TRL passes them to reward functions: a
    conversational row's prompt is its messages and each completion one assistant message;
    every column but the prompt is repeated G times; `completion_ids` are the unpadded ids."""
    prompts = [r["prompt"] for r in rows for _ in range(group)]
    completions = texts
    if isinstance(rows[0]["prompt"], list):
        completions = [[{"role": "assistant", "content": text}] for text in texts]
    columns = {k: [r[k] for r in rows for _ in range(group)] for k in rows[0]
               if k not in PROMPT_KEYS}
    columns["completion_ids"] = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    return prompts, completions, columns


def rows_for(rollout, rows: list[dict]) -> dict:
    """The dataset rows as a keyword for a backend that takes them (multi-turn: the
    environment sees each episode's row), nothing for any other backend."""
    return {"rows": rows} if getattr(rollout, "takes_rows", False) else {}


def generate_and_score(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict],
                       reward_fns, reward_names, seed: int, state=None):
    """Sample G completions per prompt and score them. Returns (batch, texts, metrics).

    `state` is the `trainer_state` reward functions get (a TrainerState at step 0 if None)."""
    G = cfg.rollout.group_size
    prompt_ids = [prompt_token_ids(tokenizer, r) for r in rows]
    out = rollout.generate(prompt_ids, group_size=G, params=sampling_params(cfg, tokenizer),
                           seed=seed, **rows_for(rollout, rows))
    texts = decode(tokenizer, out.completion_ids, out.completion_mask)
    prompts, completions, columns = reward_inputs(rows, texts, out.completion_ids,
                                                  out.completion_mask, G)
    columns.update(out.columns or {})  # multi-turn: env_reward, tool_calls, turns
    shared = {"trainer_state": state or trainer_state(0, cfg.train.steps)}
    per_func, reward_stats = compute_rewards(reward_fns, reward_names, prompts, completions,
                                             columns, on_error=cfg.rewards.on_error,
                                             shared=shared)
    # Reward functions return Python numbers, so per_func is built on the CPU; from here on the
    # rewards meet the rollout's tensors (KL penalty, masks, loss) on the rollout's device.
    device = out.completion_ids.device
    weights = torch.tensor(cfg.rewards.weights or [1.0] * len(reward_fns))
    rewards, combine_stats = combine_rewards(per_func.to(device), weights, names=reward_names)
    input_ids, attention_mask = join(out.prompt_ids, out.prompt_mask, out.completion_ids,
                                     out.completion_mask)
    batch = RolloutBatch(input_ids=input_ids, attention_mask=attention_mask,
                         completion_ids=out.completion_ids,
                         # multi-turn: observation tokens are attended to, never trained on
                         completion_mask=(out.completion_mask if out.loss_mask is None
                                          else out.loss_mask).float(),
                         advantages=torch.zeros(len(prompts), device=device),
                         sampled_logprobs=out.sampled_logprobs)
    if cfg.grpo.process_reward:
        batch.process_steps = call_reward(process_reward_fn(cfg.grpo.process_reward),
                                          prompts=prompts, completions=completions,
                                          **columns, **shared)
    lengths = out.completion_mask.sum(1).float()
    metrics = {**reward_stats, **combine_stats,
               "completions/mean_length": lengths.mean().item(),
               "completions/min_length": lengths.min().item(),
               "completions/max_length": lengths.max().item(),
               "completions/clipped_ratio": out.truncated.float().mean().item(),
               "time/generation": out.metrics.get("seconds", 0.0),
               **out.metrics.get("episode_metrics", {})}
    return batch, rewards, (prompts, texts), metrics


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


def global_sum(value: float, device) -> float:
    """Sum of a python number over ranks."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def _global_max(value: float, device) -> float:
    """Max of a python number over ranks."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total.item()


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


def update(engine, batch: RolloutBatch, cfg: Config, plan: BatchPlan) -> dict:
    """mu optimizer steps over this rank's batch; gradients summed over micro-batches and ranks."""
    counts = step_counts(batch, engine.device)
    parts, order = length_sorted_micro_batches(batch, plan.micro_batch_size)
    old_chunks, micro_metrics = [], []
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
            batch.old_logprobs = unsort(torch.cat(old_chunks), order)
    gathered = [None] * plan.world_size
    dist.all_gather_object(gathered, micro_metrics)
    merged = merge_loss_metrics([m for rank_metrics in gathered for m in rank_metrics])
    norm = engine.get_global_grad_norm()
    merged["grad_norm"] = float(norm) if norm is not None else float("nan")
    merged["learning_rate"] = engine.get_lr()[0]
    return merged


def score_advantages(cfg: Config, batch: RolloutBatch, rewards: torch.Tensor) -> dict:
    """Group advantages (optionally with KL folded into the reward, or tied groups filtered)."""
    g = cfg.grpo
    if g.kl_in_reward and batch.ref_logprobs is not None:
        from grpo_ds.advantages import kl_reward_penalty

        rewards = rewards - kl_reward_penalty(batch.sampled_logprobs, batch.ref_logprobs,
                                              batch.completion_mask, g.beta, g.kl_estimator)
    advantages, metrics = group_advantages(rewards, cfg.rollout.group_size,
                                           scale=g.scale_rewards, std=g.std)
    batch.advantages = advantages
    if batch.process_steps is not None:
        steps = batch.process_steps
        advantages, process_metrics = process_advantages(
            [[r for _, r in s] for s in steps], [[e for e, _ in s] for s in steps],
            cfg.rollout.group_size, batch.completion_ids.shape[1], std=g.std,
            device=batch.completion_mask.device)
        batch.advantages = advantages * batch.completion_mask
        metrics.update({f"process/{k}": v for k, v in process_metrics.items()})
    if g.filter_tied_groups:
        keep, filter_metrics = tied_group_mask(rewards, cfg.rollout.group_size)
        batch.completion_mask = batch.completion_mask * keep[:, None].float()
        metrics["filtered_groups_fraction"] = filter_metrics["frac_reward_zero_std"]
    return metrics


def correct_counts(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict], reward_fn,
                   device, group: int = 1, chunk: int = 256, state=None) -> list[int]:
    """Per held-out prompt of this rank: how many of its `group` completions score 1.0 (greedy
    when group is 1, else sampled at the rollout temperature).

    Generation is collective under ZeRO-3 (it gathers the weights), so every rank runs the same
    number of chunks; a rank out of rows decodes one throw-away prompt to keep in step.
    """
    counts: list[int] = []
    params = sampling_params(cfg, tokenizer, greedy=group == 1)
    rounds = int(_global_max(-(-len(rows) // chunk), device))
    for start in range(0, rounds * chunk, chunk):
        part = rows[start:start + chunk]
        prompt_ids = [prompt_token_ids(tokenizer, r) for r in part] or [[tokenizer.eos_token_id]]
        out = rollout.generate(prompt_ids, group_size=group, params=params, seed=start + 1,
                               **rows_for(rollout, part))
        if not part:
            continue
        texts = decode(tokenizer, out.completion_ids, out.completion_mask)
        prompts, completions, columns = reward_inputs(part, texts, out.completion_ids,
                                                      out.completion_mask, group)
        columns.update(out.columns or {})
        scores, _ = compute_rewards(
            [reward_fn], [getattr(reward_fn, "__name__", "reward")], prompts, completions,
            columns, on_error=cfg.rewards.on_error,
            shared={"trainer_state": state or trainer_state(0, cfg.train.steps)})
        hits = (scores[:, 0] >= 1.0).tolist()  # None (NaN) is not a hit
        counts += [sum(hits[i:i + group]) for i in range(0, len(hits), group)]
    return counts


def evaluate(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict], reward_fn,
             device, state=None) -> float:
    """Held-out greedy accuracy: the share of prompts whose greedy answer scores 1.0, all ranks."""
    correct = sum(correct_counts(cfg, rollout, tokenizer, rows, reward_fn, device, state=state))
    total = global_sum(len(rows), device)
    return global_sum(correct, device) / total if total else float("nan")


def evaluate_pass_at_k(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict],
                       reward_fn, device, state=None) -> dict[str, float]:
    """Unbiased pass@k (Chen et al. 2021) over G samples per held-out prompt, k = 1, 2, 4 .. G."""
    from grpo_ds.data import pass_at_k

    G = cfg.rollout.group_size
    counts = correct_counts(cfg, rollout, tokenizer, rows, reward_fn, device, group=G, state=state)
    ks = sorted({2**i for i in range(G.bit_length()) if 2**i <= G} | {G})
    total = global_sum(len(rows), device)
    return {f"eval/pass@{k}": global_sum(sum(pass_at_k(G, c, k) for c in counts), device)
            / max(total, 1) for k in ks}


def grpo_step(cfg: Config, plan: BatchPlan, policy, reference, rollout: RolloutBackend,
              tokenizer, rows: list[dict], reward_fns, reward_names, step: int, reward_state=None,
              refill_rows=None):
    """One GRPO step on this rank's prompt rows: sample and score (reward functions get
    `reward_state` as TRL's `trainer_state`; with grpo.refill_max_rounds, `refill_rows(r)` gives
    the prompts of refill round r), reference log-probs, advantages, mu optimizer steps.
    Returns (batch, rewards [B*G], (prompts, completions), metrics reduced over ranks).
    Every tensor of the batch is on the policy's device."""
    rank, device = dist.get_rank(), policy.device
    t0 = synchronized_time()
    seed = sample_seed(cfg.train.seed, step, rank)
    sample = functools.partial(generate_and_score, cfg, rollout, tokenizer, reward_fns=reward_fns,
                               reward_names=reward_names, state=reward_state)
    batch, rewards, texts, metrics = sample(rows=rows, seed=seed)
    if cfg.grpo.refill_max_rounds:  # DAPO dynamic sampling: fresh prompts for tied groups
        idle = functools.partial(join_round, rollout, sampling_params(cfg, tokenizer),
                                 tokenizer.eos_token_id)
        batch, rewards, texts, metrics = refill_groups(
            cfg, (batch, rewards, texts, metrics), sample, refill_rows, idle, seed,
            tokenizer.pad_token_id)
    t1 = synchronized_time()
    batch = batch.slice(0, len(batch))  # detach from the rollout's tensors
    release_cached_memory()  # the rollout's KV cache and logits, before the update's shapes
    if reference is not None:
        batch.ref_logprobs = forward_logprobs(reference, batch, plan.micro_batch_size,
                                              cfg.rollout.temperature)
    t2 = synchronized_time()
    metrics.update(score_advantages(cfg, batch, rewards))
    # Rows sampled from non-finite logits: > 0 makes this a skipped, counted bad step.
    metrics["rollout/nonfinite_logit_rows_per_rank"] = poison_broken_sampling(batch)
    inject_faults(step, rank, batch)  # tests only (GRPO_DS_FAULT); nothing when unset
    metrics.update(update(policy, batch, cfg, plan))
    if batch.old_logprobs is not None:
        gap = logprob_gap(batch.sampled_logprobs, batch.old_logprobs, batch.completion_mask)
        metrics.update({f"rollout/logprob_gap_{k}": v for k, v in gap.items()})
    t3 = synchronized_time()
    tokens = global_sum(batch.attention_mask.sum().item(), device)
    metrics.update({"time/generation": t1 - t0, "time/reference": t2 - t1,
                    "time/update": t3 - t2, "time/step": t3 - t0,
                    "throughput/tokens_per_second": tokens / (t3 - t0)})
    metrics = reduce_rollout_metrics(metrics, rewards, device)
    metrics.update(peak_memory_metrics(device))  # per rank, so after the averaging
    return batch, rewards, texts, metrics


def run_grpo(cfg: Config, plan: BatchPlan, policy, reference, tokenizer, source, reward_fns,
             reward_names, logger, state: RunState, checkpointer: Checkpointer) -> dict:
    """The loop, from `state.step` (0, or a resumed checkpoint's step). Returns the summary fields
    of the GRPO phase; {"preempted": True} when a signal stopped it after a checkpoint."""
    rank, device = dist.get_rank(), policy.device
    logger.attach_monitor(policy.monitor)  # the DS config's tensorboard/csv/wandb, if any
    rollout = build_rollout(cfg, policy, tokenizer)  # rollout.backend, with its hooks
    eval_rows = source.eval_rows()

    def reward_state(done: int):
        """The `trainer_state` reward functions get once `done` GRPO steps are complete."""
        epoch = source.epoch() if hasattr(source, "epoch") else None
        return trainer_state(done, cfg.train.steps, epoch=epoch, is_world_process_zero=rank == 0)

    def accuracy(done: int) -> float:
        return evaluate(cfg, rollout, tokenizer, eval_rows, reward_fns[0], device,
                        state=reward_state(done))

    stop = StopRequest(rank).install()  # SIGTERM/SIGINT: finish the step, save, exit
    if state.step == 0:
        state.accuracy_before = accuracy(0)
        logger.print(f"GRPO start: held-out greedy accuracy {state.accuracy_before:.3f}")
        logger.scalars(0, {"eval/accuracy": state.accuracy_before})
        state.history = [{"step": 0, "accuracy": state.accuracy_before}]
    for step in range(state.step + 1, cfg.train.steps + 1):
        skipped_before = policy.skipped_steps
        batch, rewards, texts, metrics = grpo_step(
            cfg, plan, policy, reference, rollout, tokenizer, source.step_rows(step), reward_fns,
            reward_names, step, reward_state=reward_state(step - 1),
            refill_rows=functools.partial(source.refill_rows, step)
            if cfg.grpo.refill_max_rounds else None)
        # One all-reduce per step: a signal may reach only some ranks, yet all stop together.
        stopping, bad = agree(stop.requested, policy.skipped_steps > skipped_before, device)
        metrics["nan_skipped_steps"] = count_bad_step(state, bad, metrics["loss"])
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            metrics["eval/accuracy"] = accuracy(step)
            state.history.append({"step": step, "accuracy": metrics["eval/accuracy"]})
            if cfg.train.eval_pass_at_k:
                metrics.update(evaluate_pass_at_k(cfg, rollout, tokenizer, eval_rows,
                                                  reward_fns[0], device, reward_state(step)))
        logger.scalars(step, metrics)
        logger.histogram(step, "rewards", rewards[~rewards.isnan()])
        logger.histogram(step, "advantages", batch.advantages)
        every = cfg.output.log_samples_every
        if every and step % every == 0:
            logger.samples(step, texts[0][:8], texts[1][:8], rewards[:8].tolist())
        logger.progress(step, metrics)
        state.step = step
        check_bad_steps(state, cfg.checkpoint.max_bad_steps, checkpointer.latest())
        every = cfg.checkpoint.save_every
        if stopping or step == cfg.train.steps or (every and step % every == 0):
            checkpointer.save(state)
        if stopping:
            return {"preempted": True}
    accuracy_after = accuracy(cfg.train.steps)
    logger.scalars(cfg.train.steps, {"eval/accuracy": accuracy_after})
    history = state.history + [{"step": cfg.train.steps, "accuracy": accuracy_after}]
    return {"preempted": False, "accuracy_before": state.accuracy_before,
            "accuracy_after": accuracy_after, "eval_curve": history}


GLOBAL_ALREADY = ("loss", "kl", "clip_ratio", "ratio", "entropy", "advantage", "grad_norm",
                  "learning_rate", "rollout/logprob_gap", "eval/", "importance_sampling",
                  "refill/")


def reduce_rollout_metrics(metrics: dict, rewards: torch.Tensor, device) -> dict:
    """Turn this rank's rollout statistics into global ones: one all-reduce for the means (counts
    such as errors are summed), one for the maxima (min = -max(-x)); the reward mean exactly over
    all valid rewards. `reward_std` stays TRL's: the mean of the groups' stds (every rank holds
    the same number of groups, so the mean over ranks is the mean over groups)."""
    world = dist.get_world_size()
    local = {k: v for k, v in metrics.items() if not k.startswith(GLOBAL_ALREADY)}
    extremes = [k for k in local if k.endswith(("max_length", "min_length"))]
    means = [k for k in local if k not in extremes]
    valid = rewards[~rewards.isnan()].double()
    sums = torch.tensor([local[k] for k in means] + [valid.numel(), valid.sum().item()],
                        dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    signed = torch.tensor([local[k] if k.endswith("max_length") else -local[k] for k in extremes],
                          dtype=torch.float64, device=device)
    dist.all_reduce(signed, op=dist.ReduceOp.MAX)
    out = {k: v for k, v in metrics.items() if k not in local}
    out.update({k: sums[i].item() / (1 if k.endswith("/errors") else world)
                for i, k in enumerate(means)})
    out.update({k: signed[i].item() * (1 if k.endswith("max_length") else -1)
                for i, k in enumerate(extremes)})
    n, total = sums[-2].item(), sums[-1].item()
    out["reward"] = total / max(n, 1)
    return out


def summary_path(run_dir: str) -> Path:
    return Path(run_dir) / "summary.json"
