"""Sizes of a decoder-only LM read from its config alone (no weights): what the planner counts.

Llama and Mistral share one parameter layout and are counted by formula (`llama_spec`); any other
causal LM is built by transformers on the meta device and its parameters counted
(`meta_model_spec`), which allocates nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LLAMA_STYLE = ("llama", "mistral")  # same parameter layout; counted from the config by formula


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of a decoder-only LM, read from its config (no weights)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    embed_params: int
    layer_leaves: tuple[int, ...]  # params of each leaf module of one decoder layer, forward order
    final_norm_params: int
    head_params: int  # 0 when tied to the embedding

    @property
    def layer_params(self) -> int:
        return sum(self.layer_leaves)

    @property
    def total_params(self) -> int:
        return (self.embed_params + self.num_layers * self.layer_params + self.final_norm_params
                + self.head_params)

    @property
    def largest_leaf(self) -> int:
        """Largest single module (DeepSpeed's `largest_layer_params`)."""
        return max(self.embed_params, self.head_params, *self.layer_leaves)

    def leaves_in_forward_order(self) -> list[tuple[str, int]]:
        """(param id, numel) of every leaf module in forward order; a tied head reuses "embed"."""
        layers = [(f"layer{i}.{j}", n) for i in range(self.num_layers)
                  for j, n in enumerate(self.layer_leaves)]
        head = ("embed", self.embed_params) if self.tie_word_embeddings else ("head", self.head_params)
        return [("embed", self.embed_params), *layers, ("norm", self.final_norm_params), head]


# Bytes one sampled row holds per vocabulary entry (rollout/sampling.py): float32 logits, scaled,
# sorted with their int64 order, and a float64 cdf.
SAMPLING_BYTES_PER_LOGIT = 32


def kv_cache_bytes(spec: ModelSpec, p: int, sequences: int, seq_len: int) -> int:
    """2 (k, v) x layers x kv_heads x head_dim x bytes x sequences x tokens."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * p * sequences * seq_len


def generation_row_bytes(spec: ModelSpec, p: int, seq_len: int) -> int:
    """Bytes one generated row needs at most: its keys and values for `seq_len` tokens in every
    layer (the prompt part, kept once per group, is counted per row: an over-count) and its
    sampling buffers over the vocabulary. `p`: bytes per element of the KV cache."""
    return kv_cache_bytes(spec, p, 1, seq_len) + spec.vocab_size * SAMPLING_BYTES_PER_LOGIT


def llama_spec(config: dict, name: str = "llama") -> ModelSpec:
    """Parameter layout of a Llama/Mistral decoder from its HF config dict."""
    h, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    abias, mbias = int(bool(config.get("attention_bias"))), int(bool(config.get("mlp_bias")))
    leaves = (h,  # input_layernorm
              h * q_out + abias * q_out, h * kv_out + abias * kv_out, h * kv_out + abias * kv_out,
              q_out * h + abias * h,  # o_proj
              h,  # post_attention_layernorm
              h * inter + mbias * inter, h * inter + mbias * inter, inter * h + mbias * h)
    tied = bool(config.get("tie_word_embeddings", False))
    return ModelSpec(name, vocab, h, inter, config["num_hidden_layers"], heads, kv_heads, head_dim,
                     tied, vocab * h, leaves, h, 0 if tied else vocab * h)


def meta_model_spec(config: dict, name: str) -> ModelSpec:
    """Any causal-LM architecture: count a transformers model built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    embed_n = embed.weight.numel()
    head_n = 0 if head is None or tied else sum(p.numel() for p in head.parameters())
    n_layers = hf_config.num_hidden_layers
    layers = next(m for m in model.modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers)
    leaves = tuple(n for m in layers[0].modules()
                   if (n := sum(p.numel() for p in m.parameters(recurse=False))))
    heads = hf_config.num_attention_heads
    h = hf_config.hidden_size
    return ModelSpec(
        name, hf_config.vocab_size, h, getattr(hf_config, "intermediate_size", 4 * h), n_layers,
        heads, getattr(hf_config, "num_key_value_heads", None) or heads,
        getattr(hf_config, "head_dim", None) or h // heads, tied, embed_n, leaves,
        total - embed_n - head_n - n_layers * sum(leaves), head_n)


def load_model_spec(path: str | Path) -> ModelSpec:
    """A local HF model directory or a config.json path -> ModelSpec (config.json only)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    config = json.loads(file.read_text())
    name = path.name if path.is_dir() else path.parent.name or file.stem
    if config.get("model_type") in LLAMA_STYLE:
        return llama_spec(config, name)
    return meta_model_spec(config, name)
