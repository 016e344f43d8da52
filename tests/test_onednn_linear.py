"""Float32 Linears on oneDNN (grpo_ds/cpu/onednn_linear.py): values and gradients against F.linear,
the choices, and the hand-over with generation's packed weights."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_ds.cpu.fused_layers import FusedLinearFunction, fuse_decoder_layers
from grpo_ds.cpu.onednn_linear import (
    OneDNNLinearFunction,
    apply_onednn_linears,
    auto_choice,
    onednn_forward,
    onednn_unsupported,
    uses_onednn,
)
from grpo_ds.cpu.packed_linear import is_packed, packed_linears

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")]


def test_linear_by_hand():
    # y = x W^T + b with x = [1, 2], W = [[1, 0], [2, 1], [0, 3]], b = [0, 1, 2]: y = [1, 5, 8];
    # with dL/dy = g = [1, 1, 1]: dx = g W = [3, 4], dW = g^T x = rows [1, 2], db = g
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]], requires_grad=True)
    b = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    y = OneDNNLinearFunction.apply(x, w, b)
    assert y.tolist() == [[1.0, 5.0, 8.0]]
    y.sum().backward()
    assert x.grad.tolist() == [[3.0, 4.0]]
    assert w.grad.tolist() == [[1.0, 2.0]] * 3 and b.grad.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_on_batched_and_strided_inputs(bias):
    torch.manual_seed(0)
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    # [2, 5, 16] taken as a non-contiguous view of a wider tensor
    x = torch.randn(2, 5, 32)[..., ::2].detach().requires_grad_(True)
    g = torch.randn(2, 5, 24)
    grads = []
    for fn in (F.linear, OneDNNLinearFunction.apply):
        params = [x, w] + ([b] if bias else [])
        y = fn(x, w, b)
        grads.append((y, *torch.autograd.grad(y, params, g)))
    for theirs, ours in zip(*grads):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_no_rows():
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.zeros(0, 4, requires_grad=True)
    y = OneDNNLinearFunction.apply(x, w, None)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 4) and torch.equal(w.grad, torch.zeros_like(w))


def test_fused_linear_function_on_onednn_matches_default():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 8, requires_grad=True)
    ws = [torch.randn(n, 8, requires_grad=True) for n in (5, 3)]
    outs = []
    for onednn in (False, True):
        y = FusedLinearFunction.apply(x, onednn, 2, *ws)
        outs.append((y, *torch.autograd.grad(y.square().sum(), [x, *ws])))
    for theirs, ours in zip(*outs):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=32))


@pytest.mark.parametrize("fused", [False, True])
def test_model_on_onednn_matches_default_logits_and_gradients(fused):
    default = tiny_llama()
    if fused:
        fuse_decoder_layers(default)
    ours = copy.deepcopy(default)
    assert apply_onednn_linears(ours, "on").startswith("Linear matmuls: oneDNN")
    assert all(uses_onednn(m) for m in ours.modules() if isinstance(m, nn.Linear))
    ids = torch.randint(0, 64, (2, 9))
    results = []
    for model in (default, ours):
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(results[1][1][name], grad, rtol=1e-4, atol=1e-6), name


def test_choices():
    model = tiny_llama()
    assert "off" in apply_onednn_linears(model, "off") and not uses_onednn(model.lm_head)
    with pytest.raises(ValueError, match="model.onednn_linears='fast'"):
        apply_onednn_linears(model, "fast")
    bf16 = tiny_llama().to(torch.bfloat16)
    assert "float32 only" in onednn_unsupported(bf16)
    assert "default" in apply_onednn_linears(bf16, "auto") and not uses_onednn(bf16.lm_head)
    with pytest.raises(ValueError, match="onednn_linears=on but dtype torch.bfloat16"):
        apply_onednn_linears(bf16, "on")
    assert "oneDNN forward and input gradient (15 Linears" in apply_onednn_linears(model, "on")


def test_auto_takes_onednn_only_on_avx512():
    assert auto_choice("AVX512") is None
    assert "AVX2" in auto_choice("AVX2") and "MKL" in auto_choice("AVX2")
    assert auto_choice("DEFAULT") is not None
    model = tiny_llama()
    line = apply_onednn_linears(model, "auto")
    expected = auto_choice(torch.backends.cpu.get_cpu_capability()) is None
    assert uses_onednn(model.lm_head) == expected
    assert line.startswith("Linear matmuls: oneDNN") == expected


def test_generation_packing_hands_the_forward_back():
    model = tiny_llama()
    apply_onednn_linears(model, "on")
    head = model.lm_head
    with torch.no_grad(), packed_linears(model, rows_hint=4):
        assert is_packed(head) and head.forward.__func__ is not onednn_forward
    assert not is_packed(head) and head.forward.__func__ is onednn_forward
