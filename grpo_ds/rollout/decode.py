"""The decode loop: shared prefill, G samples per prompt, batch compaction, lockstep.

    prefill   logits[N]  = forward(prompts [N, Tp])          each prompt once
    share     cache rows repeated G times -> rows i*G..i*G+G-1 belong to prompt i
    step t    token[r,t] = sample(logits[r], uniforms[r, t])  for every live row r
              drop rows that hit a stop or max_new_tokens from the batch and the KV cache
              logits     = forward(token[:, t] [B_live, 1])

Compaction: a finished row costs nothing afterwards: its row is index-selected out of the
input, the attention mask, the positions and every layer of the KV cache.

Lockstep: when the forward itself is collective (ZeRO-3 layer groups), every rank must run the
same number of forwards. Before each decode forward the ranks agree (all-reduce MAX) whether
anyone still has live rows; a rank with none calls `forward.idle()`, which joins the gathers
without computing. With fully gathered weights no agreement is needed.

Sampling controls: before `min_new_tokens` the stop tokens are banned from the draw and stop
strings are not checked; the repetition penalty keeps a [N*G, V] table of the tokens each row has
seen (prompt and completion), built only when the penalty is on.

Positions: prompts are left-padded, so a row's position is its count of real tokens so far
(prefill: cumsum(mask) - 1; step t: prompt_length + t).

Extension (multi-turn, turns.py): the cache may already hold each row's earlier context
(`past_mask [B, Lp]`, 1 on its real columns); the prefill then runs only the new tokens,
attending to the past through the mask, at positions that continue each row's count. A row
leaving the batch is first handed to `on_retire`, which may keep its keys and values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from grpo_ds.rollout.backend import SamplingParams
from grpo_ds.rollout.sampling import sample_next_tokens
from grpo_ds.rollout.stops import StopChecker


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [N*G, max_new_tokens] int64, pad after each row's length
    logprobs: torch.Tensor  # [N*G, max_new_tokens] float32, 0 after each row's length
    lengths: torch.Tensor  # [N*G] int64, completion length including the stop token
    stopped: torch.Tensor  # [N*G] bool, ended by a stop token or string
    forwards: int  # forwards run on this rank, prefill and idle ones included
    prefill_seconds: float


class _Batch:
    """The live rows of the decode batch and everything indexed by them."""

    def __init__(self, rows, attn, next_pos, cache):
        self.rows = rows  # [B] original row index (0 .. N*G-1)
        self.attn = attn  # [B, Tp + max_new] 1 on real prompt tokens and generated tokens
        self.next_pos = next_pos  # [B] position id of the next input token
        self.cache = cache
        self.alive = torch.ones_like(rows, dtype=torch.bool)  # only False when not compacting

    @classmethod
    def start(cls, row_mask: torch.Tensor, max_new: int, cache) -> _Batch:
        """Every row [N*G] alive; `row_mask [N*G, Tp]` is each row's prompt mask."""
        attn = row_mask.new_zeros((row_mask.shape[0], row_mask.shape[1] + max_new))
        attn[:, : row_mask.shape[1]] = row_mask
        rows = torch.arange(row_mask.shape[0], device=row_mask.device)
        return cls(rows, attn, row_mask.sum(-1), cache)

    def keep(self, keep: torch.Tensor, on_retire=None, filled: int = 0) -> None:
        """Keep rows where `keep`; `on_retire(batch_index, rows, attn)` first sees the others
        (their cache columns and mask up to `filled`)."""
        if on_retire is not None and not keep.all():
            gone = (~keep).nonzero().squeeze(-1)
            on_retire(gone, self.rows[gone], self.attn[gone, :filled])
        idx = keep.nonzero().squeeze(-1)
        self.rows, self.attn = self.rows[idx], self.attn[idx]
        self.next_pos, self.alive = self.next_pos[idx], self.alive[idx]
        self.cache.batch_select_indices(idx)


@dataclass
class _Written:
    """What the loop writes, indexed by original row (0 .. N*G-1)."""

    tokens: torch.Tensor  # [N*G, max_new_tokens] int64, pad where nothing was sampled
    logprobs: torch.Tensor  # [N*G, max_new_tokens] float32
    lengths: torch.Tensor  # [N*G] int64
    stopped: torch.Tensor  # [N*G] bool

    @classmethod
    def empty(cls, rows: int, max_new: int, pad_token_id: int, device) -> _Written:
        return cls(torch.full((rows, max_new), pad_token_id, dtype=torch.long, device=device),
                   torch.zeros((rows, max_new), dtype=torch.float32, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.bool, device=device))


def decode(forward, cache, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
           params: SamplingParams, uniforms: torch.Tensor | None, stops: StopChecker,
           pad_token_id: int, any_rank: Callable[[bool], bool] | None = None,
           compact: bool = True, past_mask: torch.Tensor | None = None,
           on_retire: Callable | None = None,
           history: tuple[torch.Tensor, torch.Tensor] | None = None) -> DecodeResult:
    """Run prefill + decode for prompts [N, Tp] (left-padded) and G samples each.

    `forward(ids, mask, positions, cache) -> logits [B, V]` for the last position;
    `any_rank(flag) -> bool` is the lockstep all-reduce, or None when forwards are collective-free.
    `uniforms [N*G, max_new_tokens]` feeds the sampler (None for greedy).
    Extension: `past_mask [N, Lp]` marks the real columns `cache` already holds (group_size 1);
    `on_retire(batch_index, rows, attn)` sees each row before it leaves the batch (needs
    compact); `history` (ids, mask) [N, Th] is what the repetition penalty counts as seen
    (default: the prompts).
    """
    if past_mask is not None:
        assert group_size == 1, "an extended cache holds one row per episode"
        prompt_mask = torch.cat([past_mask, prompt_mask], 1)
    past_len = 0 if past_mask is None else past_mask.shape[1]
    prompt_len, max_new = prompt_mask.shape[1], params.max_new_tokens  # prompt_len: with past
    rows_total = prompt_ids.shape[0] * group_size
    out = _Written.empty(rows_total, max_new, pad_token_id, prompt_ids.device)

    start = time.perf_counter()
    logits = _prefill(forward, cache, prompt_ids, prompt_mask, past_len, group_size,
                      lockstep=any_rank is not None)
    prefill_seconds, forwards = time.perf_counter() - start, 1
    seen = None  # the repetition penalty's [N*G, V] table, only when the penalty is on
    if params.repetition_penalty != 1.0 and logits is not None:
        seen = _prompt_tokens_seen(*(history or (prompt_ids, prompt_mask)), logits.shape[-1],
                                   group_size)
    batch, step = _Batch.start(prompt_mask.repeat_interleave(group_size, 0), max_new, cache), 0
    while True:
        if batch.alive.any() and step < max_new:
            tokens = _sample_step(logits, batch, step, params, uniforms, stops, seen, out)
            if compact and not batch.alive.all():
                tokens = tokens[batch.alive]
                batch.keep(batch.alive, on_retire, prompt_len + step)
        has_work = bool(batch.alive.any())
        if not (any_rank(has_work) if any_rank is not None else has_work):
            break
        forwards += 1
        if has_work:
            batch.attn[:, prompt_len + step] = 1
            logits = forward(tokens.unsqueeze(-1), batch.attn[:, : prompt_len + step + 1],
                             batch.next_pos.unsqueeze(-1), batch.cache)
            batch.next_pos += 1
        else:
            forward.idle()
        step += 1
    return DecodeResult(out.tokens, out.logprobs, out.lengths, out.stopped, forwards,
                        prefill_seconds)


def _prefill(forward, cache, prompt_ids, prompt_mask, past_len: int, group_size: int,
             lockstep: bool) -> torch.Tensor | None:
    """Logits [N*G, V] at each prompt's last position, one forward per prompt shared by its G
    rows (the cache's rows are repeated to match); None when this rank has no prompts."""
    if prompt_ids.shape[0] == 0:
        if lockstep:  # the other ranks' prefill gathers need this rank too
            forward.idle()
        return None
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    logits = forward(prompt_ids, prompt_mask, positions, cache).repeat_interleave(group_size, 0)
    cache.batch_repeat_interleave(group_size)
    return logits


def _prompt_tokens_seen(prompt_ids, prompt_mask, vocab: int, group_size: int) -> torch.Tensor:
    """[N*G, V] bool: True at each row's prompt tokens (the repetition penalty's memory)."""
    seen = torch.zeros((prompt_ids.shape[0], vocab), dtype=torch.bool, device=prompt_ids.device)
    rows, cols = prompt_mask.bool().nonzero(as_tuple=True)  # real tokens only, not the padding
    seen[rows, prompt_ids[rows, cols]] = True
    return seen.repeat_interleave(group_size, 0)


def _sample_step(logits, batch: _Batch, step, params, uniforms, stops, seen,
                 out: _Written) -> torch.Tensor:
    """Sample token `step` for every batch row, record it for live rows, retire finished rows."""
    u = uniforms[batch.rows, step] if uniforms is not None else None
    banned = stops.stop_ids if step < params.min_new_tokens else None
    tokens, logprobs = sample_next_tokens(
        logits, u, params.temperature, params.top_k, params.top_p, banned_ids=banned,
        seen=None if seen is None else seen[batch.rows],
        repetition_penalty=params.repetition_penalty)
    live_rows = batch.rows[batch.alive]
    out.tokens[live_rows, step] = tokens[batch.alive]
    out.logprobs[live_rows, step] = logprobs[batch.alive]
    out.lengths[live_rows] = step + 1
    if seen is not None:
        seen[live_rows, tokens[batch.alive]] = True
    if step + 1 >= params.min_new_tokens:
        history = out.tokens[batch.rows] if stops.stop_strings else None
        done = stops(tokens, history, step) & batch.alive
    else:  # too short to stop (HF / vLLM): stop tokens were not drawn, strings are not checked
        done = torch.zeros_like(batch.alive)
    out.stopped[batch.rows[done]] = True
    if step + 1 >= params.max_new_tokens:
        done = batch.alive.clone()
    batch.alive &= ~done
    return tokens
