"""Multi-turn decoding with each episode's KV cache extended between turns, not recomputed.

A multi-turn rollout (grpo_ds/agents/rollout.py) alternates model turns and environment turns.
Re-encoding runs every turn as a fresh `generate` over the episode's whole context: one prefill
of prompt + earlier turns + observations per turn. Here the keys and values of what the model
has already read are kept instead:

    turn 0   prefill each prompt once for its G episodes, decode (decode.py)
             a row leaving the batch hands its cache columns to `on_retire`: kept per episode,
             padding stripped, keys [layers, Hkv, L, D] (L = its context tokens read so far)
    turn k   the live episodes' kept keys/values, left-padded into one cache [B, Hkv, Lmax, D];
             prefill ONLY the new tokens (the turn's last sampled token, which was never fed,
             and the observation), attending to the past through the mask; decode as usual
             episodes that ended are dropped: they leave the batch and free their keys/values

Each token sits at the position it has in the re-encoded context (its count of real tokens), and
the mask hides exactly the padding, so the logits are those of re-encoding up to float rounding;
the samples draw the same uniforms (one table per turn from the turn's seed, row r = r-th live
episode). Token equality with re-encoding is tested (tests/test_multiturn_kv.py).

Why it is exact for every template here: the rollout never re-renders the conversation through
a chat template between turns; observations are appended as tokens (`result_template`), so the
context of turn k is always the context of turn k-1 plus new tokens. A template that rewrites
earlier turns (e.g. one that drops earlier `<think>` blocks) is not reproduced by either path.

What the weights do: held for the whole session (one full gather), or gathered group by group
at every forward (layer groups; the decode loop keeps ranks in lockstep, empty ranks idle).
"""

from __future__ import annotations

import time

import torch

from grpo_ds.rollout.backend import RolloutOutput, SamplingParams, left_pad
from grpo_ds.rollout.cache import PreallocatedLayer, SharedPrefixLayer, make_cache
from grpo_ds.rollout.decode import decode
from grpo_ds.rollout.stops import StopChecker


def extension_unsupported(config) -> str | None:
    """Why this model's cache cannot be carried between turns, or None when it can."""
    kinds = {type(layer) for layer in make_cache(config, 1).layers}
    if kinds - {PreallocatedLayer}:
        return ("the model has cache layers other than full attention (sliding window): "
                f"{sorted(k.__name__ for k in kinds - {PreallocatedLayer})}")
    return None


def draw_uniforms(rows: int, params: SamplingParams, seed: int, device) -> torch.Tensor | None:
    """The sampler's uniforms [rows, max_new_tokens] float64 from `seed` (None when greedy)."""
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((rows, params.max_new_tokens), generator=gen, dtype=torch.float64,
                      device=device)


def rows_kv(cache, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values [layers, n, Hkv, filled, D] of the cache's batch rows `index`, a shared
    prompt part (SharedPrefixLayer) put back in front of each row's own part."""
    keys, values = [], []
    for layer in cache.layers:
        if isinstance(layer, SharedPrefixLayer) and layer.shared:
            prompt = layer.rows[index] // layer.group_size
            own = slice(0, layer.length)
            keys.append(torch.cat([layer.prefix_keys[prompt],
                                   layer.key_buffer[index][:, :, own]], 2))
            values.append(torch.cat([layer.prefix_values[prompt],
                                     layer.value_buffer[index][:, :, own]], 2))
        else:
            keys.append(layer.keys[index])
            values.append(layer.values[index])
    return torch.stack(keys), torch.stack(values)


def extended_cache(config, kept: list[tuple[torch.Tensor, torch.Tensor]], room: int, device):
    """(cache, past_mask [B, Lmax]): the kept keys/values [layers, Hkv, L, D] of B episodes,
    left-padded to the longest, in a cache with `room` more columns."""
    width = max((k.shape[2] for k, _ in kept), default=0)
    cache = make_cache(config, width + room)
    past_mask = torch.zeros((len(kept), width), dtype=torch.long, device=device)
    if not kept:
        return cache, past_mask
    layers, heads, _, dim = kept[0][0].shape
    keys = kept[0][0].new_zeros((layers, len(kept), heads, width, dim))
    values = torch.zeros_like(keys)
    for b, (k, v) in enumerate(kept):
        keys[:, b, :, width - k.shape[2]:] = k
        values[:, b, :, width - k.shape[2]:] = v
        past_mask[b, width - k.shape[2]:] = 1
    for index, layer in enumerate(cache.layers):
        layer.update(keys[index], values[index])
    return cache, past_mask


class TurnSession:
    """One multi-turn rollout's decoding over held weights; keeps each episode's keys/values.

    engine: the HybridRollout (model, pad id, tokenizer, its output builder).
    forward / any_rank: as decode() takes them (any_rank None when forwards are collective-free).
    shared: turn 0 keeps each prompt's keys once for its G episodes (attention.py installed).
    """

    def __init__(self, engine, forward, any_rank, mode: str, timings: dict, device, shared: bool):
        self.engine, self.forward, self.any_rank = engine, forward, any_rank
        self.mode, self.timings, self.device, self.shared = mode, timings, device, shared
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # episode -> keys, values

    def first_turn(self, prompt_ids, group_size: int, params: SamplingParams,
                   seed: int) -> RolloutOutput:
        """Turn 0: G samples per prompt; episode e = row e (prompt e // G)."""
        ids, mask = left_pad(prompt_ids, self.engine.pad_token_id, self.device)
        cache = make_cache(self.engine.model.config, ids.shape[1] + params.max_new_tokens,
                           self.shared)
        episodes = list(range(ids.shape[0] * group_size))
        return self._decode(cache, ids, mask, group_size, params, seed, episodes, None, None)

    def next_turn(self, live: list[int], contexts: list[list[int]], params: SamplingParams,
                  seed: int) -> RolloutOutput:
        """Turn k: episodes `live` (whose whole contexts are `contexts`) go on; the rest end."""
        self.kept = {e: self.kept[e] for e in live}  # ended episodes leave and free their cache
        new = [ctx[self.kept[e][0].shape[2]:] for e, ctx in zip(live, contexts)]
        ids, mask = left_pad(new, self.engine.pad_token_id, self.device)
        cache, past_mask = extended_cache(self.engine.model.config,
                                          [self.kept[e] for e in live],
                                          ids.shape[1] + params.max_new_tokens, self.device)
        history = None
        if params.repetition_penalty != 1.0:  # the penalty counts the whole context as seen
            history = left_pad(contexts, self.engine.pad_token_id, self.device)
        return self._decode(cache, ids, mask, 1, params, seed, live, past_mask, history)

    def _decode(self, cache, ids, mask, group_size, params, seed, episodes, past_mask, history):
        start = time.perf_counter()
        uniforms = draw_uniforms(len(episodes), params, seed, self.device)
        engine = self.engine
        stops = StopChecker(params.stop_token_ids, params.stop_strings, engine.tokenizer,
                            self.device)

        def on_retire(batch_index, rows, attn):
            keys, values = rows_kv(cache, batch_index)
            for i, row in enumerate(rows.tolist()):
                real = attn[i].nonzero().squeeze(-1)  # drop the padding columns
                self.kept[episodes[row]] = (keys[:, i].index_select(2, real),
                                            values[:, i].index_select(2, real))

        result = decode(self.forward, cache, ids, mask, group_size, params, uniforms, stops,
                        engine.pad_token_id, any_rank=self.any_rank, past_mask=past_mask,
                        on_retire=on_retire, history=history)
        seconds = time.perf_counter() - start
        extra = {"kv_cache": "extend", "shared_prefix_kv": self.shared and past_mask is None}
        return engine._output(ids, mask, group_size, result, seconds, self.mode, self.timings,
                              extra)
