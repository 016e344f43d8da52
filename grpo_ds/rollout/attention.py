"""Decode attention that reads each prompt's keys/values once for all G samples.

After the shared prefill, the G samples of prompt i have identical prompt keys/values. Repeating
them G times (what HF does) costs G x the memory and G x the memory traffic of every decode
step, and at one query token per row attention is bound by that traffic. Here the cache keeps
the prompt part once per prompt, `prefix_keys [N, Hkv, Tp, D]`, and each row's own completion
part, `keys [B, Hkv, alloc, D]` (filled up to t, see cache.py). For live rows r (prompt p(r),
slot s(r) = r mod G):

    scores = [ q_r . prefix_keys[p(r)] ,  q_r . keys[r] ] * scaling       masked, softmax
    out_r  = probs_prefix . prefix_values[p(r)] + probs_own . values[r]

The prefix columns are masked by the attention mask (left padding), the own columns by the
cache's `own_keep` (filled columns); unfilled columns are zeros, so their probability 0 times
their value stays 0.

The prefix products run as one matmul per (prompt, kv head) over the G * (H / Hkv) queries of
that prompt: the prompt keys are read once per prompt instead of once per row.

The function is installed as the model's attention implementation for the duration of a
`generate` call (`shared_prefix_attention`); calls without a shared prefix (prefill, sliding
layers) go to the model's original implementation, and the masks keep the original format.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SUPPORTED = ("sdpa", "eager")


def _keep_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, 1, kv] bool (sdpa) or additive float (eager) -> keep [B, kv] bool; None stays."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1, :]
    return last if last.dtype == torch.bool else last == 0


def _by_slot(rows, group_size, num_prompts, values: torch.Tensor) -> torch.Tensor:
    """values [B, ...] of live rows -> [N, G, ...] by (prompt, slot), zeros in dead slots."""
    shape = (num_prompts, group_size) + tuple(values.shape[1:])
    if values.shape[0] == num_prompts * group_size:  # no row retired yet: rows is arange(N*G)
        return values.reshape(shape)
    grouped = values.new_zeros(shape)
    grouped[rows // group_size, rows % group_size] = values
    return grouped


def _of_rows(rows, group_size, grouped: torch.Tensor) -> torch.Tensor:
    """[N, G, ...] by (prompt, slot) -> [B, ...] of the live rows (inverse of _by_slot)."""
    num_prompts = grouped.shape[0]
    if rows.numel() == num_prompts * group_size:
        return grouped.reshape((rows.numel(),) + tuple(grouped.shape[2:]))
    return grouped[rows // group_size, rows % group_size]


def shared_prefix_decode(query, keys, values, prefix, attention_mask, scaling) -> torch.Tensor:
    """query [B, H, 1, D], keys/values [B, Hkv, alloc, D] -> attn_output [B, 1, H, D]."""
    batch, heads, _, dim = query.shape
    num_prompts, kv_heads, prefix_len, _ = prefix.prefix_keys.shape
    rep, group, rows = heads // kv_heads, prefix.group_size, prefix.rows
    q = query.reshape(batch, kv_heads, rep, dim) * scaling
    # prompt part: [N, Hkv, G*rep, D] @ [N, Hkv, D, Tp], then back to the live rows
    q_grouped = _by_slot(rows, group, num_prompts, q).transpose(1, 2)
    q_grouped = q_grouped.reshape(num_prompts, kv_heads, group * rep, dim)
    prefix_scores = q_grouped @ prefix.prefix_keys.transpose(-1, -2)
    prefix_scores = prefix_scores.reshape(num_prompts, kv_heads, group, rep, prefix_len)
    prefix_scores = _of_rows(rows, group, prefix_scores.transpose(1, 2))  # [B, Hkv, rep, Tp]
    own_scores = q @ keys.transpose(-1, -2)  # [B, Hkv, rep, alloc]
    scores = torch.cat([prefix_scores, own_scores], dim=-1)
    keep = _keep_mask(attention_mask)  # [B, Tp + t]: its prefix part holds the left padding
    own_keep = prefix.own_keep.expand(batch, -1)
    prefix_keep = keep[:, :prefix_len] if keep is not None else own_keep.new_ones(batch, prefix_len)
    keep = torch.cat([prefix_keep, own_keep], dim=-1)
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    prefix_probs, own_probs = probs.split([prefix_len, keys.shape[-2]], dim=-1)
    p_grouped = _by_slot(rows, group, num_prompts, prefix_probs).transpose(1, 2)
    p_grouped = p_grouped.reshape(num_prompts, kv_heads, group * rep, prefix_len)
    prefix_out = (p_grouped @ prefix.prefix_values).reshape(num_prompts, kv_heads, group, rep, dim)
    out = _of_rows(rows, group, prefix_out.transpose(1, 2)) + own_probs @ values
    return out.reshape(batch, 1, heads, dim)


def _make_attention(original: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    fallback = ALL_ATTENTION_FUNCTIONS.get_interface(original, eager_attention_forward)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        prefix = getattr(key, "shared_prefix", None)
        if prefix is not None and query.shape[2] != 1:
            raise NotImplementedError("a shared-prefix KV cache serves one query token per row")
        if prefix is None:
            return fallback(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        return shared_prefix_decode(query, key, value, prefix, attention_mask, scaling), None

    return attention


@contextmanager
def shared_prefix_attention(model, enabled: bool = True) -> Iterator[bool]:
    """Install the shared-prefix decode attention on `model`; yields False if off/unsupported."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    original = getattr(config, "_attn_implementation", None)
    if not enabled or original not in SUPPORTED:
        yield False
        return
    name = f"grpo_shared_prefix_{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, _make_attention(original))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    config._attn_implementation = name
    try:
        yield True
    finally:
        config._attn_implementation = original
