"""The policy module DeepSpeed wraps, and how models come from and go to Hugging Face directories.

`CausalLMWithLogprobs` puts the log-prob computation inside the module that DeepSpeed wraps, so
every ZeRO-3 parameter fetch (including the lm_head's, chunk by chunk) runs under the engine's own
forward hooks, and the [B*G, T, vocab] logits are never materialised: only [chunk, vocab].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
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

        Returns (logprobs [N, Tc] float32, entropy [N, Tc] or None); 0 on columns that are
        padding in every row (they are trimmed off before the forward: no compute on them).
        """
        completion_len = completion_ids.shape[1]
        prompt_len = input_ids.shape[1] - completion_len
        start, stop = real_columns(attention_mask, completion_len)
        kept = self.same_on_all_ranks(stop - prompt_len, input_ids.device)  # completion columns
        input_ids, attention_mask = input_ids[:, start:], attention_mask[:, start:]
        targets = completion_ids
        extra = kept - completion_len  # > 0 when another rank has longer completions
        if extra > 0:
            pad = (0, extra)
            input_ids, attention_mask = F.pad(input_ids, pad), F.pad(attention_mask, pad)
            targets = F.pad(targets, pad)
        width = prompt_len - start + kept
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state
        # The token at position t is predicted by the hidden state at t - 1.
        hidden = hidden[:, -kept - 1:-1]
        # Recomputing the logits in backward saves memory only when there are several chunks:
        # the one chunk's logits are back in memory for its backward either way.
        several = hidden.shape[0] * kept > self.chunk_size
        logprobs, entropy = token_logprobs(hidden, self.lm.lm_head, targets[:, :kept],
                                           temperature=temperature, chunk_size=self.chunk_size,
                                           with_entropy=with_entropy,
                                           use_checkpoint=torch.is_grad_enabled() and several)
        return to_width(logprobs, completion_len), (None if entropy is None
                                                    else to_width(entropy, completion_len))

    def same_on_all_ranks(self, kept: int, device) -> int:
        """The widest `kept` over the ranks that partition this model under ZeRO-3, else `kept`.

        ZeRO-3 gathers lm_head's weight at every call, and token_logprobs calls it once per
        chunk of rows (twice with the backward recompute): every rank must make the same number
        of calls or the gathers pair up wrongly and the ranks hang. Ranks run micro-batches of
        the same size, so the same width gives the same chunk count. One all-reduce of one int.
        """
        weight = self.lm.lm_head.weight
        group = getattr(weight, "ds_process_group", None)
        if not hasattr(weight, "ds_id") or not dist.is_initialized():
            return kept
        if dist.get_world_size(group) == 1:
            return kept
        widest = torch.tensor([kept], dtype=torch.long, device=device)
        dist.all_reduce(widest, op=dist.ReduceOp.MAX, group=group)
        return int(widest.item())


def to_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """[N, k] -> [N, width]: cut, or pad with 0 on the right (callers index by column)."""
    if values.shape[1] >= width:
        return values[:, :width]
    return F.pad(values, (0, width - values.shape[1]))


def real_columns(attention_mask: torch.Tensor, completion_len: int) -> tuple[int, int]:
    """Columns [start, stop) of [prompt | completion] that hold a real token in some row.

    Prompts are left-padded and completions right-padded, so the all-padding columns of a batch
    sit at its two ends; dropping them changes no real token's output (positions come from the
    attention mask, and causal attention never looks right). The last prompt column (it predicts
    the first completion token) and the first completion column are always kept.
    """
    prompt_len = attention_mask.shape[1] - completion_len
    real = attention_mask.any(0).nonzero().squeeze(-1)
    if real.numel() == 0:
        return max(prompt_len - 1, 0), prompt_len + 1
    return (min(int(real[0]), max(prompt_len - 1, 0)),
            max(int(real[-1]) + 1, prompt_len + 1))


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


def load_pretrained(path: str | Path, dtype: str, attn_implementation: str = "sdpa"):
    """Load a local HF model. Call it with a live `HfDeepSpeedConfig` so ZeRO-3 loads it sharded."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                 attn_implementation=attn_implementation)
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
