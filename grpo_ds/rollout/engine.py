"""HybridRollout: sample G completions per prompt from the training policy, in place.

One `generate` call:
  1. switch to inference mode: no autograd, model.eval() (train mode restored afterwards),
     DeepSpeed's ZeRO-3 forward hooks suspended (see gather.py for why);
  2. hold the weights: "full" gathers every parameter once for the whole call, "layers" gathers
     groups of decoder layers per forward (with prefetch) when a memory budget says the full
     model does not fit, "none" when the model is not partitioned; on CPU the Linears then run
     on weights reordered for oneDNN (packed_linear.py: once per call, or per group gather);
  3. decode (decode.py): shared prefill, G samples per prompt, compaction, lockstep if needed;
  4. free the gathered weights and return a RolloutOutput grouped by prompt.

Under ZeRO-3 every rank calls `generate` together with its own prompts (any number, even 0).

Determinism: all randomness comes from one table of uniforms [N*G, max_new_tokens] drawn from a
torch.Generator seeded with `seed`; row r at step t always uses uniforms[r, t]. The same
(seed, prompts, G, params) gives the same samples, whatever the batch composition or gather mode.

Why torch.no_grad and not torch.inference_mode: ZeRO-3 swaps `param.data` when it gathers and
frees parameters; tensors created inside inference_mode would become the parameters' storage
and later break autograd in training. no_grad is safe and nearly as fast here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from grpo_ds.config import PACKED_WEIGHT_CHOICES
from grpo_ds.cpu.packed_linear import packing_supported
from grpo_ds.rollout.attention import shared_prefix_attention
from grpo_ds.rollout.backend import RolloutOutput, SamplingParams, left_pad
from grpo_ds.rollout.cache import make_cache
from grpo_ds.rollout.decode import decode
from grpo_ds.rollout.forward import FullForward, LayeredForward, check_layered_support
from grpo_ds.rollout.gather import (
    eval_mode,
    full_gather,
    gathered_bytes,
    is_zero3_model,
    suspend_zero3_hooks,
)
from grpo_ds.rollout.stops import StopChecker

GATHER_MODES = ("auto", "full", "layers")


class HybridRollout:
    """Generation engine over the live policy (ZeRO-3 partitioned or plain).

    model: HF causal LM (e.g. `policy_engine.module`).
    pad_token_id: fills left padding of prompts and right padding of completions.
    gather: "full" | "layers" | "auto" (layers only if the full gathered model exceeds
        memory_budget_bytes; None budget => full).
    memory_budget_bytes: bytes of gathered weights allowed per rank (sizes the layer groups too).
    tokenizer: needed only for stop_strings.
    layers_per_group: force the layer-group size (default: from the budget, else 1).
    compact: drop finished rows from the batch (False only to test that it changes nothing).
    share_prefix: keep each prompt's KV once for its G samples (attention.py); needs the model's
        attention to be "sdpa" or "eager", silently off otherwise.
    packed_weights: "auto" | "on" | "off": on CPU, run the Linears on weights reordered for
        oneDNN (packed_linear.py) once per call (full) or after each group's gather (layers);
        auto = where supported.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, gather: str = "auto",
                 memory_budget_bytes: int | None = None, tokenizer=None,
                 layers_per_group: int | None = None, prefetch: bool = True,
                 compact: bool = True, share_prefix: bool = True, packed_weights: str = "auto"):
        if gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}, got {gather!r}")
        if packed_weights not in PACKED_WEIGHT_CHOICES:
            raise ValueError(f"packed_weights must be one of {PACKED_WEIGHT_CHOICES}, "
                             f"got {packed_weights!r}")
        unsupported = packing_supported(model) if packed_weights != "off" else None
        if packed_weights == "on" and unsupported:
            raise ValueError(f"packed_weights='on' but {unsupported}")
        self.pack = packed_weights != "off" and unsupported is None
        self.model, self.pad_token_id, self.tokenizer = model, pad_token_id, tokenizer
        self.gather, self.budget = gather, memory_budget_bytes
        self.layers_per_group, self.prefetch, self.compact = layers_per_group, prefetch, compact
        self.share_prefix = share_prefix
        if self.gather_mode() == "layers":
            check_layered_support(model)  # fail at construction, not at the first rollout

    def gather_mode(self) -> str:
        """"layers" or "full" as configured; "auto" picks layers iff the full copy exceeds budget."""
        if self.gather != "auto":
            return self.gather
        if self.budget is None or not is_zero3_model(self.model):
            return "full"
        return "layers" if gathered_bytes(list(self.model.parameters())) > self.budget else "full"

    def _device(self) -> torch.device:
        if is_zero3_model(self.model):
            from deepspeed.accelerator import get_accelerator

            return torch.device(get_accelerator().current_device_name())
        return next(self.model.parameters()).device

    def generate(self, prompt_ids: Sequence[Sequence[int]], group_size: int,
                 params: SamplingParams, seed: int) -> RolloutOutput:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        device = self._device()
        ids, mask = left_pad(prompt_ids, self.pad_token_id, device)
        rows = ids.shape[0] * group_size
        uniforms = None
        if params.temperature > 0:
            gen = torch.Generator(device=device).manual_seed(seed)
            uniforms = torch.rand((rows, params.max_new_tokens), generator=gen,
                                  dtype=torch.float64, device=device)
        stops = StopChecker(params.stop_token_ids, params.stop_strings, self.tokenizer, device)
        mode, timings = self.gather_mode(), {"gather_seconds": 0.0}
        start = time.perf_counter()
        with torch.no_grad(), eval_mode(self.model), suspend_zero3_hooks(self.model):
            result, extra = self._run(mode, ids, mask, group_size, params, uniforms, stops, timings)
        seconds = time.perf_counter() - start
        return self._output(ids, mask, group_size, result, seconds, mode, timings, extra)

    def _run(self, mode, ids, mask, group_size, params, uniforms, stops, timings):
        with shared_prefix_attention(self.model, enabled=self.share_prefix) as shared:
            cache = make_cache(self.model.config, ids.shape[1] + params.max_new_tokens, shared)
            result, extra = self._decode(mode, cache, ids, mask, group_size, params, uniforms,
                                         stops, timings)
        return result, {**extra, "shared_prefix_kv": shared}

    def _decode(self, mode, cache, ids, mask, group_size, params, uniforms, stops, timings):
        args = (cache, ids, mask, group_size, params, uniforms, stops, self.pad_token_id)
        if mode == "layers":
            forward = LayeredForward(self.model, timings, self.layers_per_group, self.budget,
                                     prefetch=self.prefetch, pack=self.pack)
            any_rank = _any_rank_fn(self.model, ids.device) if forward.collective else None
            result = decode(forward, *args, any_rank=any_rank, compact=self.compact)
            return result, {"layers_per_group": forward.layers_per_group}
        pack_rows = ids.shape[0] * group_size if self.pack else None
        with full_gather(self.model, timings, pack_rows) as packed:
            result = decode(FullForward(self.model), *args, compact=self.compact)
        return result, {"packed_weight_bytes": packed}

    def _output(self, ids, mask, group_size, result, seconds, mode, timings, extra):
        width = int(result.lengths.max()) if result.lengths.numel() else 0
        completion_mask = (torch.arange(width, device=ids.device).unsqueeze(0)
                           < result.lengths.unsqueeze(1)).long()
        tokens = int(result.lengths.sum())
        metrics = {
            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9),
            "prefill_seconds": result.prefill_seconds,
            "gather_seconds": timings.get("gather_seconds", 0.0),
            "gather_mode": mode if is_zero3_model(self.model) else f"{mode} (unpartitioned)",
            "forwards": result.forwards, **extra,
        }
        return RolloutOutput(
            prompt_ids=ids.repeat_interleave(group_size, 0),
            prompt_mask=mask.repeat_interleave(group_size, 0),
            completion_ids=result.tokens[:, :width].contiguous(),
            completion_mask=completion_mask,
            sampled_logprobs=result.logprobs[:, :width].contiguous(),
            truncated=~result.stopped,
            metrics=metrics,
        )


def _any_rank_fn(model: nn.Module, device: torch.device):
    """All-reduce MAX of a flag over the group the parameters are partitioned across."""
    from deepspeed import comm as dist

    group = next(p for p in model.parameters() if hasattr(p, "ds_id")).ds_process_group

    def any_rank(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())

    return any_rank
