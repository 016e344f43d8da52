"""Tiny models and a text tokenizer built locally for tests: nothing is downloaded."""

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)


def text_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Character-level over printable ASCII, with <pad>/<bos>/<eos>/<unk>. With `vocab_size`,
    the ids beyond those are filler tokens "<xN>" (decodable, never produced by encoding), so a
    model of a real vocabulary's shape has a tokenizer of its size."""
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + sorted(set(string.printable))
    tokens += [f"<x{i}>" for i in range(len(tokens), vocab_size or 0)]
    vocab = {t: i for i, t in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def llama_config(tokenizer, **overrides) -> LlamaConfig:
    fields = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0}
    return LlamaConfig(**{**fields, **overrides})


def save_causal_lm(path: Path, tokenizer) -> Path:
    LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_reward_model(path: Path, tokenizer) -> Path:
    LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def calc(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def tool_calling_llama(tokenizer, open_bias: float = 3.0, digit_bias: float = 0.0,
                       dtype=None) -> LlamaForCausalLM:
    """A random tiny Llama (seed 0, eval mode) whose head's bias makes "[" (by `open_bias`) and
    "]" (the call markers), and with `digit_bias` the digits and ",", likely: random turns make
    tool calls, some valid. The tests' multi-turn model; `calc` is their tool."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    dtype = dtype or torch.float32
    lm = LlamaForCausalLM(llama_config(tokenizer)).to(dtype).eval()
    head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.copy_(lm.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids("[")] = open_bias
        head.bias[tokenizer.convert_tokens_to_ids("]")] = 3.0
        if digit_bias:
            head.bias[tokenizer.convert_tokens_to_ids(list("0123456789,"))] = digit_bias
    lm.lm_head = head
    return lm


def save_arithmetic_lm(path: Path):
    """The start model of the multi-rank GRPO scripts: a 2-layer Llama (hidden 32, seed 0) over
    the arithmetic task's tokenizer, written with that tokenizer to `path`."""
    from grpo_ds.model import build_tiny_llama
    from grpo_ds.tasks.arithmetic import build_tokenizer

    tokenizer = build_tokenizer()
    lm = build_tiny_llama(len(tokenizer), 32, 2, 4, 64, {"bos_token_id": 1, "eos_token_id": 2,
                                                          "pad_token_id": 0}, seed=0)
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)


def tiny_qwen2(vocab: int = 32, seed: int = 0):
    """A random Qwen2 causal LM: q/k/v projections with biases (Llama's have none)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
