"""The batch that travels between the stages of a GRPO step, and padding helpers.

Rows are grouped by prompt: rows i*G .. i*G+G-1 are the G samples of prompt i. Prompts are
left-padded and completions right-padded, so `input_ids = [prompt | completion]` keeps every
completion starting at the same column, which is where the log-probs are read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RolloutBatch:
    """One rank's share of a GRPO step. The sampling phase fills the token tensors; each later
    phase returns its value and the step makes a new batch with it (dataclasses.replace)."""

    input_ids: torch.Tensor  # [B*G, Tp+Tc] left-padded prompt, then right-padded completion
    attention_mask: torch.Tensor  # [B*G, Tp+Tc] 1 on real tokens
    completion_ids: torch.Tensor  # [B*G, Tc]
    completion_mask: torch.Tensor  # [B*G, Tc] 1 up to and including EOS; 0 on filtered groups
    sampled_logprobs: torch.Tensor  # [B*G, Tc] from the generation engine (for the gap metric)
    advantages: torch.Tensor | None = None  # [B*G] group-normalised, or [B*G, Tc] (process)
    ref_logprobs: torch.Tensor | None = None  # [B*G, Tc] frozen reference; None when beta = 0
    old_logprobs: torch.Tensor | None = None  # [B*G, Tc] first-pass policy; None when mu = 1
    process_steps: list | None = None  # B*G lists of (step_end_token, reward); process supervision

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> RolloutBatch:
        parts = {}
        for f in fields(self):
            value = getattr(self, f.name)
            parts[f.name] = None if value is None else value[start:stop]
        return replace(self, **parts)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [N, T], mask [N, T]) padded on the left (N may be 0)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [N, T], mask [N, T]) padded on the right."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
    return ids, mask


def join(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """[prompt | completion] ids and attention mask, [N, Tp+Tc]."""
    return (torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1))
