"""The policy module DeepSpeed wraps, and how models come from and go to Hugging Face directories.

`CausalLMWithLogprobs` puts the log-prob computation inside the module that DeepSpeed wraps, so
every ZeRO-3 parameter fetch (including the lm_head's, chunk by chunk) runs under the engine's own
forward hooks, and the [B*G, T, vocab] logits are never materialised: only [chunk, vocab].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from grpo_ds.logprobs import token_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CausalLMWithLogprobs(nn.Module):
    """Wraps a HF causal LM; forward returns per-token log-probs of the completion tokens."""

    def __init__(self, lm: nn.Module, chunk_size: int = 4096):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, completion_ids, temperature=1.0,
                with_entropy=False):
        """input_ids [N, Tp+Tc] = left-padded prompt + completion; completion_ids [N, Tc].

        Returns (logprobs [N, Tc] float32, entropy [N, Tc] or None).
        """
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        completion_len = completion_ids.shape[1]
        # The token at position t is predicted by the hidden state at t - 1.
        hidden = hidden[:, -completion_len - 1:-1]
        return token_logprobs(hidden, self.lm.lm_head, completion_ids, temperature=temperature,
                              chunk_size=self.chunk_size, with_entropy=with_entropy)


def build_tiny_llama(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                     max_positions: int, special: dict[str, int], seed: int) -> LlamaForCausalLM:
    """The embedded default's model, built from a config (identical on every rank by seed)."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False, **special,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_pretrained(path: str | Path, dtype: str):
    """Load a local HF model. Call it with a live `HfDeepSpeedConfig` so ZeRO-3 loads it sharded."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def save_hf_model(engine, tokenizer, out_dir: str | Path, dtype: str = "float32") -> None:
    """Gather the ZeRO-3 shards into rank 0 and write a safetensors model directory."""
    import deepspeed.comm as dist

    lm = engine.module.lm
    if engine.zero_optimization_stage() == 3:
        # Collective: every rank must call it; only rank 0 receives the full state dict.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if dist.get_rank() == 0:
        prefix = "lm."
        state = {k.removeprefix(prefix): v.to(DTYPES[dtype]) for k, v in state.items()}
        lm.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()
