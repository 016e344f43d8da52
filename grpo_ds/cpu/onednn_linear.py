"""Float32 training matmuls through oneDNN on CPU: the forward and input gradient of every Linear.

torch runs a float32 `F.linear` and `mm` on CPU through MKL. On an AVX-512 AMD CPU (a Zen4)
oneDNN's float32 matmul, called on the plain weight (`torch.ops.mkldnn._linear_pointwise`,
nothing reordered), ran the update's Linear shapes faster (fwd + dx ~106 GFLOP/s/core vs MKL's
~93); on an AVX2-only one (a Zen3) it ran them at 0.86-1.01x MKL's. So `auto` turns it on only
where torch reports AVX-512 (`auto_choice`), and the MFU peak counts the faster of the two
(bench/mfu.py). With it on, every nn.Linear of the policy and the reference runs

    forward        y  = x W^T + b      oneDNN
    input grad     dx = g W            oneDNN (on the transposed view of W: no copy)
    weight grad    dW = g^T x          torch.mm, as before: oneDNN would need both operands
                                       transposed, and timed slower for these shapes
    bias grad      db = sum_rows g

and the fused decoder layers' joint q/k/v and gate/up matmuls use the same two kernels.
Parameters, their names and the state dict are untouched (only `forward` changes), so
checkpoints stay HF's, and ZeRO-3 gathers the weights exactly as for F.linear (its hooks run on
the module call). Results differ from MKL's in the last bits (another summation order).
bfloat16 is left alone: torch already runs bf16 matmuls on oneDNN. `grpo-ds bench step
--compare onednn_linears=off` measures the effect on a GRPO step (README, Step throughput).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from grpo_ds.config import ONEDNN_LINEAR_CHOICES

_FLAG = "_grpo_onednn"  # set on a Linear whose matmuls run on oneDNN


def no_cpu_onednn(model: nn.Module, what: str) -> str | None:
    """Why `model` cannot run `what` on oneDNN (its parameters are not on CPU, or torch has no
    oneDNN), or None."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu":
        return f"{what} are for CPU parameters"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    return None


def onednn_unsupported(model: nn.Module) -> str | None:
    """None when `model`'s Linears can train on oneDNN here and gain from it, else why not."""
    reason = no_cpu_onednn(model, "oneDNN training matmuls")
    if reason:
        return reason
    param = next(model.parameters())
    if param.dtype != torch.float32:
        return f"dtype {param.dtype}: torch already runs bf16 matmuls on oneDNN (float32 only)"
    return None


def auto_choice(capability: str) -> str | None:
    """Why `auto` leaves float32 Linears on MKL for a CPU of torch's `capability` string
    (torch.backends.cpu.get_cpu_capability()), or None when oneDNN gains there (docstring)."""
    if capability.startswith("AVX512"):
        return None
    return (f"CPU capability {capability}: oneDNN's float32 matmuls gain over MKL's only with "
            f"AVX-512 (measured 0.86-1.01x MKL on an AVX2 CPU)")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's x [..., in] @ weight^T + bias, on a plain [out, in] weight (a strided view
    too) or one reordered by `mkldnn._reorder_linear_weight` (packed_linear.py)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def forward_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    onednn: bool) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T + bias: F.linear, or oneDNN's on the plain weight."""
    return onednn_linear(x, weight, bias) if onednn else F.linear(x, weight, bias)


def input_grad(grad: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """grad [..., out] @ weight [out, in] -> [..., in]."""
    return onednn_linear(grad, weight.t()) if onednn else grad @ weight


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over rows of grad^T x: [out, in]."""
    return grad.flatten(0, -2).T @ x.flatten(0, -2)


class OneDNNLinearFunction(torch.autograd.Function):
    """F.linear with its forward and input gradient on oneDNN (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return forward_product(x, weight, bias, onednn=True)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = input_grad(grad, weight, onednn=True) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(grad, x) if ctx.needs_input_grad[1] else None
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward on oneDNN; bound to each Linear by apply_onednn_linears."""
    return OneDNNLinearFunction.apply(x, self.weight, self.bias)


def uses_onednn(module: nn.Module) -> bool:
    """Whether apply_onednn_linears put this Linear's training matmuls on oneDNN."""
    return bool(getattr(module, _FLAG, False))


def apply_onednn_linears(model: nn.Module, choice: str) -> str:
    """model.onednn_linears: "auto" where supported and faster (float32 on an AVX-512 CPU), "on"
    requires support (error otherwise), "off" keeps F.linear. Call before deepspeed.initialize. Returns a line saying
    which matmuls run."""
    if choice not in ONEDNN_LINEAR_CHOICES:
        raise ValueError(f"model.onednn_linears={choice!r}: must be one of "
                         f"{ONEDNN_LINEAR_CHOICES}")
    if choice == "off":
        return "Linear matmuls: torch's default (model.onednn_linears=off)"
    reason = onednn_unsupported(model)
    if reason and choice == "on":
        raise ValueError(f"model.onednn_linears=on but {reason}")
    if not reason and choice == "auto":
        reason = auto_choice(torch.backends.cpu.get_cpu_capability())
    if reason:
        return f"Linear matmuls: torch's default ({reason}; model.onednn_linears=auto)"
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        setattr(m, _FLAG, True)
        m.forward = types.MethodType(onednn_forward, m)
    return (f"Linear matmuls: oneDNN forward and input gradient ({len(linears)} Linears, "
            f"grpo_ds/cpu/onednn_linear.py)")
