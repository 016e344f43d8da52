"""The generation bench's ceiling parts (grpo_ds/tools/bench/ceiling.py), counted by hand."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_ds.tools.bench import ceiling
from grpo_ds.tools.bench.ceiling import DecodeShape, kv_read_bytes, weight_matmuls

# 2 prompts of 4 tokens, G = 3 (6 rows), 3 new tokens: decode forwards k = 1, 2
SHAPE = DecodeShape(prompts=2, group_size=3, prompt_len=4, new_tokens=3, layers=1, kv_dim=8)


def test_kv_read_bytes_by_hand():
    # forward k reads the 2 prompts' 4 columns once each and each of the 6 rows' own k columns:
    # k = 1: 8 + 6 = 14, k = 2: 8 + 12 = 20 -> 34 columns x 1 layer x (K and V) x 8 x 2 bytes
    assert kv_read_bytes(SHAPE, element_size=2) == 34 * 1 * 2 * 8 * 2
    two_layers = DecodeShape(**{**SHAPE.__dict__, "layers": 2})
    assert kv_read_bytes(two_layers, element_size=4) == 34 * 2 * 2 * 8 * 4


def test_weight_matmuls_runs_each_linear_on_the_rows_of_a_call(monkeypatch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()
    calls = []

    def recording_linear(module, x):
        calls.append((module.in_features, module.out_features, x.shape[0]))
        return torch.nn.functional.linear(x, module.weight, module.bias)

    monkeypatch.setattr("grpo_ds.cpu.packed_linear.linear", recording_linear)
    run, flops = weight_matmuls(model, SHAPE)
    assert run() == 6 * 3  # the tokens the call generates
    # body per row: q, k, v, o 8x8 (4 x 64) + gate, up 8x12 and down 12x8 (3 x 96) = 544 MACs,
    # lm_head 8x16 = 128. Prefill: body on 2 x 4 = 8 rows, lm_head on the 2 last positions;
    # then 2 decode forwards of the 6 rows through both.
    assert flops == 2 * (8 * 544 + 2 * 128 + 2 * 6 * (544 + 128))
    assert sum(2 * i * o * rows for i, o, rows in calls) == flops
    assert [rows for i, o, rows in calls if o == 16] == [2, 6, 6]  # lm_head
    assert sorted({rows for i, o, rows in calls if o != 16}) == [6, 8]


def test_stream_reads_reads_the_bytes_asked(monkeypatch):
    sums = []
    real_sum = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda t, *a, **k: sums.append(t.numel())
                        or real_sum(t, *a, **k))
    run = ceiling.stream_reads(nbytes=10 * 400 + 6, tokens=7, buffer_bytes=400)
    assert run() == 7
    assert sums == [100] * 10 + [2]  # ten whole 400-byte buffers, then 6 bytes = 2 floats
