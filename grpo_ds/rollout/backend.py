"""The rollout contract: what the trainer passes in and what every generation backend returns.

Any engine that implements `RolloutBackend` can replace our `HybridRollout` (vLLM later;
DeepSpeed's HybridEngineRollout through `ds_hybrid.DeepSpeedHybridBackend`); `rollout.backend`
chooses it (select.py), which also calls the hooks around every rollout.

Row layout: rows i*G .. i*G+G-1 hold the G samples of prompt i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from grpo_ds import batch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions."""

    max_new_tokens: int
    """Upper bound on completion length; a row that reaches it without a stop is `truncated`."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax, lowest token id on ties)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass >= top_p (1.0 = off)."""
    top_k: int = 0
    """Keep exactly the top_k most likely tokens (0 = off); applied before top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a completion (usually the EOS id); the stop token is kept and masked 1."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a completion when they appear in the decoded tail (needs a tokenizer);
    the token that completes the string is the last one kept (as TRL and vLLM's token ids)."""
    min_new_tokens: int = 0
    """Stop tokens are left out of the draw, and stop strings not checked, until a completion
    has this many tokens (HF's min_new_tokens, vLLM's min_tokens)."""
    repetition_penalty: float = 1.0
    """HF / vLLM repetition penalty over prompt and completion tokens: a seen token's logit is
    divided by it when positive, multiplied when negative (1.0 = off, and then free)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}]"
                             f", got {self.min_new_tokens}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class RolloutOutput:
    """G completions per prompt, grouped by prompt. All tensors live on the model's device."""

    prompt_ids: torch.Tensor  # [N*G, Tp] int64, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [N*G, Tp] int64, 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N*G, Tc] int64, right-padded with pad_token_id
    completion_mask: torch.Tensor  # [N*G, Tc] int64, 1 up to and including the stop token
    # [N*G, Tc] float32: log_softmax(logits / T) at each sampled token (before top-k/top-p),
    # 0 on padding. None when the backend cannot report them (the trainer must recompute).
    sampled_logprobs: torch.Tensor | None
    truncated: torch.Tensor  # [N*G] bool: reached max_new_tokens without a stop
    metrics: dict = field(default_factory=dict)  # tokens, seconds, gather seconds, gather mode
    # Multi-turn (grpo_ds/agents): [N*G, Tc] 1 on the model's own tokens, 0 on observation
    # tokens, which are attended to but not trained on; None = completion_mask.
    loss_mask: torch.Tensor | None = None
    columns: dict | None = None  # per-row lists the reward functions get as extra columns


@runtime_checkable
class RolloutBackend(Protocol):
    """A generation engine the trainer can call. Under ZeRO-3 all ranks call it together.

    Around every `generate`, select.ColocatedRollout calls, in this order: `wake()`, then
    `sync_weights(policy)` if the policy took an optimizer step since the last sync, then
    `generate`, then `sleep()` (also when generate raises). The hooks exist for an engine
    colocated with training on the same GPUs that keeps its own copy of the weights and its own
    KV cache (vLLM and the like):
    - `sync_weights(policy)`: copy the policy's current weights into the engine. Under ZeRO-3
      every parameter is sharded, so each is gathered (`deepspeed.zero.GatheredParameters`, all
      ranks together, one parameter or layer at a time to bound memory) and handed to the
      engine's weight loader; a prefix cache must then be reset, since cached keys and values
      belong to the old weights.
    - `sleep()`: free the engine's device memory (KV cache, and its weights if they can be
      reloaded) for the update, which needs it for activations, gradients and optimizer state.
    - `wake()`: take it back before the next rollout.
    Our own engines read the live policy weights (HybridRollout gathers the ZeRO-3 shards at each
    call and frees them, with its KV cache, when the call returns; DeepSpeed's hybrid engine
    generates from the training engine itself), so for them the three hooks do nothing.
    """

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        group_size: int,
        params: SamplingParams,
        seed: int,
    ) -> RolloutOutput: ...

    def sync_weights(self, policy) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


class ReadsLiveWeights:
    """The hooks of a backend that generates from the live policy weights: nothing to do (see
    RolloutBackend): no copy to sync, no memory held between calls."""

    def sync_weights(self, policy) -> None:
        return None

    def sleep(self) -> None:
        return None

    def wake(self) -> None:
        return None


def left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids [N, Tp], mask [N, Tp]) left-padded to the longest, on `device`."""
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    ids, mask = batch.left_pad(list(prompt_ids), pad_token_id)
    return ids.to(device), mask.to(device)


def mask_through_first_stop(
    completion_ids: torch.Tensor, stop_token_ids: Sequence[int], valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, T] that is 1 up to and including the first stop token, and `stopped [B]`.

    `valid [B, T]` (optional) marks positions the engine actually produced. Used to post-process
    engines that run past EOS (HF generate in the benchmark, DeepSpeed's rollout).
    """
    if valid is None:
        valid = torch.ones_like(completion_ids, dtype=torch.bool)
    valid = valid.bool()
    if len(stop_token_ids) == 0:
        return valid.long(), torch.zeros(completion_ids.shape[0], dtype=torch.bool,
                                         device=completion_ids.device)
    stops = torch.isin(completion_ids, torch.as_tensor(list(stop_token_ids),
                                                       device=completion_ids.device)) & valid
    # number of stop tokens strictly before each position; a position is kept while it is 0
    stops_before = torch.cumsum(stops.long(), dim=-1) - stops.long()
    mask = valid & (stops_before == 0)
    return mask.long(), stops.any(dim=-1)
