"""Shape rewards: does a completion follow a required layout, and is it too long.

- `format_reward(pattern)` builds a reward that is 1.0 when the whole completion matches `pattern`
  (Python regex, `re.fullmatch` with DOTALL so `.` spans lines), else 0.0. A conversational
  completion (a list with one assistant message) is matched on that message's content. The default asks for
  `<think>...</think>` followed by `<answer>...</answer>`, as in DeepSeek-R1 style training.
- `overlong_penalty(max_completion_tokens, cache_tokens)` builds DAPO's soft overlong punishment
  (Yu et al. 2025, "DAPO", eq. 13). With L = completion length in tokens, L_max =
  max_completion_tokens and L_cache = cache_tokens:

      R(L) = 0                                   if L <= L_max - L_cache
           = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
           = -1                                  if L > L_max

  L comes from the `completion_ids` keyword (one list of token ids per completion, padding
  removed) that the trainer passes, as TRL does. Text length would be the wrong unit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from grpo_ds.rewards.conversation import completion_text

THINK_ANSWER_PATTERN = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def format_reward(pattern: str | re.Pattern = THINK_ANSWER_PATTERN) -> Callable[..., list[float]]:
    """A reward function scoring 1.0 when the completion fully matches `pattern`, else 0.0."""
    regex = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern

    def matches_format(completions: list, **kwargs) -> list[float]:
        return [1.0 if regex.fullmatch(completion_text(c)) else 0.0 for c in completions]

    matches_format.pattern = regex.pattern  # shown in logs and errors
    return matches_format


def overlong_penalty(max_completion_tokens: int, cache_tokens: int) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment: 0, then linear down to -1 over the last `cache_tokens`."""
    if not 0 < cache_tokens <= max_completion_tokens:
        raise ValueError(
            f"overlong_penalty needs 0 < cache_tokens <= max_completion_tokens, "
            f"got cache_tokens={cache_tokens}, max_completion_tokens={max_completion_tokens}"
        )
    free_tokens = max_completion_tokens - cache_tokens

    def overlong(completion_ids: Sequence[Sequence[int]] | None = None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError(
                "overlong_penalty needs the completion_ids keyword (token ids per completion); "
                "the trainer must pass it to reward functions"
            )
        lengths = [len(ids) for ids in completion_ids]
        return [
            0.0
            if n <= free_tokens
            else (free_tokens - n) / cache_tokens
            if n <= max_completion_tokens
            else -1.0
            for n in lengths
        ]

    return overlong
