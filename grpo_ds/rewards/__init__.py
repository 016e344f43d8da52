"""Reward functions for GRPO, their loading from a config spec, and batch scoring.

A reward function follows TRL's convention: it is called by keyword,
`fn(prompts=, completions=, completion_ids=, trainer_state=, **columns) -> list[float | None]`,
one entry per completion, None when the reward does not apply to that sample. Dataset columns
arrive as keyword lists aligned with `completions` (the trainer repeats each prompt's columns G
times), `completion_ids` holds the token ids per completion (no padding), and `trainer_state` is a
`transformers.TrainerState`. A function names what it reads and takes the rest as `**kwargs`.
For conversational data, prompts are message lists and each completion is
`[{"role": "assistant", "content": ...}]`. `async def` functions are awaited.

- math_answer.py: `math_answer` (1.0 when the final answer equals the reference), and the pure
  helpers `extract_final_answer`, `normalize_number`, `answers_match`.
- format.py: `format_reward(pattern)`, `overlong_penalty(max_completion_tokens, cache_tokens)`.
- loading.py: `load_reward_function(spec)` for built-in names, `module:fn` and `file.py:fn`;
  `check_reward_columns` (a function's parameters against the dataset's columns, before launch).
- compute.py: `compute_rewards(...)` -> rewards_per_func [N, F] with NaN for None, plus stats;
  `call_reward` (one keyword call, awaited if async); `trainer_state`.
- conversation.py: `completion_text` (a string or a message list -> text), `reads_text`.

Not here yet: reward MODELS. The expected interface is a callable object with the same contract,
so `compute_rewards` treats it like any function: `RewardModel(engine, tokenizer, template)`
wrapping a sequence classifier in a frozen DeepSpeed engine placed like the reference model,
whose `__call__(prompts=, completions=, **kwargs) -> list[float]` tokenises prompt + completion,
runs in micro-batches under torch.no_grad, and returns the score logit per completion. Under ZeRO-3
every rank must call it with the same number of micro-batches (the forward gathers parameters
collectively), so it pads the local batch count to the maximum over ranks.
"""

from grpo_ds.rewards.compute import (
    RESERVED_KEYWORDS,
    RewardError,
    call_reward,
    compute_rewards,
    trainer_state,
)
from grpo_ds.rewards.conversation import completion_text, reads_text
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
    math_answer,
    normalize_number,
    reference_answer,
)

__all__ = [
    "BUILTIN_REWARDS",
    "RESERVED_KEYWORDS",
    "THINK_ANSWER_PATTERN",
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
    "math_answer",
    "normalize_number",
    "overlong_penalty",
    "reads_text",
    "reference_answer",
    "trainer_state",
]
