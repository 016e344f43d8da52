"""Layer-by-layer forward, architecture support, gather planning, hooks, stop strings."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo_ds.rollout import HybridRollout, SamplingParams
from grpo_ds.rollout.gather import plan_layers_per_group

PAD, EOS = 0, 1


pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = {"vocab_size": 24, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def build(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    return model_cls(config_cls(**DIMS, **extra))


PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]


@pytest.mark.parametrize("model", [
    build(LlamaConfig, LlamaForCausalLM),
    build(Qwen2Config, Qwen2ForCausalLM),
    # window 4 < prompt + completion: the sliding mask really cuts
    build(MistralConfig, MistralForCausalLM, sliding_window=4),
], ids=["llama", "qwen2", "mistral-sliding"])
@pytest.mark.parametrize("layers_per_group", [1, 2])
def test_layered_forward_equals_full_model(model, layers_per_group):
    params = SamplingParams(max_new_tokens=8, temperature=0.9, stop_token_ids=(EOS,))
    full = HybridRollout(model, PAD, gather="full").generate(PROMPTS, 3, params, seed=3)
    layered = HybridRollout(model, PAD, gather="layers",
                            layers_per_group=layers_per_group).generate(PROMPTS, 3, params, seed=3)
    assert torch.equal(full.completion_ids, layered.completion_ids)
    assert torch.allclose(full.sampled_logprobs, layered.sampled_logprobs, atol=1e-6)
    assert layered.metrics["layers_per_group"] == layers_per_group


def test_layer_path_rejects_other_architectures():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(NotImplementedError, match="gather='full'"):
        HybridRollout(gpt2, PAD, gather="layers")
    # the full path runs any HF causal LM
    out = HybridRollout(gpt2, PAD, gather="full").generate(PROMPTS, 2, SamplingParams(4), 0)
    assert out.completion_ids.shape == (6, 4)


def test_plan_layers_per_group():
    # layer 10 B, edge (embeddings or head) 30 B, budget 100 B:
    # min(100 // 2, 100 - 30) // 10 = min(50, 70) // 10 = 5 layers
    assert plan_layers_per_group(10, 30, 100) == 5
    # edge 80 B: min(50, 20) // 10 = 2
    assert plan_layers_per_group(10, 80, 100) == 2
    # budget too small for even one layer: still 1; no budget: 1
    assert plan_layers_per_group(10, 95, 100) == 1
    assert plan_layers_per_group(10, 30, None) == 1


def test_auto_is_full_without_budget_or_partitioning():
    model = build(LlamaConfig, LlamaForCausalLM)
    assert HybridRollout(model, PAD).gather_mode() == "full"
    # an unpartitioned model never needs layer groups, whatever the budget
    assert HybridRollout(model, PAD, memory_budget_bytes=1).gather_mode() == "full"


def _deepspeed_like_hook(module, args):
    raise AssertionError("suspended hook ran")


_deepspeed_like_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"


def test_suspend_zero3_hooks_removes_only_deepspeed_hooks_and_restores_them():
    model = build(LlamaConfig, LlamaForCausalLM)
    calls = []
    layer = model.model.layers[0]
    ds_handle = layer.register_forward_pre_hook(_deepspeed_like_hook)
    layer.register_forward_hook(lambda m, a, o: calls.append("user hook"))
    before = layer._forward_pre_hooks
    # generate suspends the DeepSpeed hook (it would raise) but keeps the user hook
    HybridRollout(model, PAD).generate(PROMPTS[:1], 1, SamplingParams(2), 0)
    assert calls and layer._forward_pre_hooks is before  # same dict object back
    with pytest.raises(AssertionError, match="suspended hook ran"):
        model(torch.tensor([[3, 4]]))
    ds_handle.remove()


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "<>abcdefghijklmnopqrstuv"  # 24 symbols = DIMS vocab; "<" pad, ">" eos
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<", eos_token=">")


def test_stop_strings_end_completions_at_the_completing_token():
    tok = char_tokenizer()
    assert tok.decode([2, 3, 4]) == "abc"
    model = build(LlamaConfig, LlamaForCausalLM)
    stop = "ab"
    params = SamplingParams(max_new_tokens=40, stop_strings=(stop,))
    out = HybridRollout(model, PAD, tokenizer=tok).generate(PROMPTS, 16, params, seed=0)
    hits = 0
    for row in range(out.completion_ids.shape[0]):
        n = int(out.completion_mask[row].sum())
        text = tok.decode(out.completion_ids[row, :n].tolist())
        if out.truncated[row]:
            assert stop not in text and n == 40
        else:
            hits += 1
            assert text.endswith(stop) and stop not in text[:-1]
    assert hits > 0
