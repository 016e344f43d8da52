"""A KV cache that appends in place instead of re-concatenating at every decode step.

transformers' DynamicLayer grows with `torch.cat([keys, new], dim=-2)`: every step copies the
whole cache of every layer (measured here: about half of all decode time for a 25M model at
64 rows). `PreallocatedLayer` allocates [B, H, capacity, D] once, writes the new columns in
place and hands attention a view of the filled part. Compaction (`batch_select_indices`) and
shared prefill (`batch_repeat_interleave`) copy only the filled part.

`SharedPrefixLayer` goes one step further for G samples per prompt: instead of repeating the
prompt's keys/values G times after prefill, it keeps them once per prompt (`prefix_keys
[N, Hkv, Tp, D]`) and stores only each row's completion part; attention.py reads both. The
completion part grows in zero-filled chunks of OWN_CHUNK tokens, and attention reads the whole
buffer (contiguous) with the unfilled columns masked: a `[:, :, :t]` view of a longer buffer is
not contiguous, and CPU batched matmuls copy it first, which measured here cost more than the
matmuls themselves (a layer's own-part attention at t = 120, 64 rows: about 3.4 ms through
views, 1.3 ms on contiguous buffers).

Only plain full-attention layers are replaced; sliding-window layers keep their own class.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = self._empty_like(key_states, key_states.shape[0])
        self.value_buffer = self._empty_like(value_states, value_states.shape[0])
        self.is_initialized = True

    def _empty_like(self, states: torch.Tensor, rows: int) -> torch.Tensor:
        _, heads, _, dim = states.shape
        return states.new_empty((rows, heads, self.capacity, dim))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded ({end} tokens)")
        self._reserve(end)
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _reserve(self, end: int) -> None:
        """Make the buffers hold `end` columns (these are preallocated to the capacity)."""

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def _rebuild(self, pick) -> None:
        """New buffers holding `pick(filled part)` (a batch-dim indexing of the filled columns)."""
        if not self.is_initialized:
            return
        keys, values = pick(self.keys), pick(self.values)
        self.key_buffer = self._empty_like(keys, keys.shape[0])
        self.value_buffer = self._empty_like(values, values.shape[0])
        self.key_buffer[:, :, :self.length] = keys
        self.value_buffer[:, :, :self.length] = values
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda t: t.index_select(0, indices))


OWN_CHUNK = 32  # completion-part growth step: <= 31 masked columns read, a copy every 32 tokens


class SharedPrefixLayer(PreallocatedLayer):
    """Prefill as PreallocatedLayer; `batch_repeat_interleave(G)` then shares the prompt part.

    After sharing, `update` returns the whole completion buffers `[B, Hkv, alloc, D]` (alloc a
    multiple of OWN_CHUNK or the capacity, columns >= `length` zero) carrying a `shared_prefix`
    attribute (this layer: prefix_keys, prefix_values, rows, group_size, own_keep) that the
    attention function uses; `rows [B]` maps live rows to original rows i*G + g, `own_keep
    [alloc]` marks the filled columns. `keys`/`values` stay views of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.prefix_len, self.shared = 0, False

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.prefix_keys, self.prefix_values = self.keys.contiguous(), self.values.contiguous()
        self.prefix_len, self.group_size, self.shared = self.length, repeats, True
        rows = self.prefix_keys.shape[0] * repeats
        self.rows = torch.arange(rows, device=self.prefix_keys.device)
        self.capacity -= self.length
        self.length = 0
        self.key_buffer = self._zeros_like(self.prefix_keys, rows, 0)
        self.value_buffer = self._zeros_like(self.prefix_values, rows, 0)
        self._views()

    def _zeros_like(self, states: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        _, heads, _, dim = states.shape
        return states.new_zeros((rows, heads, columns, dim))

    def _views(self) -> None:
        super()._views()
        if self.shared:
            alloc = self.key_buffer.shape[-2]
            self.own_keep = torch.arange(alloc, device=self.key_buffer.device) < self.length

    def _reserve(self, end: int) -> None:
        """Shared: grow the completion buffers to the next multiple of OWN_CHUNK >= end (at most
        the capacity, so a short completion never holds more than max_new_tokens columns)."""
        if not self.shared or end <= self.key_buffer.shape[-2]:
            return
        alloc = min(-(-end // OWN_CHUNK) * OWN_CHUNK, self.capacity)
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = self._zeros_like(old, old.shape[0], alloc)
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        if not self.shared:
            return keys, values
        self.key_buffer.shared_prefix = self
        return self.key_buffer, self.value_buffer

    def get_seq_length(self) -> int:
        return self.prefix_len + self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.shared:
            return super().batch_select_indices(indices)
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self.rows = self.rows.index_select(0, indices)
        self._views()


def make_cache(config, capacity: int, share_prefix: bool = False) -> DynamicCache:
    """DynamicCache for `config` whose full-attention layers append in place (capacity tokens).

    share_prefix: keep prompt keys/values once per prompt (needs attention.shared_prefix_attention).
    """
    layer_cls = SharedPrefixLayer if share_prefix else PreallocatedLayer
    cache = DynamicCache(config=config)
    cache.layers = [layer_cls(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
