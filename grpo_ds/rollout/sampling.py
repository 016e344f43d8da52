"""Pure token sampling: temperature, exact top-k / top-p truncation, inverse-CDF draws.

Order of operations (same as HF and vLLM):
    scaled   = logits / T
    kept     = top_k(scaled)                  keep exactly k tokens
    kept     = top_p(softmax(kept))           keep the smallest prefix (by descending prob) with mass >= p
    token    = inverse_cdf(softmax(kept), u)  u ~ U[0, 1), one number per row and step

Two choices worth knowing:
- Each draw consumes ONE uniform number `u` per row, which the caller takes from a table
  `uniforms [rows, steps]` filled once from a seeded torch.Generator. Row r at step t always uses
  `uniforms[r, t]`, so a sample does not depend on which other rows are in the batch (batch
  compaction and shared prefill cannot change it).
- The reported log-prob is `log_softmax(logits / T)[token]`: the distribution AT TEMPERATURE but
  BEFORE top-k/top-p truncation. That is what a trainer forward computes
  (`log_softmax(logits / T)`), so the two can be compared token by token. With T == 0 (greedy)
  it is `log_softmax(logits)[token]` (T = 1).

Before all of that, two optional changes to the logits of the DRAW only: a repetition penalty
(HF/vLLM: a token already in the prompt or the completion has its logit divided by the penalty
when positive, multiplied when negative) and banned tokens (stop tokens before min_new_tokens,
logit -inf). Like top-k/top-p they change what is sampled, not the reported log-prob, which stays
the policy's own `log_softmax(logits / T)` that the trainer recomputes. Off, they cost nothing.

Non-finite logits (NaN, +inf, or a row that is all -inf: weights that diverged) cannot be sampled
from; such a row draws from a uniform distribution instead, so decoding goes on, and reports a NaN
log-prob. The trainer counts that as a bad step, like a NaN loss (grpo_ds/failures.py).

Ties: the descending sort is stable, so among equal logits the lower token id ranks first. Top-k
therefore keeps exactly k tokens, and greedy picks the lowest id among the maxima.
"""

from __future__ import annotations

import torch


def truncation_mask(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean mask [B, V] of the tokens kept by top-k then top-p (always >= 1 per row).

    top_k <= 0 and top_p >= 1 disable the respective filter.
    """
    vocab = scaled_logits.shape[-1]
    # stable: equal logits keep ascending token id order, so tie-breaking is by token id.
    sorted_logits, order = torch.sort(scaled_logits, dim=-1, descending=True, stable=True)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep_sorted[:, top_k:] = False
    if top_p < 1.0:
        masked = sorted_logits.double().masked_fill(~keep_sorted, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive prefix sum
        # keep token j while the mass of the tokens ranked above it is still < p;
        # the first token has mass_before == 0 and is always kept.
        keep_sorted &= mass_before < top_p
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor,
                       block: int = 256) -> torch.Tensor:
    """Draw one index per row from `probs [B, V]` (unnormalised, >= 0) with `uniforms [B]`.

    Returns the first index whose cumulative mass exceeds u * total, in float64 sums. Zero-
    probability entries can never be chosen: their cdf equals their predecessor's, and
    searchsorted(right=True) returns the first index with cdf > target.

    Two levels, so that only one block per row is cumulated in float64 (a float64 cumsum over a
    whole vocabulary costs several passes over it at every decode step): the block holding the
    target is found on the cumulated block sums, then the index inside that block.
    """
    rows, vocab = probs.shape
    if vocab % block:
        probs = torch.nn.functional.pad(probs, (0, block - vocab % block))  # zeros: never drawn
    blocks = probs.reshape(rows, -1, block)
    block_cdf = torch.cumsum(blocks.sum(-1, dtype=torch.float64), dim=-1)  # [B, V / block]
    total = block_cdf[:, -1]
    target = uniforms.double().to(probs.device) * total
    # u * total can round up to total itself; keep the target strictly below it.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(block_cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    # mass of the blocks before block j (0 for the first)
    before = torch.nn.functional.pad(block_cdf, (1, 0)).gather(-1, j.unsqueeze(-1)).squeeze(-1)
    inner_cdf = torch.cumsum(blocks[torch.arange(rows, device=probs.device), j], -1,
                             dtype=torch.float64)  # [B, block]
    # the block's own float64 sum may differ from its cumsum in the last bit: stay below it
    inner_total = inner_cdf[:, -1]
    rest = torch.minimum(target - before, torch.nextafter(inner_total, torch.zeros_like(total)))
    i = torch.searchsorted(inner_cdf, rest.unsqueeze(-1), right=True).squeeze(-1)
    return j * block + i


def penalise_repetitions(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF / vLLM repetition penalty: logits [B, V] where seen [B, V] (bool) is set are divided by
    `penalty` when positive and multiplied by it when negative (penalty > 1 discourages them)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    banned_ids: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    logits [B, V] (any float dtype), uniforms [B] in [0, 1) (unused when temperature == 0).
    banned_ids [K] int64: never drawn. seen [B, V] bool: tokens the repetition penalty applies to.
    Returns (tokens [B] int64, logprobs [B] float32) where logprobs are
    log_softmax(logits / T) at the sampled tokens, before truncation, penalty and bans (see
    module docstring).
    """
    logits = logits.float()
    broken = nonfinite_rows(logits)
    # No `if broken.any()`: that would be a device sync at every decode step.
    logits = logits.masked_fill(broken.unsqueeze(-1), 0.0)  # these rows: a harmless uniform draw
    tokens, logprobs = _sample(logits, uniforms, temperature, top_k, top_p, banned_ids, seen,
                               repetition_penalty)
    return tokens, logprobs.masked_fill(broken, float("nan"))


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows of `logits [B, V]` with a NaN or +inf, or with no finite entry at all.

    One reduction: logsumexp is NaN with a NaN, +inf with a +inf, -inf when every entry is -inf,
    and finite otherwise (some -inf entries, a masked vocabulary, are fine)."""
    return ~torch.isfinite(torch.logsumexp(logits, dim=-1))


def _sample(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float,
            top_k: int, top_p: float, banned_ids: torch.Tensor | None, seen: torch.Tensor | None,
            repetition_penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    draw = logits
    if seen is not None and repetition_penalty != 1.0:
        draw = penalise_repetitions(draw, seen, repetition_penalty)
    if banned_ids is not None and banned_ids.numel():
        draw = draw.index_fill(-1, banned_ids, float("-inf"))
    if temperature <= 0.0:
        tokens = torch.argmax(draw, dim=-1)  # first maximum = lowest token id on ties
        logprobs = torch.log_softmax(logits, dim=-1)
        return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    scaled = draw / temperature if temperature != 1.0 else draw
    softmax = torch.softmax(scaled, dim=-1)
    probs = softmax
    if top_k > 0 or top_p < 1.0:
        probs = softmax.masked_fill(~truncation_mask(scaled, top_k, top_p), 0.0)
    tokens = inverse_cdf_sample(probs, uniforms)
    if draw is not logits:  # the draw's distribution differs from the policy's: report the latter
        policy = torch.log_softmax(logits / temperature, dim=-1)
        return tokens, policy.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # log of the untruncated probability at the token only (a drawn token's is never 0)
    return tokens, softmax.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()


def logprob_gap(
    sampled_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's, over real completion tokens.

    sampled_logprobs, trainer_logprobs, mask: [B*G, T]. Returns
    {"max_abs": max |a - b|, "mean_abs": mean |a - b|} over positions with mask == 1 (0.0 when
    the mask is empty). The trainer compares these with its tolerance to decide whether the
    sampled log-probs may serve as pi_old.
    """
    mask = mask.bool()
    diff = (sampled_logprobs.float() - trainer_logprobs.float()).abs()[mask]
    if diff.numel() == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0}
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
