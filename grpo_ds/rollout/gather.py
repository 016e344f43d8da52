"""Switching a (possibly ZeRO-3 partitioned) policy between training and inference mode.

Two ways to hold the weights while decoding:
- full gather: `deepspeed.zero.GatheredParameters(all params)` once per `generate` call. Decoding
  then runs no collectives, so ranks may stop at different lengths. Costs a full copy of the
  model per rank for the duration of the call.
- layer groups: the model is cut into groups (embeddings, k decoder layers at a time, final
  norm + lm_head). Every forward gathers one group, starts the all-gather of the next one
  (prefetch), computes, and frees the group. Peak weight memory is about two groups, but every
  forward is collective, so all ranks must run the same number of forwards (the decode loop
  keeps them in lockstep).

Trap, checked on this machine: an engine built by `deepspeed.initialize` with ZeRO-3 installs
forward hooks on every submodule that re-partition parameters after each submodule's forward,
even parameters gathered by `GatheredParameters`. A "gathered" model therefore re-gathers every
layer at every decode step (collectives again: slow, and a deadlock when ranks stop at different
lengths). `suspend_zero3_hooks` takes DeepSpeed's forward hooks off for the duration of
generation and puts the very same hook dicts back afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def is_zero3_model(model: nn.Module) -> bool:
    return any(is_zero3_param(p) for p in model.parameters())


def unique_params(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters without duplicates (tied embeddings appear twice), order kept."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def gathered_bytes(params: Sequence[nn.Parameter]) -> int:
    """Bytes the full (unpartitioned) parameters take: sum of ds_numel (or numel) * element size."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in unique_params(params))


def _is_deepspeed_hook(hook) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial wraps the real function
    return (getattr(fn, "__module__", None) or "").startswith("deepspeed.")


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


@contextmanager
def suspend_zero3_hooks(model: nn.Module) -> Iterator[None]:
    """Take DeepSpeed's ZeRO-3 forward hooks off every submodule; restore them on exit.

    Without this, gathered parameters are re-partitioned after each submodule forward (see the
    module docstring). Non-DeepSpeed hooks stay active.
    """
    saved = []
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name)
            if any(_is_deepspeed_hook(h) for h in hooks.values()):
                saved.append((module, name, hooks))
                kept = type(hooks)((k, h) for k, h in hooks.items() if not _is_deepspeed_hook(h))
                setattr(module, name, kept)
    try:
        yield
    finally:
        for module, name, hooks in saved:
            setattr(module, name, hooks)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """model.eval() for the duration; the previous train/eval flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def full_gather(model: nn.Module, timings: dict, pack_rows: int | None = None) -> Iterator[int]:
    """Gather every parameter once (no-op on an unpartitioned model); frees them on exit.

    pack_rows: the Linears run on copies reordered for oneDNN (packed_linear.py). Under ZeRO-3
    each Linear's weights are then gathered in turn (with prefetch), reordered and partitioned
    again: the copies take the place of the gathered Linears instead of adding to them. The rest
    (embeddings, norms; a tied lm_head's weight is the embedding) stays gathered for the call.
    Yields the bytes of the reordered copies (0 without pack_rows). Adds the all-gather time to
    timings["gather_seconds"].
    """
    from grpo_ds.cpu.packed_linear import linear_modules, packed_linears

    params = [p for p in model.parameters() if is_zero3_param(p)]
    linears = linear_modules(model) if pack_rows is not None else []
    # parameters some non-Linear module uses stay gathered for the whole call
    used_elsewhere = {id(p) for m in model.modules() if not isinstance(m, nn.Linear)
                      for p in m.parameters(recurse=False)}
    alone = {id(p) for m in linears for p in m.parameters(recurse=False)} - used_elsewhere
    kept = [p for p in params if id(p) not in alone]
    with ExitStack() as stack:
        if kept:
            import deepspeed

            start = time.perf_counter()
            stack.enter_context(deepspeed.zero.GatheredParameters(kept))
            timings["gather_seconds"] = (timings.get("gather_seconds", 0.0)
                                         + time.perf_counter() - start)
        if pack_rows is None:
            yield 0
            return
        gatherer = GroupGatherer([[p for p in m.parameters(recurse=False) if id(p) in alone]
                                  for m in linears], timings) if params else None
        hold = gatherer.hold if gatherer is not None else None
        yield stack.enter_context(packed_linears(model, pack_rows, hold))


class GroupGatherer:
    """Gathers parameter groups one at a time, prefetching the next group asynchronously.

    Usage per forward: `for g in range(n): with gatherer.hold(g): compute(group g)`. Groups are
    visited in order; holding group g starts the all-gather of group g+1 before the compute of
    group g. Only parameters that are partitioned at fetch time (ds_status NOT_AVAILABLE) are
    gathered and later freed, so persistent (small, always resident) parameters are untouched.
    Every rank must visit the same groups in the same order: the all-gathers are collective.
    """

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], timings: dict, prefetch=True):
        self.groups = [sorted((p for p in unique_params(g) if is_zero3_param(p)),
                              key=lambda p: p.ds_id) for g in groups]
        self.timings = timings
        self.prefetch = prefetch
        self._inflight: dict[int, tuple] = {}  # group -> (handle, params)

    def _start(self, g: int) -> None:
        if g >= len(self.groups) or g in self._inflight:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        params = [p for p in self.groups[g] if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        handle = params[0].all_gather_coalesced(params) if params else None
        self._inflight[g] = (handle, params)

    @contextmanager
    def hold(self, g: int) -> Iterator[None]:
        start = time.perf_counter()
        self._start(g)
        handle, params = self._inflight.pop(g)
        if handle is not None:
            handle.wait()
        if self.prefetch:
            self._start(g + 1)
        self.timings["gather_seconds"] = (self.timings.get("gather_seconds", 0.0)
                                          + time.perf_counter() - start)
        try:
            yield
        finally:
            if params:
                params[0].partition(param_list=params, has_been_updated=False)


def plan_layers_per_group(layer_bytes: int, edge_bytes: int, budget_bytes: int | None) -> int:
    """How many decoder layers to gather at once under `budget_bytes` of gathered weights.

    With prefetch, two neighbours are resident at once: (embeddings, group 1), (group k, group
    k+1) and (last group, norm + lm_head). So a group of L layers needs
    max(2 * L * layer_bytes, L * layer_bytes + edge_bytes) <= budget, with edge_bytes the larger
    of the embedding and head groups. At least 1 layer per group, even if that overshoots.
    """
    if budget_bytes is None or layer_bytes <= 0:
        return 1
    fit = min(budget_bytes // 2, budget_bytes - edge_bytes) // layer_bytes
    return max(1, int(fit))
