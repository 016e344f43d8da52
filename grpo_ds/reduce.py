"""How each metric combines across ranks, declared where the metric is made (as torchtitan does).

A phase returns `{name: Metric(value, reduce)}`: `mean` (each rank's value, averaged over
ranks), `sum` (counts), `max`, `min`, or `same` (already equal on every rank: computed from
all-reduced numbers, or gathered and merged, so it passes through untouched). `reduce_metrics`
turns them into plain floats with one all-reduce for sums and means and one for maxima (a
minimum is -max(-x)). Nothing is chosen by the metric's name.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed.comm as dist
import torch

REDUCTIONS = ("mean", "sum", "max", "min", "same")


@dataclass(frozen=True)
class Metric:
    """One rank's value of a metric and how ranks combine it."""

    value: float
    reduce: str  # one of REDUCTIONS

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"Metric reduce={self.reduce!r}: use one of {REDUCTIONS}")


def tagged(values: dict[str, float], reduce: str) -> dict[str, Metric]:
    """Every value of `values` combined the same way across ranks."""
    return {k: Metric(float(v), reduce) for k, v in values.items()}


def reduce_metrics(metrics: dict[str, Metric], device) -> dict[str, float]:
    """Plain floats, equal on every rank; call on all ranks with the same keys (collective)."""
    additive = [k for k, m in metrics.items() if m.reduce in ("mean", "sum")]
    extremes = [k for k, m in metrics.items() if m.reduce in ("max", "min")]
    sums = torch.tensor([metrics[k].value for k in additive], dtype=torch.float64, device=device)
    signed = torch.tensor([metrics[k].value * (1 if metrics[k].reduce == "max" else -1)
                           for k in extremes], dtype=torch.float64, device=device)
    if additive:
        dist.all_reduce(sums)
    if extremes:
        dist.all_reduce(signed, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    reduced = {k: sums[i].item() / (world if metrics[k].reduce == "mean" else 1)
               for i, k in enumerate(additive)}
    reduced.update({k: signed[i].item() * (1 if metrics[k].reduce == "max" else -1)
                    for i, k in enumerate(extremes)})
    return {k: reduced.get(k, m.value) for k, m in metrics.items()}


def global_sum(value: float, device) -> float:
    """Sum of a python number over ranks."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def global_max(value: float, device) -> float:
    """Max of a python number over ranks."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total.item()
