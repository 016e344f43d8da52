"""Linear layers through oneDNN with their weights reordered once: CPU generation's matmuls.

A plain `F.linear` on CPU re-packs the weight into the kernel's blocked layout at every call.
Generation calls every Linear once per decode step on the same weights, so the rollout reorders
each weight once (`torch.ops.mkldnn._reorder_linear_weight`) and runs the step's matmuls on the
reordered copy (`torch.ops.mkldnn._linear_pointwise`): the generation bench's `a/unpacked`
row measures what it buys in a whole rollout. Without ZeRO-3 the copies are a second set of the
Linear weights while the rollout runs; under ZeRO-3 they stand in for the gathered ones
(rollout/gather.py, `full_gather`).

`packed_linears(model)` installs it for the duration of a `with` block; `linear(module, x)` is
what a caller that takes a Linear's weight itself (the fused decoder layers) calls instead of
F.linear so that it runs on the reordered copy too. Float32 results differ from MKL's in the
last bits (a different summation order), as any two matmul kernels do.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from grpo_ds.cpu.onednn_linear import forward_product, no_cpu_onednn, onednn_linear, uses_onednn

_PACKED = "_grpo_packed_weight"


def packing_supported(model: nn.Module) -> str | None:
    """None if `model`'s Linears can run on reordered oneDNN weights here, else why not."""
    reason = no_cpu_onednn(model, "oneDNN weight copies")
    if reason:
        return reason
    param = next(model.parameters())
    if param.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bf16 support in oneDNN"
    if param.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {param.dtype} (float32 and bfloat16 only)"
    return None


def is_packed(module: nn.Linear) -> bool:
    """Whether `module` runs on a reordered copy now (its own weight may be partitioned)."""
    return hasattr(module, _PACKED)


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x), on the reordered weight (and the bias copied with it) while `packed_linears`
    holds them."""
    packed = getattr(module, _PACKED, None)
    if packed is None:
        return forward_product(x, module.weight, module.bias, uses_onednn(module))
    weight, bias = packed
    return onednn_linear(x, weight, bias)


def linear_modules(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@contextmanager
def packed_linears(model: nn.Module, rows_hint: int, hold=None) -> Iterator[int]:
    """Reorder every nn.Linear weight of `model` once; their forwards use the copies until exit.

    The weights must stay as they are inside the block (no training step). `rows_hint` is the
    expected rows per call (oneDNN picks the layout for it; other row counts work too).
    `hold(i)`, if given, is a context that makes the i-th Linear's (of `linear_modules`) weight
    whole while it is reordered: ZeRO-3 can gather it and partition it again right after, the
    copy standing in for the gathered weight. The bias is copied too: ZeRO-3 partitions it
    with the weight, and oneDNN rejects the empty tensor a partitioned bias leaves behind (the
    "could not create a primitive descriptor" of Qwen2's q/k/v biases). Yields the bytes of the
    copies.
    """
    linears = linear_modules(model)
    own_forwards = {m: m.__dict__["forward"] for m in linears if "forward" in m.__dict__}
    try:
        for i, m in enumerate(linears):
            with hold(i) if hold is not None else nullcontext():
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows_hint)
                bias = None if m.bias is None else m.bias.detach().clone()
            setattr(m, _PACKED, (packed, bias))
            m.forward = types.MethodType(linear, m)
        yield sum(t.numel() * t.element_size() for m in linears for t in getattr(m, _PACKED)
                  if t is not None)
    finally:
        for m in linears:
            m.__dict__.pop(_PACKED, None)
            m.__dict__.pop("forward", None)
            if m in own_forwards:  # a forward set on the instance before us comes back
                m.forward = own_forwards[m]
