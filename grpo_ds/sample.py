"""The sampling phase of a GRPO step: G completions per prompt from the current policy, scored by
the reward functions. Returns a `Sampled` value; nothing else is changed.

Reward functions are called as TRL's GRPOTrainer calls them (`reward_inputs`), and return Python
numbers: rewards are built on the CPU and moved to the rollout's device here, where they meet
the rollout's masks and log-probs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from grpo_ds.advantages import combine_rewards
from grpo_ds.batch import RolloutBatch, join
from grpo_ds.config import Config
from grpo_ds.reduce import Metric, tagged
from grpo_ds.rewards import call_reward, compute_rewards, load_reward_function, trainer_state
from grpo_ds.rollout import RolloutBackend, SamplingParams

PROMPT_KEYS = ("prompt", "prompt_ids")


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


@dataclass
class Sampled:
    """One rank's sampled and scored completions (rows grouped by prompt, G per prompt)."""

    batch: RolloutBatch  # the token tensors and sampled log-probs; no advantages yet
    rewards: torch.Tensor  # [B*G] combined reward, NaN where no function scored the sample
    prompts: list  # [B*G] the prompt of each row, as reward functions got it
    completions: list[str]  # [B*G] decoded completion texts
    metrics: dict[str, Metric]  # rank-local, each with its reduction


def rows_for(rollout, rows: list[dict]) -> dict:
    """The dataset rows as a keyword for a backend that takes them (multi-turn: the
    environment sees each episode's row), nothing for any other backend."""
    return {"rows": rows} if getattr(rollout, "takes_rows", False) else {}


def reward_metrics(stats: dict[str, float], names: list[str]) -> dict[str, Metric]:
    """Per reward function: errors are counts (summed over ranks), mean and std averaged."""
    errors = {f"rewards/{n}/errors" for n in names}
    return {k: Metric(v, "sum" if k in errors else "mean") for k, v in stats.items()}


def completion_metrics(mask: torch.Tensor, truncated: torch.Tensor) -> dict[str, Metric]:
    lengths = mask.sum(1).float()  # [B*G] tokens per completion, EOS included
    return {"completions/mean_length": Metric(lengths.mean().item(), "mean"),
            "completions/min_length": Metric(lengths.min().item(), "min"),
            "completions/max_length": Metric(lengths.max().item(), "max"),
            "completions/clipped_ratio": Metric(truncated.float().mean().item(), "mean")}


def generate_and_score(cfg: Config, rollout: RolloutBackend, tokenizer, rows: list[dict],
                       reward_fns, reward_names, seed: int, state=None) -> Sampled:
    """Sample G completions per prompt and score them.

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
    # per_func is built on the CPU; from here on the rewards meet the rollout's tensors
    device = out.completion_ids.device
    weights = torch.tensor(cfg.rewards.weights or [1.0] * len(reward_fns))
    rewards, combine_stats = combine_rewards(per_func.to(device), weights, names=reward_names)
    process_steps = None
    if cfg.grpo.process_reward:
        process_steps = call_reward(process_reward_fn(cfg.grpo.process_reward), prompts=prompts,
                                    completions=completions, **columns, **shared)
    input_ids, attention_mask = join(out.prompt_ids, out.prompt_mask, out.completion_ids,
                                     out.completion_mask)
    batch = RolloutBatch(input_ids=input_ids, attention_mask=attention_mask,
                         completion_ids=out.completion_ids,
                         # multi-turn: observation tokens are attended to, never trained on
                         completion_mask=(out.completion_mask if out.loss_mask is None
                                          else out.loss_mask).float(),
                         sampled_logprobs=out.sampled_logprobs, process_steps=process_steps)
    metrics = {**reward_metrics({**reward_stats, **combine_stats}, reward_names),
               **completion_metrics(out.completion_mask, out.truncated),
               **tagged({"time/generation": out.metrics.get("seconds", 0.0),
                         **out.metrics.get("episode_metrics", {})}, "mean")}  # per-rank means
    return Sampled(batch, rewards, prompts, texts, metrics)
