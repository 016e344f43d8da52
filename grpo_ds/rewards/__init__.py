"""Reward functions for GRPO, their loading from a config spec, and batch scoring.

A reward function follows TRL's convention: it is called by keyword,
`fn(prompts=, completions=, completion_ids=, trainer_state=, **columns) -> list[float | None]`,
one entry per completion, None when the reward does not apply to that sample. Dataset columns
arrive as keyword lists aligned with `completions` (the trainer repeats each prompt's columns G
times), `completion_ids` holds the token ids per completion (no padding), and `trainer_state` is a
`transformers.TrainerState`. A function names what it reads and takes the rest as `**kwargs`.
For conversational data, prompts are message lists and each completion is
`[{"role": "assistant", "content": ...}]`. `async def` functions are awaited.

- math_answer.py: `math_answer` (1.0 when the final answer equals the reference: plain numbers
  exactly, anything else by Math-Verify in a pool of worker processes, math_verify_grading.py
  and grading_pool.py), `make_math_answer(workers, timeout_s)`; answer_extraction.py holds the
  pure helpers `extract_final_answer`, `normalize_number`, `reference_answer`.
- failure.py: `FailedReward`, a 0.0 reward that counts as an error (a grader timeout).
- format.py: `format_reward(pattern)`, `overlong_penalty(max_completion_tokens, cache_tokens)`.
- loading.py: `load_reward_function(spec)` for built-in names, `module:fn` and `file.py:fn`;
  `check_reward_columns` (a function's parameters against the dataset's columns, before launch).
- compute.py: `compute_rewards(...)` -> rewards_per_func [N, F] with NaN for None, plus stats;
  `call_reward` (one keyword call, awaited if async); `trainer_state`.
- conversation.py: `completion_text` (a string or a message list -> text), `reads_text`.

- model.py: `RewardModel`, a frozen sequence classifier as a reward function (`model:PATH`),
  placed like the reference; under ZeRO-3 every rank runs the same number of its micro-batches
  (the forward gathers parameters collectively).
"""

from grpo_ds.rewards.compute import (
    RESERVED_KEYWORDS,
    RewardError,
    call_reward,
    compute_rewards,
    trainer_state,
)
from grpo_ds.rewards.conversation import completion_text, reads_text
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
    "RESERVED_KEYWORDS",
    "THINK_ANSWER_PATTERN",
    "FailedReward",
    "RewardError",
    "RewardSpecError",
    "answers_match",
    "call_reward",
    "check_reward_columns",
    "completion_text",
    "compute_rewards",
    "extract_final_answer",
    "format_reward",
    "load_reward_function",
    "make_math_answer",
    "math_answer",
    "normalize_number",
    "overlong_penalty",
    "reads_text",
    "reference_answer",
    "trainer_state",
]
