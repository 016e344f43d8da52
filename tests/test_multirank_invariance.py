"""The step's gradient does not depend on how its sequences are split: 1 micro-batch vs 4
accumulation steps, and 1 rank vs 2 ranks, under real ZeRO-3 (issue 3's invariance bar).
The 2-rank runs use the fused decoder layers (ZeRO-3 leaf modules) and oneDNN Linears, the
1-rank runs HF's layers on torch's default matmuls: the fused layers' and oneDNN's gradients
through the real engine are checked against HF's in the same comparison."""

import pytest
import torch

from tests.multirank import launch

pytestmark = pytest.mark.multirank


def relative_error(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5
    den = sum(a[k].norm() ** 2 for k in a) ** 0.5
    return (num / den).item()


def test_gradient_is_invariant_to_micro_batches_and_ranks(tmp_path):
    one, two = tmp_path / "one_rank.pt", tmp_path / "two_ranks.pt"
    launch("grad_invariance.py", str(one), "16,4", "off", ranks=1)  # 1 micro-batch; 4 accumulations
    launch("grad_invariance.py", str(two), "8,2", "on", ranks=2)  # 1 micro-batch; 4 accumulations
    single, double = torch.load(one), torch.load(two)
    for aggregation in ("grpo", "token_mean", "dr_grpo"):
        reference = single[(aggregation, 16)]
        assert sum(g.abs().sum() for g in reference.values()) > 0  # a real, non-zero gradient
        for other in (single[(aggregation, 4)], double[(aggregation, 8)],
                      double[(aggregation, 2)]):
            assert relative_error(reference, other) < 1e-5, aggregation
