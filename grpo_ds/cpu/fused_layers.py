"""Fused decoder layers for the Llama family: fewer, larger kernels for the same math.

HF's decoder layer projects q, k and v with three matmuls (gate and up with two), and builds
RMSNorm and rotary embeddings from generic element-wise ops: rotary's `rotate_half` alone is a
neg, a cat along the last dim and the slice/zero-fill copies of their backward. Here q, k, v (and
gate, up) are one matmul with a wider output, which runs closer to the matmul peak on a CPU core,
and RMSNorm and rotary are one autograd Function each, with fewer passes over the activations.
`grpo-ds bench step --compare fused_layers=off` measures the effect on a GRPO step (README).

`fuse_decoder_layers(model)` gives each decoder layer of a Llama, Mistral or Qwen2 model a
forward that does the same computation with those fused pieces. Parameters, their names and
the state dict are untouched (only `forward` changes), so checkpoints stay HF's. Results differ
from HF's only by float rounding (a different summation order in the fused matmuls).

Under ZeRO-3 the fused matmuls read q/k/v weights outside their Linear's own forward, so each
decoder layer is made a ZeRO-3 leaf module: DeepSpeed gathers all of a layer's parameters at the
layer's hooks (one all-gather per layer instead of one per Linear, and fewer hooks). The fused
matmul saves the weights themselves for backward, never their concatenation: DeepSpeed releases
and re-gathers them, and a saved concatenation would keep every layer's full weights alive from
forward to backward.
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo_ds.config import FUSED_LAYER_CHOICES
from grpo_ds.cpu.onednn_linear import forward_product, input_grad, uses_onednn, weight_grad
from grpo_ds.cpu.packed_linear import is_packed, linear

FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class RMSNormFunction(torch.autograd.Function):
    """y = w * (x / sqrt(mean(x^2) + eps)), the normalised x rounded to x's dtype (as HF)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # HF: float32 for bf16/fp16
        inv_rms = torch.rsqrt(wide.square().mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (wide * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(inv_rms.dtype) * inv_rms
        grad_weight = (grad * normed.to(x.dtype)).sum(dim=tuple(range(grad.dim() - 1)))
        grad_normed = (grad * weight).to(inv_rms.dtype)
        # d/dx of n = x * r(x), r = (mean(x^2) + eps)^-1/2:  r * (g - n * mean(g * n))
        mean_gn = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.addcmul_(normed, mean_gn, value=-1).mul_(inv_rms)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> the last dim's two halves swapped (one copy; no neg, no cat)."""
    half = x.shape[-1] // 2
    return x.unflatten(-1, (2, half)).flip(-2).flatten(-2)


class RotaryFunction(torch.autograd.Function):
    """HF's rotary on [B, H, T, D]: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).

    With s_signed = (-sin1, sin2), rotate_half(x) * sin = swap_halves(x) * s_signed. The map is
    linear with transpose g -> g * cos + swap_halves(g * s_signed) (swap_halves is its own
    transpose), which is the backward.
    """

    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return torch.addcmul(x * cos, swap_halves(x), signed_sin)

    @staticmethod
    def backward(ctx, grad):
        cos, signed_sin = ctx.saved_tensors
        return grad * cos + swap_halves(grad * signed_sin), None, None


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """(-sin1, sin2) of sin [..., D]."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(q, k, cos, sin):
    """(q, k) [B, H, T, D] rotated; cos, sin [B, T, D] as HF's rotary_emb returns them."""
    cos, sin = cos.unsqueeze(1), signed_sin(sin).unsqueeze(1)
    return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)


class FusedLinearFunction(torch.autograd.Function):
    """x @ cat(weights).T + cat(biases): several Linears on one input as one matmul.

    Saves the weights, not their concatenation (module docstring: ZeRO-3 re-gathers them), and
    concatenates again in backward. `onednn`: the forward and input-gradient products run on
    oneDNN (onednn_linear.py; set when the Linears were put there).
    """

    @staticmethod
    def forward(ctx, x, onednn, num_weights, *weights_and_biases):
        weights, biases = weights_and_biases[:num_weights], weights_and_biases[num_weights:]
        ctx.has_bias, ctx.onednn = bool(biases), onednn
        ctx.save_for_backward(x, *weights)
        return forward_product(x, torch.cat(weights), torch.cat(biases) if biases else None,
                               onednn)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        sizes = [w.shape[0] for w in weights]
        grad_x = input_grad(grad, torch.cat(weights), ctx.onednn)
        grads = list(weight_grad(grad, x).split(sizes))
        if ctx.has_bias:
            grads += list(grad.flatten(0, -2).sum(0).split(sizes))
        return (grad_x, None, None, *grads)


FUSE_MIN_ROWS = 1024


def fused_linear(x: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """[lin(x) for lin in linears], computed as one matmul; the outputs are views of it.

    A decode step without autograd (a few rows per sequence) runs the Linears one by one: its
    matmuls are small, and concatenating the weights at every step would cost more than the
    wider matmul saves. So does any call while a rollout holds reordered copies of them
    (packed_linear.py): their own weights may be partitioned then."""
    small = x.numel() // x.shape[-1] < FUSE_MIN_ROWS
    if not torch.is_grad_enabled() and (small or is_packed(linears[0])):
        return [linear(lin, x) for lin in linears]
    biases = [lin.bias for lin in linears if lin.bias is not None]
    if biases and len(biases) != len(linears):
        raise ValueError("fused_linear needs all or none of the Linears to have a bias")
    out = FusedLinearFunction.apply(x, uses_onednn(linears[0]), len(linears),
                                    *(lin.weight for lin in linears), *biases)
    return list(out.split([lin.out_features for lin in linears], dim=-1))


def _sliding_window(attn: nn.Module, model_type: str) -> dict:
    """The sliding_window argument HF's attention of this model type passes, if any."""
    if model_type == "qwen2":
        return {"sliding_window": attn.sliding_window}
    if model_type == "mistral":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    return {}


def fused_layer_forward(self, hidden_states, attention_mask=None, position_ids=None,
                        past_key_values=None, use_cache=False, position_embeddings=None,
                        **kwargs):
    """The decoder layer's forward (HF's LlamaDecoderLayer/Qwen2DecoderLayer) with fused pieces.

    Bound to each layer by fuse_decoder_layers; `self` is the layer.
    """
    cache = kwargs.pop("cache", past_key_values)  # transformers >= 5.24 names it `cache`
    attn, mlp = self.self_attn, self.mlp
    residual = hidden_states
    x = rms_norm(self.input_layernorm, hidden_states)
    heads_shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = fused_linear(x, [attn.q_proj, attn.k_proj, attn.v_proj])
    # v gets its own storage: attention saves v for backward, and a view would keep the whole
    # [.., q | k | v] buffer (q and k before rotary) alive until then (HF's layer does not)
    q, k, v = (t.view(heads_shape).transpose(1, 2) for t in (q, k, v.contiguous()))
    q, k = apply_rotary(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                      self._fused_eager)
    out, _ = attention(attn, q, k, v, attention_mask,
                       dropout=attn.attention_dropout if attn.training else 0.0,
                       scaling=attn.scaling, **self._fused_sliding, **kwargs)
    hidden_states = residual + attn.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())
    residual = hidden_states
    x = rms_norm(self.post_attention_layernorm, hidden_states)
    gate, up = fused_linear(x, [mlp.gate_proj, mlp.up_proj])
    return residual + mlp.down_proj(mlp.act_fn(gate) * up)


def fusable(model: nn.Module) -> str | None:
    """Why `model`'s layers cannot be fused, or None when they can."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {FUSED_MODEL_TYPES}"
    if getattr(model.config, "hidden_act", None) not in ("silu", "swish"):
        return f"hidden_act {model.config.hidden_act!r} is not silu"
    if any(hasattr(m, "lora_A") for m in model.modules()):
        return "LoRA adapters wrap its Linears (the fused forward would skip them)"
    return None


def fuse_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Give every decoder layer of `model` (a Llama/Mistral/Qwen2 causal LM) the fused forward,
    and flag the layers as ZeRO-3 leaf modules. Call before deepspeed.initialize. Returns the
    layers; raises ValueError with the reason for any other model."""
    from deepspeed.utils import set_z3_leaf_modules

    reason = fusable(model)
    if reason:
        raise ValueError(f"cannot fuse the decoder layers of {type(model).__name__}: {reason}")
    layers = list(model.model.layers)
    model_type = model.config.model_type
    for layer in layers:
        layer.forward = types.MethodType(fused_layer_forward, layer)
        layer._fused_sliding = _sliding_window(layer.self_attn, model_type)
        # HF's own fallback when _attn_implementation is "eager" (not in ALL_ATTENTION_FUNCTIONS)
        layer._fused_eager = sys.modules[type(layer.self_attn).__module__].eager_attention_forward
    if layers:
        set_z3_leaf_modules(model, [type(layers[0])])
    return layers


def is_fused(model: nn.Module) -> bool:
    """Whether fuse_decoder_layers gave `model`'s decoder layers the fused forward."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return any(getattr(layer.forward, "__func__", None) is fused_layer_forward
               for layer in layers)


def apply_fused_layers(model: nn.Module, choice: str) -> str:
    """model.fused_layers: "auto" fuses when the model type supports it, "on" requires it (error
    otherwise), "off" keeps HF's layers. Returns a line saying which layers run."""
    if choice not in FUSED_LAYER_CHOICES:
        raise ValueError(f"model.fused_layers={choice!r}: must be one of {FUSED_LAYER_CHOICES}")
    if choice == "off":
        return "decoder layers: HF's (model.fused_layers=off)"
    reason = fusable(model)
    if reason and choice == "auto":
        return f"decoder layers: HF's ({reason}; model.fused_layers=auto)"
    layers = fuse_decoder_layers(model)  # raises with the reason when choice is "on" and it cannot
    return f"decoder layers: fused ({len(layers)} layers, grpo_ds/cpu/fused_layers.py)"
