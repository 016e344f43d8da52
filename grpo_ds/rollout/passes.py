"""Generation in passes: a rank's prompts cut so that no pass decodes more than `max_rows` rows.

A pass decodes whole groups (prompt i and its G samples, rows i*G .. i*G+G-1), so a prompt's
keys and values are still kept once for its G samples (cache.py). What grows with a pass's rows
is freed when the pass ends: the KV cache, the sampler's logits, the prefill activations. The
gathered weights are not: they are held once for all passes of a call (engine.py).

    prompts per pass  k = floor(max_rows / G)               (all N prompts when max_rows is None)
    passes            P = ceil(N / k), at least 1            (a rank with 0 prompts runs 1 empty)
    pass sizes        N split as evenly as possible, larger first: they differ by at most 1

Even sizes never make the largest pass (the memory peak) larger than filling passes of k in
turn, and sometimes smaller: 5 prompts at k = 4 run as 3 + 2, not 4 + 1.
"""

from __future__ import annotations

import torch

from grpo_ds.rollout.decode import DecodeResult


def prompts_per_pass(group_size: int, max_rows: int | None) -> int | None:
    """k: whole groups that fit in `max_rows` rows (None: no bound). Raises when not even one does."""
    if max_rows is None:
        return None
    if max_rows < group_size:
        raise ValueError(f"max_batch_rows={max_rows} is smaller than one group of "
                         f"{group_size} samples; a pass holds whole groups")
    return max_rows // group_size


def plan_passes(num_prompts: int, group_size: int, max_rows: int | None) -> list[tuple[int, int]]:
    """The passes as [start, stop) ranges of prompt indices, in order, covering 0 .. num_prompts."""
    k = prompts_per_pass(group_size, max_rows)
    passes = 1 if k is None or num_prompts == 0 else -(-num_prompts // k)
    base, extra = divmod(num_prompts, passes)
    bounds, start = [], 0
    for index in range(passes):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def largest_pass_rows(num_prompts: int, group_size: int, max_rows: int | None) -> int:
    """Rows (prompts x G) of the largest pass: what the memory of generation is sized by."""
    return max(stop - start for start, stop in plan_passes(num_prompts, group_size,
                                                           max_rows)) * group_size


def rows_that_fit(free_bytes: int, bytes_per_row: int, group_size: int,
                  fraction: float = 0.8) -> int:
    """The largest multiple of group_size whose rows fit in `fraction` of `free_bytes`, and at
    least one group (a pass holds whole groups; one that does not fit fails as it would anyway).
    The rest of the free memory is left for the prefill's activations and the allocator's
    fragmentation."""
    rows = int(free_bytes * fraction) // max(bytes_per_row, 1)
    return max(group_size, rows // group_size * group_size)


def concat_results(results: list[DecodeResult]) -> DecodeResult:
    """The passes' results, rows in pass order, as one pass over all prompts would return them.

    Every pass's tokens and log-probs are [rows, max_new_tokens] (padded after each row's length),
    so the rows stack as they are; the forwards and prefill times add up.
    """
    if len(results) == 1:
        return results[0]
    return DecodeResult(
        tokens=torch.cat([r.tokens for r in results]),
        logprobs=torch.cat([r.logprobs for r in results]),
        lengths=torch.cat([r.lengths for r in results]),
        stopped=torch.cat([r.stopped for r in results]),
        forwards=sum(r.forwards for r in results),
        prefill_seconds=sum(r.prefill_seconds for r in results),
    )


def release_cached_memory() -> None:
    """Hand the accelerator's cached blocks back after generation.

    The caching allocator of a GPU keeps the freed KV cache and logits of the rollout reserved;
    the update's activations have other shapes and would reserve more on top. Releasing once per
    step costs one synchronisation. DeepSpeed's CPU accelerator has no cache: a no-op there.
    """
    from deepspeed.accelerator import get_accelerator

    get_accelerator().empty_cache()
