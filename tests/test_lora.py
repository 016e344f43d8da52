"""LoRA config, checks and the pure parts of grpo_ds/lora.py on unsharded tiny models (seconds)."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from grpo_ds.config import ConfigError, LoraConfig, load_config, validate
from grpo_ds.cpu.fused_layers import fusable
from grpo_ds.lora import (
    AdapterFreeReference,
    adapter_numel,
    add_adapters,
    lora_scalings,
    merge_lora_weights,
)
from grpo_ds.model import CausalLMWithLogprobs
from tests.tiny_models import llama_config, text_tokenizer


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(text_tokenizer()))


def test_lora_fields_parse_from_overrides_and_yaml(tmp_path):
    cfg = load_config(None, ["--model.lora.rank=8", "--model.lora.target_modules=q_proj,v_proj"])
    assert cfg.model.lora.rank == 8 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.lora.alpha == 16.0 and cfg.model.lora.dropout == 0.0
    file = tmp_path / "c.yaml"
    file.write_text("model:\n  lora:\n    rank: 4\n    alpha: 8\n")
    cfg = load_config(str(file))
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (4, 8.0)
    assert not LoraConfig().enabled and LoraConfig(rank=8).enabled


def test_unknown_or_malformed_lora_fields_are_named():
    with pytest.raises(ConfigError, match="model.lora.rnk"):
        load_config(None, ["--model.lora.rnk=8"])
    with pytest.raises(ConfigError, match="model.lora.rank: expected int, got 'x'"):
        load_config(None, ["--model.lora.rank=x"])
    with pytest.raises(ConfigError, match="model.dtype' has no fields"):
        load_config(None, ["--model.dtype.x=1"])


@pytest.mark.parametrize("override, message", [
    ("--model.lora.rank=-1", "model.lora.rank=-1"),
    ("--model.lora.dropout=1", "model.lora.dropout=1.0"),
    ("--model.lora.alpha=0", "model.lora.alpha=0.0"),
    ("--model.lora.target_modules=q_proj,lm_head", "lm_head is not supported"),
    ("--model.lora.target_modules=all-linear,q_proj", "all-linear stands alone"),
    ("--model.fused_layers=on", "fused decoder layers"),
])
def test_validate_refuses_bad_lora_settings(override, message):
    cfg = load_config(None, ["--model.lora.rank=8", override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)


def test_adapter_path_must_be_a_safetensors_peft_dir(tmp_path):
    cfg = load_config(None, [f"--model.lora.adapter_path={tmp_path}"])
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        validate(cfg, 1)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="adapter_model.bin is refused"):
        validate(cfg, 1)


def test_merge_on_hand_worked_numbers():
    # W = [[1, 0], [0, 1]], A = [[1, 2]] (r=1, in=2), B = [[1], [3]] (out=2), scaling 0.5:
    # W + 0.5 * B @ A = [[1 + 0.5, 1], [1.5, 1 + 3]]
    state = {"l.base_layer.weight": torch.eye(2), "l.base_layer.bias": torch.tensor([7., 8.]),
             "l.lora_A.default.weight": torch.tensor([[1., 2.]]),
             "l.lora_B.default.weight": torch.tensor([[1.], [3.]]),
             "norm.weight": torch.ones(2)}
    merged = merge_lora_weights(state, {"l": 0.5})
    assert set(merged) == {"l.weight", "l.bias", "norm.weight"}
    assert torch.equal(merged["l.weight"], torch.tensor([[1.5, 1.], [1.5, 4.]]))
    assert torch.equal(merged["l.bias"], torch.tensor([7., 8.]))


def test_adapters_in_place_seeded_and_the_reference_is_the_base():
    lm, base = tiny_llama(), tiny_llama()
    peft_model = add_adapters(lm, LoraConfig(rank=2, alpha=4, target_modules=["q_proj",
                                                                              "v_proj"]), 3)
    again = add_adapters(tiny_llama(), LoraConfig(rank=2, alpha=4, target_modules=["q_proj",
                                                                                   "v_proj"]), 3)
    a = lm.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a, again.get_base_model().model.layers[0].self_attn.q_proj
                       .lora_A["default"].weight)
    # r * (in + out) per adapted Linear: q is 32 -> 32, v is 32 -> 16 (2 kv heads of 8)
    assert adapter_numel(lm) == 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert lora_scalings(lm)["model.layers.1.self_attn.v_proj"] == 2.0
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B = 0 would make the adapters invisible
    policy = CausalLMWithLogprobs(lm, chunk_size=8).train()
    input_ids = torch.randint(4, 90, (2, 9))
    mask, completion = torch.ones_like(input_ids), input_ids[:, -3:]
    ref, _ = AdapterFreeReference(policy, peft_model)(input_ids, mask, completion)
    want, _ = CausalLMWithLogprobs(base, chunk_size=8).eval()(input_ids, mask, completion)
    assert torch.equal(ref, want)
    assert policy.training
    with torch.no_grad():
        adapted, _ = policy.eval()(input_ids, mask, completion)
    assert (adapted - want).abs().max() > 1e-3


def test_fused_layers_stand_aside_for_adapters():
    lm = tiny_llama()
    assert fusable(copy.deepcopy(lm)) is None
    add_adapters(lm, LoraConfig(rank=2), 0)
    assert "LoRA" in fusable(lm)


def test_adapter_gradient_is_the_same_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        lm = tiny_llama()
        add_adapters(lm, LoraConfig(rank=2), 0)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.ones_like(p))
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy = CausalLMWithLogprobs(lm, chunk_size=8).train()
        input_ids = torch.arange(4, 22).reshape(2, 9)
        logprobs, _ = policy(input_ids, torch.ones_like(input_ids), input_ids[:, -3:])
        logprobs.sum().backward()
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_merged_save_of_a_tied_model_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo_ds.lora import write_merged

    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config(tokenizer, tie_word_embeddings=True))
    state = lm.state_dict()  # lm_head.weight is the embedding's tensor: safetensors refuses both
    write_merged(lm, state, tokenizer, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, lm.model.embed_tokens.weight)
