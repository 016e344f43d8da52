"""HybridRollout: sample G completions per prompt from the training policy, in place.

One `generate` call:
  1. switch to inference mode: no autograd, model.eval() (train mode restored afterwards),
     DeepSpeed's ZeRO-3 forward hooks suspended (see gather.py for why);
  2. hold the weights: "full" gathers every parameter once for the whole call, "layers" gathers
     groups of decoder layers per forward (with prefetch) when a memory budget says the full
     model does not fit, "none" when the model is not partitioned; on CPU the Linears then run
     on weights reordered for oneDNN (packed_linear.py: once per call, or per group gather);
  3. decode (decode.py): shared prefill, G samples per prompt, compaction, lockstep if needed,
     in as many passes as `max_batch_rows` needs (passes.py): whole groups per pass, each pass's
     KV cache freed before the next, the weights held once for all of them;
  4. free the gathered weights and return a RolloutOutput grouped by prompt.

Under ZeRO-3 every rank calls `generate` together with its own prompts (any number, even 0).
Passes over fully gathered weights run no collectives, so ranks may run different numbers of
them. With layer groups every forward is collective: the ranks agree on the number of passes
with one all-reduce (MAX), and a rank with fewer runs empty passes that only join the gathers.

Determinism: all randomness comes from one table of uniforms [N*G, max_new_tokens] drawn from a
torch.Generator seeded with `seed`; row r at step t always uses uniforms[r, t]. The same
(seed, prompts, G, params) gives the same samples, whatever the batch composition or gather mode.
Passes keep this: row r draws uniforms[r] in whichever pass it runs, and every pass keeps the
call's prompt width (left padding), so a row's inputs are those of one pass. What is guaranteed
is the same uniforms per row; the tokens are the same wherever a row's logits do not depend on
the rows decoded beside it, which holds bit for bit on the CPU kernels the tests run (one pass
vs several, tests/test_rollout_passes.py). A GPU kernel chosen by batch size may change the last
bits of a logit, and a sample that falls on a boundary of the sampler's CDF may then differ.

Why torch.no_grad and not torch.inference_mode: ZeRO-3 swaps `param.data` when it gathers and
frees parameters; tensors created inside inference_mode would become the parameters' storage
and later break autograd in training. no_grad is safe and nearly as fast here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from grpo_ds.config import PACKED_WEIGHT_CHOICES
from grpo_ds.cpu.packed_linear import packing_supported
from grpo_ds.model_spec import generation_row_bytes, llama_spec
from grpo_ds.rollout.attention import shared_prefix_attention
from grpo_ds.rollout.backend import ReadsLiveWeights, RolloutOutput, SamplingParams, left_pad
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
from grpo_ds.rollout.passes import concat_results, plan_passes, rows_that_fit
from grpo_ds.rollout.stops import StopChecker
from grpo_ds.rollout.turns import TurnSession, draw_uniforms, extension_unsupported

GATHER_MODES = ("auto", "full", "layers")


class HybridRollout(ReadsLiveWeights):
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
    max_batch_rows: most rows (prompts x G) one pass decodes; None = all of a call's rows in
        one pass. Must hold one whole group (>= group_size at `generate`).
    """

    def __init__(self, model: nn.Module, pad_token_id: int, gather: str = "auto",
                 memory_budget_bytes: int | None = None, tokenizer=None,
                 layers_per_group: int | None = None, prefetch: bool = True,
                 compact: bool = True, share_prefix: bool = True, packed_weights: str = "auto",
                 max_batch_rows: int | None = None):
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
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        self.max_batch_rows = max_batch_rows
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
        max_rows = self._rows_bound(device, ids.shape[1] + params.max_new_tokens, group_size)
        passes = plan_passes(len(prompt_ids), group_size, max_rows)
        uniforms = draw_uniforms(ids.shape[0] * group_size, params, seed, device)
        stops = StopChecker(params.stop_token_ids, params.stop_strings, self.tokenizer, device)
        mode, timings = self.gather_mode(), {"gather_seconds": 0.0}
        start = time.perf_counter()
        with torch.no_grad(), eval_mode(self.model), suspend_zero3_hooks(self.model):
            result, extra = self._run(mode, ids, mask, passes, group_size, params, uniforms,
                                      stops, timings)
        seconds = time.perf_counter() - start
        extra["rows_per_pass"] = max(b - a for a, b in passes) * group_size
        return self._output(ids, mask, group_size, result, seconds, mode, timings, extra)

    def kv_extension_unsupported(self, rows: int, group_size: int, capacity: int) -> str | None:
        """Why a multi-turn rollout of `rows` episodes (contexts up to `capacity` tokens) cannot
        keep its KV cache between turns (turns.py), or None when it can."""
        reason = extension_unsupported(self.model.config)
        bound = self._rows_bound(self._device(), capacity, group_size)
        if reason is None and bound is not None and bound < rows:
            reason = (f"its {rows} episodes' caches do not fit one pass ({bound} rows: "
                      "rollout.max_batch_rows or the device's free memory)")
        return reason

    @contextmanager
    def turns(self, rows_hint: int) -> Iterator[TurnSession]:
        """A multi-turn session (turns.py) over weights held until it ends: one full gather, or
        layer groups gathered per forward (ranks in lockstep). Under ZeRO-3 every rank opens it
        together and runs as many turns. rows_hint: the most rows one forward runs."""
        device, mode, timings = self._device(), self.gather_mode(), {"gather_seconds": 0.0}
        with ExitStack() as stack:
            for context in (torch.no_grad(), eval_mode(self.model),
                            suspend_zero3_hooks(self.model)):
                stack.enter_context(context)
            shared = stack.enter_context(shared_prefix_attention(self.model,
                                                                 enabled=self.share_prefix))
            any_rank = None
            if mode == "layers":
                forward = LayeredForward(self.model, timings, self.layers_per_group, self.budget,
                                         prefetch=self.prefetch, pack=self.pack)
                if forward.collective:
                    rank_max = _rank_max_fn(self.model, device)

                    def any_rank(flag: bool) -> bool:
                        return rank_max(int(flag)) > 0
            else:
                stack.enter_context(full_gather(self.model, timings,
                                                rows_hint if self.pack else None))
                forward = FullForward(self.model)
            yield TurnSession(self, forward, any_rank, mode, timings, device, shared)

    def _rows_bound(self, device: torch.device, capacity: int, group_size: int) -> int | None:
        """Most rows a pass decodes: max_batch_rows when set; else, on a device with its own
        memory (a GPU), the rows whose KV cache and sampling buffers fit in 80 % of what is free
        once the weights are held; else (the CPU's RAM) all rows in one pass."""
        if self.max_batch_rows is not None or device.type == "cpu":
            return self.max_batch_rows
        from deepspeed.accelerator import get_accelerator

        params = list(self.model.parameters())
        held = 0  # weights the rollout is about to gather on top of what is allocated now
        if is_zero3_model(self.model):
            held = self.budget if self.gather_mode() == "layers" else gathered_bytes(params)
        free = get_accelerator().available_memory(device.index or 0) - (held or 0)
        spec = llama_spec(self.model.config.to_dict())
        per_row = generation_row_bytes(spec, params[0].element_size(), capacity)
        return rows_that_fit(max(free, 0), per_row, group_size)

    def _run(self, mode, ids, mask, passes, group_size, params, uniforms, stops, timings):
        with shared_prefix_attention(self.model, enabled=self.share_prefix) as shared:
            capacity = ids.shape[1] + params.max_new_tokens

            def one_pass(forward, start: int, stop: int, any_rank=None):
                """Decode prompts [start, stop): their own KV cache, their rows' uniforms."""
                cache = make_cache(self.model.config, capacity, shared)
                rows = slice(start * group_size, stop * group_size)
                return decode(forward, cache, ids[start:stop], mask[start:stop], group_size,
                              params, None if uniforms is None else uniforms[rows], stops,
                              self.pad_token_id, any_rank=any_rank, compact=self.compact)

            result, extra = self._decode(mode, one_pass, passes, ids, group_size, timings)
        return result, {**extra, "shared_prefix_kv": shared}

    def _decode(self, mode, one_pass, passes, ids, group_size, timings):
        if mode == "layers":
            forward = LayeredForward(self.model, timings, self.layers_per_group, self.budget,
                                     prefetch=self.prefetch, pack=self.pack)
            any_rank = None
            if forward.collective:  # every forward gathers: all ranks run as many passes
                rank_max = _rank_max_fn(self.model, ids.device)
                end = ids.shape[0]
                passes = passes + [(end, end)] * (rank_max(len(passes)) - len(passes))

                def any_rank(flag: bool) -> bool:
                    return rank_max(int(flag)) > 0
            result = concat_results([one_pass(forward, a, b, any_rank) for a, b in passes])
            return result, {"layers_per_group": forward.layers_per_group, "passes": len(passes)}
        pack_rows = max(b - a for a, b in passes) * group_size if self.pack else None
        with full_gather(self.model, timings, pack_rows) as packed:
            forward = FullForward(self.model)
            result = concat_results([one_pass(forward, a, b) for a, b in passes])
        return result, {"packed_weight_bytes": packed, "passes": len(passes)}

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


def _rank_max_fn(model: nn.Module, device: torch.device):
    """All-reduce MAX of an int over the group the parameters are partitioned across."""
    from deepspeed import comm as dist

    group = next(p for p in model.parameters() if hasattr(p, "ds_id")).ds_process_group

    def rank_max(value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())

    return rank_max
