"""Fused decoder layers: each piece by hand and by gradcheck, whole models against HF's layers."""

import copy
import math

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from grpo_ds.cpu.fused_layers import (
    FusedLinearFunction,
    RMSNormFunction,
    apply_fused_layers,
    apply_rotary,
    fusable,
    fuse_decoder_layers,
    is_fused,
    swap_halves,
)
from grpo_ds.rollout.forward import cache_kwarg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rms_norm_by_hand():
    # mean(x^2) = (9 + 16) / 2 = 12.5; x / sqrt(12.5) = (0.848528, 1.131371); times w = (1, 2)
    x = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    y = RMSNormFunction.apply(x, torch.tensor([1.0, 2.0], dtype=torch.float64), 0.0)
    assert torch.allclose(y, torch.tensor([[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]],
                                          dtype=torch.float64))


def test_rms_norm_gradients_and_hf_agreement():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))
    norm = LlamaRMSNorm(8, eps=1e-6).double()
    norm.weight.data.copy_(w.detach())
    assert torch.allclose(RMSNormFunction.apply(x, w, 1e-6), norm(x), atol=1e-12)


def test_rms_norm_bf16_matches_hf_rounding():
    x = torch.randn(4, 64).to(torch.bfloat16)
    norm = LlamaRMSNorm(64).to(torch.bfloat16)
    norm.weight.data.normal_()
    assert torch.equal(RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon), norm(x))


def test_swap_halves():
    assert swap_halves(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [3.0, 4.0, 1.0, 2.0]


def test_rotary_by_hand():
    # D = 2: (x1, x2) rotated by theta = (x1 cos - x2 sin, x2 cos + x1 sin)
    theta = math.pi / 6
    x = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 2)
    cos = torch.full((1, 1, 2), math.cos(theta), dtype=torch.float64)
    sin = torch.full((1, 1, 2), math.sin(theta), dtype=torch.float64)
    q, _ = apply_rotary(x, x, cos, sin)
    c, s = math.cos(theta), math.sin(theta)
    assert torch.allclose(q.flatten(), torch.tensor([c - 2 * s, 2 * c + s], dtype=torch.float64))


def test_rotary_matches_hf_and_gradcheck():
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    for ours, theirs in zip(apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.allclose(ours, theirs, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: apply_rotary(a, b, cos, sin), (q, k))


def test_fused_linear_gradcheck_with_biases():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, 4, dtype=torch.float64, requires_grad=True) for n in (5, 2)]
    bs = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (5, 2)]
    assert torch.autograd.gradcheck(
        lambda *a: FusedLinearFunction.apply(a[0], False, 2, *a[1:]), (x, *ws, *bs))
    out = FusedLinearFunction.apply(x, False, 2, *ws, *bs)
    assert torch.allclose(out[..., :5], x @ ws[0].T + bs[0])


def tiny(kind: str):
    dims = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**dims, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    if kind == "qwen2":  # q/k/v biases; the second layer slides over 4 tokens
        return Qwen2ForCausalLM(Qwen2Config(**dims, use_sliding_window=True, sliding_window=4,
                                            max_window_layers=1))
    return MistralForCausalLM(MistralConfig(**dims, sliding_window=4))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_fused_model_matches_hf_logits_and_gradients(kind):
    hf = tiny(kind).float()
    fused = copy.deepcopy(hf)
    fuse_decoder_layers(fused)
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    grads = []
    for model in (hf, fused):
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits.float().pow(2) * mask[..., None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if model is hf:
            hf_logits = logits
    assert torch.allclose(logits, hf_logits, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4), name


def test_fused_model_with_kv_cache_matches_hf():
    hf = tiny("llama").eval()
    fused = copy.deepcopy(hf)
    fuse_decoder_layers(fused)
    ids = torch.randint(3, 97, (2, 7))
    outs = []
    with torch.no_grad():
        for model in (hf, fused):
            cache = {cache_kwarg(model.forward): DynamicCache(config=model.config)}
            model(input_ids=ids[:, :6], use_cache=True, **cache)
            outs.append(model(input_ids=ids[:, 6:], use_cache=True, **cache).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_fused_model_bf16_close_to_hf():
    hf = tiny("llama").to(torch.bfloat16)
    fused = copy.deepcopy(hf)
    fuse_decoder_layers(fused)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits.float(), fused(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_unsupported_models_are_refused():
    model = tiny("llama")
    model.config.hidden_act = "gelu"
    assert "silu" in fusable(model)
    assert "HF's" in apply_fused_layers(model, "auto") and not is_fused(model)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="gpt2"):
        fuse_decoder_layers(model)
    with pytest.raises(ValueError, match="gpt2"):
        apply_fused_layers(model, "on")


def test_apply_fused_layers_choices():
    model = tiny("qwen2")
    assert "off" in apply_fused_layers(model, "off") and not is_fused(model)
    assert apply_fused_layers(model, "auto").startswith("decoder layers: fused (2 layers")
    assert is_fused(model)


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps from forward for backward (activations)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_fused_layers_keep_no_more_activation_memory_than_hf():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4))  # no GQA: attention saves k, v as is
    fused = copy.deepcopy(hf)
    fuse_decoder_layers(fused)
    ids = torch.randint(3, 97, (4, 16))
    assert saved_bytes(fused, ids) <= saved_bytes(hf, ids)


@pytest.mark.parametrize("batch", [2, 64])  # 2 x 17 rows: Linears one by one; 64 x 17: fused
def test_fused_model_without_autograd_matches_hf(batch):
    hf = tiny("qwen2").eval()
    fused = copy.deepcopy(hf)
    fuse_decoder_layers(fused)
    ids = torch.randint(3, 97, (batch, 17))
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5)
