"""What this machine leaves any sampler of the generation bench: two parts of ours' call alone.

Every exact sampler of the workload has to do at least these two things, whatever its code:

  weights   every Linear on the rows ours' no-EOS call feeds it: the prefill on N * Tp rows
            (lm_head on the N last positions only), then the Tc - 1 decode forwards on B = N * G
            rows (the last sampled token is never fed back), on ours' kernels (oneDNN on
            reordered weights where supported, packed_linear.py). Their FLOP rate against the
            dense matmul peak measured in the same run (mfu.py) says how much any kernel could
            still gain on them.
  kv reads  decode forward k (k = 1 .. Tc - 1) attends over Tp + k columns in every layer: it
            reads the keys and values of the prompt's Tp columns (once per prompt when the
            prefix is shared, as ours does) and of each row's own k columns:
                bytes = sum_k (N * Tp + B * k) * layers * 2 * kv_dim * element_size
            read once, at the rate torch.sum streams a buffer larger than the caches.

Both run on both ranks at once, so they share the memory bus as the real calls do. Run one
after the other, they bound the time of a sampler that overlaps neither with the other; a sampler
could at best overlap them, so the larger of the two is the strict bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STREAM_BUFFER_BYTES = 256 * 2**20  # several times this machine's 32 MiB L3: reads go to DRAM


@dataclass(frozen=True)
class DecodeShape:
    """One rank's rollout: N prompts of Tp tokens, G samples each, Tc new tokens each."""

    prompts: int
    group_size: int
    prompt_len: int
    new_tokens: int
    layers: int
    kv_dim: int  # key (= value) width of a layer: kv heads x head dim

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size


def kv_read_bytes(shape: DecodeShape, element_size: int) -> int:
    """Bytes of keys and values the decode forwards read, the prompt part shared (docstring)."""
    columns = sum(shape.prompts * shape.prompt_len + shape.rows * k
                  for k in range(1, shape.new_tokens))
    return columns * shape.layers * 2 * shape.kv_dim * element_size


def weight_matmuls(module, shape: DecodeShape):
    """(run, flops): `run()` computes every Linear of `module` on the rows of one call (module
    docstring) with random inputs made here, outside the timing, and returns the tokens the call
    generates; `flops` is what one run computes (2 x rows x in x out per Linear)."""
    from grpo_ds.cpu.packed_linear import linear, linear_modules

    linears = linear_modules(module)
    head = module.get_output_embeddings()
    dtype = next(module.parameters()).dtype
    prefill_rows = shape.prompts * shape.prompt_len
    passes = [(m, shape.prompts if m is head else prefill_rows) for m in linears]
    passes += [(m, shape.rows) for _ in range(shape.new_tokens - 1) for m in linears]
    inputs = {}  # (rows, in_features) -> a random input
    for m, rows in passes:
        inputs.setdefault((rows, m.in_features), torch.randn(rows, m.in_features, dtype=dtype))
    flops = sum(2.0 * rows * m.in_features * m.out_features for m, rows in passes)

    def run() -> int:
        with torch.no_grad():
            for m, rows in passes:
                linear(m, inputs[(rows, m.in_features)])
        return shape.rows * shape.new_tokens

    return run, flops


def stream_reads(nbytes: int, tokens: int, buffer_bytes: int = STREAM_BUFFER_BYTES):
    """`run()` reads `nbytes` (rounded up to whole float32 elements) from a buffer larger than
    the caches, with torch.sum, and returns `tokens` (the call's, so rates compare)."""
    buffer = torch.ones(buffer_bytes // 4)
    whole, rest = divmod(-(-nbytes // 4), buffer.numel())

    def run() -> int:
        for _ in range(whole):
            buffer.sum()
        if rest:
            buffer[:rest].sum()
        return tokens

    return run
