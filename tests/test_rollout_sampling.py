"""Pure sampling math: distribution (chi-square), exact top-k / top-p, greedy, log-prob gap."""

import math

import pytest
import torch

from grpo_ds.rollout.sampling import (
    inverse_cdf_sample,
    logprob_gap,
    sample_next_tokens,
    truncation_mask,
)


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Upper tail of chi-square with len-1 degrees of freedom: Q(df/2, x/2) (regularised gamma)."""
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         stat.double() / 2))


def draw(logits: torch.Tensor, n: int, seed: int, **kw) -> torch.Tensor:
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tokens, _ = sample_next_tokens(logits.expand(n, -1), uniforms, **kw)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


def test_chi_square_helper_rejects_a_wrong_distribution():
    # 20000 fair-coin-like draws claimed to be 60/40: stat = 2*(2000^2/12000 + 2000^2/8000)
    # = 2*(333.3 + 500) = 1666.7 -> p ~ 0
    counts = torch.tensor([10000.0, 10000.0])
    assert chi_square_p_value(counts, torch.tensor([12000.0, 8000.0])) < 1e-12


def test_first_token_frequencies_match_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])
    temperature, n = 0.7, 20000
    counts = draw(logits, n, seed=3, temperature=temperature)
    expected = torch.softmax(logits.double() / temperature, -1) * n
    assert chi_square_p_value(counts, expected) > 1e-3
    # and the same counts are clearly not softmax at T = 1
    assert chi_square_p_value(counts, torch.softmax(logits.double(), -1) * n) < 1e-6


def test_truncated_frequencies_match_renormalised_distribution():
    # probs 0.4, 0.3, 0.2, 0.1: top_k=3 keeps {0,1,2} renormalised to 4/9, 3/9, 2/9;
    # then top_p=0.7 keeps {0,1} (4/9 = 0.44 < 0.7, 4/9 + 3/9 = 0.78 >= 0.7): 4/7, 3/7.
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 20000
    counts = draw(logits, n, seed=5, temperature=1.0, top_k=3, top_p=0.7)
    assert counts[2] == 0 and counts[3] == 0
    expected = torch.tensor([4 / 7, 3 / 7], dtype=torch.float64) * n
    assert chi_square_p_value(counts[:2], expected) > 1e-3


def kept(logits, top_k=0, top_p=1.0) -> list[int]:
    return truncation_mask(torch.tensor([logits]), top_k, top_p)[0].nonzero().flatten().tolist()


def test_top_k_keeps_exactly_k_with_ties_to_lower_id():
    logits = [3.0, 1.0, 2.0, 2.0, 0.5]
    assert kept(logits, top_k=1) == [0]
    assert kept(logits, top_k=2) == [0, 2]  # ids 2 and 3 tie at 2.0: the lower id wins
    assert kept(logits, top_k=3) == [0, 2, 3]
    assert kept(logits, top_k=5) == [0, 1, 2, 3, 4]
    assert kept(logits, top_k=0) == [0, 1, 2, 3, 4]  # off


def test_top_p_keeps_smallest_prefix_reaching_p():
    # probs 0.5, 0.2, 0.2, 0.1 (ids 1 and 2 tie). Prefix masses: 0.5, 0.7, 0.9, 1.0
    logits = torch.log(torch.tensor([0.5, 0.2, 0.2, 0.1])).tolist()
    assert kept(logits, top_p=0.45) == [0]  # 0.5 >= 0.45
    assert kept(logits, top_p=0.55) == [0, 1]  # 0.5 < 0.55 <= 0.7; tie 1 vs 2 -> id 1
    assert kept(logits, top_p=0.8) == [0, 1, 2]  # 0.7 < 0.8 <= 0.9
    assert kept(logits, top_p=0.95) == [0, 1, 2, 3]
    assert kept(logits, top_p=1e-9) == [0]  # always at least one token


def test_top_k_applies_before_top_p():
    # top_k=2 -> {0: 0.5/0.7 = 0.714, 1: 0.286}; top_p=0.7 -> {0}; top_p=0.75 -> {0, 1}
    logits = torch.log(torch.tensor([0.5, 0.2, 0.2, 0.1])).tolist()
    assert kept(logits, top_k=2, top_p=0.7) == [0]
    assert kept(logits, top_k=2, top_p=0.75) == [0, 1]


def test_inverse_cdf_never_picks_zero_probability_tokens():
    # probs [0, 1, 0, 1] -> cdf [0, 1, 1, 2]; target = u * 2:
    # u=0 -> 0 -> first cdf > 0 is id 1; u=0.4999 -> 0.9998 -> id 1; u=0.5 -> 1.0 -> id 3;
    # u just below 1 -> just below 2 -> id 3
    probs = torch.tensor([[0.0, 1.0, 0.0, 1.0]]).expand(4, -1)
    u = torch.tensor([0.0, 0.4999, 0.5, 1.0 - 1e-16], dtype=torch.float64)
    assert inverse_cdf_sample(probs, u).tolist() == [1, 1, 3, 3]


def test_two_level_inverse_cdf_equals_one_float64_cumsum():
    # The blocked search must pick what one float64 cumsum over the whole vocabulary picks:
    # 1000 rows over a vocabulary that is not a multiple of the block, with zeroed entries.
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1000, 1003, generator=g) ** 4
    probs[probs < 0.05] = 0.0
    u = torch.rand(1000, generator=g, dtype=torch.float64)
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    for block in (7, 64, 256, 2048):
        got = inverse_cdf_sample(probs, u, block=block)
        assert torch.equal(got, expected), block
        assert (probs.gather(-1, got.unsqueeze(-1)) > 0).all()


def test_greedy_picks_lowest_id_among_maxima_and_reports_t1_logprob():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
    tokens, logprobs = sample_next_tokens(logits, None, temperature=0.0)
    assert tokens.tolist() == [1]
    # log_softmax at T=1: 2 - log(e^0 + 2e^2 + e^1)
    expected = 2.0 - math.log(1 + 2 * math.exp(2) + math.exp(1))
    assert logprobs.item() == pytest.approx(expected, abs=1e-6)


def test_logprob_is_before_truncation_at_temperature():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    u = torch.tensor([0.99], dtype=torch.float64)
    tokens, logprobs = sample_next_tokens(logits, u, temperature=0.5, top_k=1)
    assert tokens.tolist() == [0]  # only token kept by top_k=1
    # log_softmax([2, 0, -2])[0] = 2 - log(e^2 + 1 + e^-2), not log(1) = 0 of the truncated dist
    assert logprobs.item() == pytest.approx(2 - math.log(math.exp(2) + 1 + math.exp(-2)), abs=1e-6)


def test_logprob_gap_over_masked_positions():
    sampled = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.1, -2.0, -9.0], [-0.2, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # masked diffs: 0.1, 0.0, 0.3 -> max 0.3, mean 0.4/3
    gap = logprob_gap(sampled, trainer, mask)
    assert gap["max_abs"] == pytest.approx(0.3, abs=1e-6)
    assert gap["mean_abs"] == pytest.approx(0.4 / 3, abs=1e-6)
    assert logprob_gap(sampled, trainer, torch.zeros_like(mask)) == {"max_abs": 0.0, "mean_abs": 0.0}


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 2, 0.9), (0.0, 0, 1.0)])
def test_non_finite_logits_give_a_nan_logprob_not_a_crash(temperature, top_k, top_p):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 1.0, 2.0], [nan, 0.0, 0.0], [inf, 0.0, 0.0], [-inf, -inf, -inf],
                           [-inf, 0.0, 1.0]])  # the last: a masked token is fine
    tokens, logprobs = sample_next_tokens(logits, torch.full((5,), 0.99), temperature, top_k,
                                          top_p)
    assert ((tokens >= 0) & (tokens < 3)).all()
    assert logprobs[1:4].isnan().all()
    assert torch.isfinite(logprobs[[0, 4]]).all()
    # the healthy rows are sampled exactly as without the broken ones
    alone, alone_lp = sample_next_tokens(logits[[0, 4]], torch.full((2,), 0.99), temperature,
                                         top_k, top_p)
    assert torch.equal(tokens[[0, 4]], alone) and torch.equal(logprobs[[0, 4]], alone_lp)
