"""Completions in TRL's conversational form, for reward functions that read plain text.

For a dataset whose prompts are chat messages, TRL passes each completion as a list holding one
assistant message, `[{"role": "assistant", "content": "..."}]`, and the trainer does the same.
The built-in rewards read text, so they take either form through `completion_text`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def completion_text(completion) -> str:
    """The text of a completion: a string as is, a list of messages as its last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"a completion is a string or a list of messages [{{'role': ..., 'content': ...}}], "
        f"got {type(completion).__name__}: {str(completion)[:80]}"
    )


def reads_text(function: Callable) -> Callable:
    """`function` (which reads `completions` as strings) made to accept conversational ones too."""

    @functools.wraps(function)  # keeps the signature, which check_reward_columns reads
    def on_text(*args, completions, **kwargs):
        return function(*args, completions=[completion_text(c) for c in completions], **kwargs)

    return on_text
