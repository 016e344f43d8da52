"""Per-token log-probs (and entropy) of sampled tokens, without materialising [N, T, V] logits.

    logprob_t = log softmax(project(hidden_t) / temperature)[target_t]
    entropy_t = -sum_v p_v log p_v        of the same temperature-scaled distribution

The vocabulary V is large (32k-256k), so the logits of a whole batch dwarf everything else in a
GRPO step: N*T*V*4 bytes in float32, and autograd would keep them for backward. `token_logprobs`
flattens the N*T positions and works on chunk_size rows at a time: logits in the model's dtype,
only the chunk upcast to float32, then log-softmax and gather. Under autograd each chunk runs in
torch.utils.checkpoint (non-reentrant), so backward recomputes one chunk's logits at a time too.
Peak extra memory is then about 2.5 (forward) to 6 (forward + backward) x chunk_size * V * 4
bytes, independent of N and T (measured: `grpo-ds bench memory --sections logprobs`).

`project` is called like a module (the model's lm_head): under DeepSpeed ZeRO-3 the call is what
gathers its partitioned weight, so we never touch `.weight`. Each chunk calls it once in forward and
once more in backward; a bigger chunk_size means fewer of those calls (and gathers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def logits_to_token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference implementation from full logits [..., V] -> (logprobs [...], entropy [...] or None).

    The entropy carries no gradient (a logged metric; the loss never uses it).

    target_ids [...] must be valid vocabulary ids everywhere (use any id, e.g. pad, at padding).
    Results are float32 (float64 if the logits are float64).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    # log p[target] = logit[target] - logsumexp(logits): no [.., V] log-softmax output is kept.
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return logprobs, None
    # H = logsumexp - sum_v p_v * logit_v. A metric, never differentiated: without a graph the
    # backward runs none of its [.., V] ops (with one, it ran them all on zero gradients).
    with torch.no_grad():
        entropy = normaliser - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logprobs, entropy


class _LogprobsOfLogits(torch.autograd.Function):
    """logits [n, V] -> (log-probs [n], entropy [n]): logits_to_token_logprobs' values, computed
    in one [n, V] float32 buffer that ends as the softmax and, in backward, becomes the gradient.

    d log p_t / d logit_v = (1[v == t] - p_v) / temperature, so backward needs only p: it scales
    the saved probabilities in place instead of running autograd's chain of [n, V] ops (sub, exp,
    mul, a zero-filled gather gradient, add), each a fresh [n, V] allocation. That matters beyond
    the arithmetic: a [4096, 32k] float32 block is 0.5 GB, allocators hand blocks that big
    out as fresh pages, and first touches of fresh pages cost more than the arithmetic on them.
    """

    @staticmethod
    def forward(ctx, logits, target_ids, temperature, with_entropy):
        work_dtype = torch.promote_types(logits.dtype, torch.float32)
        top = logits.amax(dim=-1, keepdim=True).to(work_dtype)  # exact: a max needs no rounding
        shifted = torch.empty(logits.shape, dtype=work_dtype, device=logits.device)
        torch.sub(logits, top, out=shifted)  # float32 arithmetic; the logits stay as they are
        if temperature != 1.0:
            shifted.div_(temperature)
        picked = shifted.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
        # H = log s - sum_v e_v z_v / s, with z = shifted, e = exp(z), s = sum e: z is still
        # needed after exp for the entropy, so only then does exp get a buffer of its own
        probs = torch.exp(shifted) if with_entropy else shifted.exp_()
        total = probs.sum(dim=-1)
        log_total = total.log()
        entropy = log_total - shifted.mul_(probs).sum(dim=-1) / total if with_entropy else None
        probs.div_(total.unsqueeze(-1))
        ctx.save_for_backward(probs, target_ids)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        ctx.mark_non_differentiable(*([entropy] if with_entropy else []))
        return picked - log_total, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        probs, target_ids = ctx.saved_tensors
        # In place: the saved probabilities are this node's own buffer, used once (backward
        # twice through the same graph needs retain_graph, which this graph cannot serve).
        grad = probs.mul_(-grad_logprobs.unsqueeze(-1))
        grad.scatter_add_(-1, target_ids.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.logits_dtype), None, None, None


def fused_token_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits_to_token_logprobs for logits [n, V] with a backward that allocates nothing [n, V]
    beyond the one buffer the forward keeps (see _LogprobsOfLogits)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _LogprobsOfLogits.apply(logits, target_ids, temperature, with_entropy)


def token_logprobs(
    hidden: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    with_entropy: bool = False,
    use_checkpoint: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked log-probs of target_ids, hidden [N, T, H] -> (logprobs [N, T], entropy or None).

    hidden: the final hidden states aligned with target_ids [N, T] (position t predicts target t).
    project: hidden [n, H] -> logits [n, V], e.g. the model's lm_head module.
    chunk_size: rows (positions) per chunk; need not divide N*T.
    use_checkpoint: recompute each chunk in backward; None means "when autograd is recording".
    Returns float32 tensors (float64 for a float64 model), with a graph to hidden and project's
    parameters when autograd is on. Same values as logits_to_token_logprobs(project(hidden), ...).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, t, h = hidden.shape
    if target_ids.shape != (n, t):
        raise ValueError(f"target_ids must be {(n, t)}, got {tuple(target_ids.shape)}")
    if use_checkpoint is None:
        use_checkpoint = torch.is_grad_enabled()
    flat_hidden = hidden.reshape(n * t, h)
    flat_targets = target_ids.reshape(n * t)

    def chunk_fn(hidden_chunk: torch.Tensor, target_chunk: torch.Tensor):
        logits = project(hidden_chunk)  # [chunk, V] in the model's dtype
        logprobs, entropy = fused_token_logprobs(
            logits, target_chunk, temperature, with_entropy=with_entropy)
        # One output tensor: a checkpointed chunk with two outputs kept the tensors recomputed for
        # the output backward never reaches until the graph died (memory grew with N*T). Entropy
        # now has no graph at all; the single output keeps that from coming back.
        return torch.stack([logprobs, entropy], dim=-1) if with_entropy else logprobs

    pieces = []
    for start in range(0, n * t, chunk_size):
        args = (flat_hidden[start:start + chunk_size], flat_targets[start:start + chunk_size])
        if use_checkpoint:
            pieces.append(checkpoint(chunk_fn, *args, use_reentrant=False))
        else:
            pieces.append(chunk_fn(*args))
    if not pieces:  # N*T == 0
        empty = hidden.new_zeros(n, t, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return empty, (empty.clone() if with_entropy else None)
    joined = torch.cat(pieces)
    if not with_entropy:
        return joined.reshape(n, t), None
    return joined[:, 0].reshape(n, t), joined[:, 1].detach().reshape(n, t)
