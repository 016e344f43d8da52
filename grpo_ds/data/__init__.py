"""Prompt datasets for GRPO: loading and validation, prompt formatting and tokenisation, the
per-rank prompt sampler, and pass@k for evaluation.

- loading.py: `load_prompt_dataset`, `DataError`, `check_columns`.
- prompts.py: `format_prompts`, `tokenize_prompts`, `prepare_prompts` (format + tokenize);
  `is_conversational`, `conversation_messages` (TRL's conversational format).
- sampler.py: `PromptSampler` (seeded per-epoch shuffle, rank sharding, resumable position).
- evaluation.py: `pass_at_k`.
"""

from grpo_ds.data.evaluation import pass_at_k
from grpo_ds.data.loading import BUILDERS, DataError, check_columns, load_prompt_dataset
from grpo_ds.data.prompts import (
    OVERFLOW_CHOICES,
    PreparedPrompts,
    TokenizedPrompts,
    conversation_messages,
    format_prompts,
    is_conversational,
    prepare_prompts,
    template_columns,
    tokenize_prompts,
)
from grpo_ds.data.sampler import PromptSampler

__all__ = [
    "BUILDERS",
    "OVERFLOW_CHOICES",
    "DataError",
    "PreparedPrompts",
    "PromptSampler",
    "TokenizedPrompts",
    "check_columns",
    "conversation_messages",
    "format_prompts",
    "is_conversational",
    "load_prompt_dataset",
    "pass_at_k",
    "prepare_prompts",
    "template_columns",
    "tokenize_prompts",
]
