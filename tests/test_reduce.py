"""Typed metric reductions (grpo_ds/reduce.py) on two real gloo ranks: each metric combines as it
declares, whatever its name."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from grpo_ds.reduce import Metric


def _rank(rank: int, store: str, out: str) -> None:
    import deepspeed

    from grpo_ds.reduce import reduce_metrics

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    deepspeed.init_distributed(dist_backend="gloo")
    value = [1.0, 4.0][rank]
    # names that the old suffix rules would have reduced otherwise
    metrics = {"a/errors": Metric(value, "mean"), "b/max_length": Metric(value, "min"),
               "c": Metric(value, "sum"), "d/min_length": Metric(value, "max"),
               "loss": Metric(value, "same")}
    reduced = reduce_metrics(metrics, torch.device("cpu"))
    torch.save(reduced, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_each_metric_combines_as_declared(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    assert ranks[0]["a/errors"] == ranks[1]["a/errors"] == 2.5
    assert ranks[0]["b/max_length"] == 1.0 and ranks[0]["d/min_length"] == 4.0
    assert ranks[0]["c"] == 5.0
    assert [r["loss"] for r in ranks] == [1.0, 4.0]  # "same": passed through untouched
    assert list(ranks[0]) == ["a/errors", "b/max_length", "c", "d/min_length", "loss"]


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduce='median'"):
        Metric(1.0, "median")
