"""pass@k for evaluation: the chance that at least one of k samples is correct.

From n samples of which c are correct, the unbiased estimator of Chen et al. 2021 ("Evaluating
Large Language Models Trained on Code", the Codex paper, eq. 1) is

    pass@k = 1 - C(n - c, k) / C(n, k)

the probability that k samples drawn without replacement from the n are not all incorrect.
Computed with exact integers (math.comb), so it is exact for any n. Averaging over problems is
left to the caller.
"""

from __future__ import annotations

import math


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem with num_samples samples, num_correct of them correct."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(
            f"need 0 <= num_correct <= num_samples, got {num_correct} of {num_samples}"
        )
    if not 1 <= k <= num_samples:
        raise ValueError(f"need 1 <= k <= num_samples={num_samples}, got k={k}")
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)
