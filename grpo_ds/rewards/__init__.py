"""Reward functions for GRPO, their loading from a config spec, and batch scoring.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]` (the TRL
convention): one entry per completion, None when the reward does not apply to that sample.
Dataset columns arrive as keyword lists aligned with `completions` (the trainer repeats each
prompt's columns G times), together with `completion_ids` (token ids per completion, no padding).
Unknown keywords must be accepted through `**kwargs`.

- math_answer.py: `math_answer` (1.0 when the final answer equals the reference: plain numbers
  exactly, anything else by Math-Verify in a pool of worker processes, math_verify_grading.py
  and grading_pool.py), `make_math_answer(workers, timeout_s)`; answer_extraction.py holds the
  pure helpers `extract_final_answer`, `normalize_number`, `reference_answer`.
- failure.py: `FailedReward`, a 0.0 reward that counts as an error (a grader timeout).
- format.py: `format_reward(pattern)`, `overlong_penalty(max_completion_tokens, cache_tokens)`.
- loading.py: `load_reward_function(spec)` for built-in names, `module:fn` and `file.py:fn`.
- compute.py: `compute_rewards(...)` -> rewards_per_func [N, F] with NaN for None, plus stats.

Not here yet: reward MODELS. The expected interface is a callable object with the same contract,
so `compute_rewards` treats it like any function: `RewardModel(engine, tokenizer, template)`
wrapping a sequence classifier in a frozen DeepSpeed engine placed like the reference model,
whose `__call__(prompts, completions, **kwargs) -> list[float]` tokenises prompt + completion,
runs in micro-batches under torch.no_grad, and returns the score logit per completion. Under ZeRO-3
every rank must call it with the same number of micro-batches (the forward gathers parameters
collectively), so it pads the local batch count to the maximum over ranks.
"""

from grpo_ds.rewards.compute import RewardError, compute_rewards
from grpo_ds.rewards.failure import FailedReward
from grpo_ds.rewards.format import THINK_ANSWER_PATTERN, format_reward, overlong_penalty
from grpo_ds.rewards.loading import (
    BUILTIN_REWARDS,
    RewardSpecError,
    check_reward_columns,
    load_reward_function,
)
from grpo_ds.rewards.math_answer import (
    answers_match,
    extract_final_answer,
    make_math_answer,
    math_answer,
    normalize_number,
    reference_answer,
)

__all__ = [
    "BUILTIN_REWARDS",
    "THINK_ANSWER_PATTERN",
    "FailedReward",
    "RewardError",
    "RewardSpecError",
    "answers_match",
    "check_reward_columns",
    "compute_rewards",
    "extract_final_answer",
    "format_reward",
    "load_reward_function",
    "make_math_answer",
    "math_answer",
    "normalize_number",
    "overlong_penalty",
    "reference_answer",
]
