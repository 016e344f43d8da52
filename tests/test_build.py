"""One builder: the step benchmark builds the very run `grpo-ds train` builds (grpo_ds/build.py).

Real DeepSpeed ZeRO-3 engines on one gloo rank in this process: the bench's setup on one side,
train.py's two builder calls (build_inputs, then build_engines on the start model) on the other.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from grpo_ds.build import build_engines, build_inputs
from grpo_ds.config import load_config
from grpo_ds.tools.bench import step


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    import deepspeed

    store = tmp_path_factory.mktemp("store") / "rendezvous"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0,
                                         world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    torch.distributed.destroy_process_group()


def rollout_settings(rollout) -> dict:
    backend = rollout.backend
    return {"colocated": type(rollout), "backend": type(backend), "gather": backend.gather,
            "budget": backend.budget, "max_batch_rows": backend.max_batch_rows,
            "packed": backend.pack, "pad": backend.pad_token_id}


def engine_settings(engine) -> dict:
    return {"type": type(engine), "module": type(engine.module), "lm": type(engine.module.lm),
            "stage": engine.zero_optimization_stage(),
            "optimizer": type(getattr(engine, "optimizer", None)),
            "offload_param": engine.zero_offload_param(), "chunk": engine.module.chunk_size,
            "checkpointing": engine.module.lm.is_activation_checkpointing}


def test_the_step_bench_builds_what_train_builds(tmp_path, process_group, one_thread,
                                                 monkeypatch):
    # rollout settings the old hand-wired bench left out: they must reach its rollout now
    extra = ["--rollout.max_batch_rows=8", "--rollout.memory_budget_gb=0.5"]
    args = SimpleNamespace(mu=1, dtype="float32", fused_layers="auto", onednn_linears="auto",
                           chunk=0, out=str(tmp_path / "bench"))
    overrides = step.overrides(step.QUICK, args) + extra
    monkeypatch.setattr(step, "overrides", lambda w, a: overrides)
    bench = step.setup(args, step.QUICK)

    # train.py: build_inputs on the config, then build_engines on the start model
    setup, _ = build_inputs(load_config(None, overrides), 0, 1, say=lambda _: None)
    train = build_engines(setup, str(tmp_path / "bench.model"), setup.ds, say=lambda _: None)

    run = bench["run"]
    assert run.setup.cfg == setup.cfg and run.setup.plan == setup.plan
    assert run.setup.ds == setup.ds
    assert rollout_settings(bench["rollout"]) == rollout_settings(train.rollout)
    assert rollout_settings(train.rollout)["max_batch_rows"] == 8
    assert rollout_settings(train.rollout)["budget"] == 2**29
    assert engine_settings(bench["policy"]) == engine_settings(train.policy)
    assert engine_settings(bench["reference"]) == engine_settings(train.reference)
    assert engine_settings(train.policy)["stage"] == 3
    assert engine_settings(train.reference)["offload_param"]
    for built in (bench["policy"], bench["reference"], train.policy, train.reference):
        built.destroy()
