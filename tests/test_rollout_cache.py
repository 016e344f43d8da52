"""The shared-prefix KV cache layer: chunked growth, masks of the filled part, compaction."""

import pytest
import torch

from grpo_ds.rollout.attention import shared_prefix_decode
from grpo_ds.rollout.cache import OWN_CHUNK, SharedPrefixLayer


def shared_layer(prompts=2, group=3, heads=2, prefix_len=4, dim=5, capacity=100):
    """A layer after a prefill of `prompts` rows and sharing with G = `group`."""
    layer = SharedPrefixLayer(capacity)
    prefix = torch.randn(prompts, heads, prefix_len, dim)
    layer.update(prefix, prefix + 1)
    layer.batch_repeat_interleave(group)
    return layer


def test_completion_part_grows_in_zeroed_contiguous_chunks():
    layer = shared_layer()
    written = []
    for step in range(OWN_CHUNK + 3):
        new = torch.randn(6, 2, 1, 5)
        keys, values = layer.update(new, -new)
        written.append(new)
        alloc = OWN_CHUNK if step < OWN_CHUNK else 2 * OWN_CHUNK
        assert keys.shape == (6, 2, alloc, 5) and keys.is_contiguous()
        assert keys.shared_prefix is layer
    filled = torch.cat(written, dim=2)
    t = filled.shape[2]
    assert torch.equal(keys[:, :, :t], filled) and torch.equal(values[:, :, :t], -filled)
    assert (keys[:, :, t:] == 0).all() and (values[:, :, t:] == 0).all()
    assert layer.own_keep.tolist() == [True] * t + [False] * (2 * OWN_CHUNK - t)
    assert torch.equal(layer.keys, filled) and layer.get_seq_length() == 4 + t


def test_compaction_keeps_rows_and_their_prompt_map():
    layer = shared_layer()
    first = torch.randn(6, 2, 1, 5)
    layer.update(first, first)
    layer.batch_select_indices(torch.tensor([1, 4, 5]))
    assert layer.rows.tolist() == [1, 4, 5]
    second = torch.randn(3, 2, 1, 5)
    keys, _ = layer.update(second, second)
    assert torch.equal(keys[:, :, 0], first[[1, 4, 5], :, 0])
    assert torch.equal(keys[:, :, 1], second[:, :, 0])
    assert layer.own_keep[:3].tolist() == [True, True, False]


def test_capacity_is_enforced_after_sharing():
    layer = shared_layer(prefix_len=4, capacity=6)  # 2 completion tokens fit
    for _ in range(2):
        keys, _ = layer.update(torch.zeros(6, 2, 1, 5), torch.zeros(6, 2, 1, 5))
        assert keys.shape[-2] == 2  # the chunk is cut to the capacity, not OWN_CHUNK columns
    with pytest.raises(RuntimeError, match="capacity"):
        layer.update(torch.zeros(6, 2, 1, 5), torch.zeros(6, 2, 1, 5))


def test_decode_attention_ignores_unfilled_columns_and_left_padding():
    # Worked against plain softmax attention over [real prefix columns, filled own columns].
    torch.manual_seed(0)
    layer = shared_layer(prompts=2, group=2, heads=1, prefix_len=3, dim=4)
    for _ in range(2):
        new = torch.randn(4, 1, 1, 4)
        keys, values = layer.update(new, new * 2)
    # prompt 0 is left-padded by one token: its first prefix column must be ignored
    keep = torch.tensor([[False, True, True, True, True]] * 2 + [[True] * 5] * 2)
    query = torch.randn(4, 1, 1, 4)
    out = shared_prefix_decode(query, keys, values, layer, keep[:, None, None, :], scaling=0.5)
    for r in range(4):
        p = r // 2
        k = torch.cat([layer.prefix_keys[p, 0], layer.keys[r, 0]])[keep[r]]
        v = torch.cat([layer.prefix_values[p, 0], layer.values[r, 0]])[keep[r]]
        expected = torch.softmax(query[r, 0] @ k.T * 0.5, -1) @ v
        assert torch.allclose(out[r, 0], expected, atol=1e-6)
