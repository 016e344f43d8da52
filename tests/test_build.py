"""One builder: the step benchmark builds the very run `grpo-ds train` builds (grpo_ds/build.py).

Real DeepSpeed ZeRO-3 engines on one gloo rank, in a child process (engines and kernels leave
process-wide state behind): the bench's setup on one side, train.py's two builder calls
(build_inputs, then build_engines on the start model) on the other.
"""

import os
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from grpo_ds.build import build_engines, build_inputs
from grpo_ds.config import load_config
from grpo_ds.tools.bench import step_worker as step


def rollout_settings(rollout) -> dict:
    backend = rollout.backend
    return {"colocated": type(rollout).__name__, "backend": type(backend).__name__, "gather": backend.gather,
            "budget": backend.budget, "max_batch_rows": backend.max_batch_rows,
            "packed": backend.pack, "pad": backend.pad_token_id}


def engine_settings(engine) -> dict:
    return {"type": type(engine).__name__, "module": type(engine.module).__name__,
            "lm": type(engine.module.lm).__name__,
            "stage": engine.zero_optimization_stage(),
            "optimizer": type(getattr(engine, "optimizer", None)).__name__,
            "offload_param": engine.zero_offload_param(), "chunk": engine.module.chunk_size,
            "checkpointing": engine.module.lm.is_activation_checkpointing}


def _build_both(rank: int, tmp: str) -> None:
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0,
                                         world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    # rollout settings the old hand-wired bench left out: they must reach its rollout now
    extra = ["--rollout.max_batch_rows=8", "--rollout.memory_budget_gb=0.5"]
    args = SimpleNamespace(mu=1, dtype="float32", fused_layers="auto", onednn_linears="auto",
                           chunk=0, out=f"{tmp}/bench")
    overrides = step.overrides(step.QUICK, args) + extra
    step.overrides = lambda w, a: overrides
    bench = step.setup(args, step.QUICK)
    # train.py: build_inputs on the config, then build_engines on the start model
    setup, _ = build_inputs(load_config(None, overrides), 0, 1, say=lambda _: None)
    train = build_engines(setup, f"{tmp}/bench.model", setup.ds, say=lambda _: None)
    run = bench["run"]
    torch.save({"same_plan": run.setup.cfg == setup.cfg and run.setup.plan == setup.plan,
                "ds": (run.setup.ds, setup.ds),
                "rollout": (rollout_settings(bench["rollout"]), rollout_settings(train.rollout)),
                "policy": (engine_settings(bench["policy"]), engine_settings(train.policy)),
                "reference": (engine_settings(bench["reference"]),
                              engine_settings(train.reference))}, f"{tmp}/result")
    torch.distributed.destroy_process_group()


def test_the_step_bench_builds_what_train_builds(tmp_path):
    mp.spawn(_build_both, args=(str(tmp_path),), nprocs=1)
    r = torch.load(tmp_path / "result", weights_only=False)
    assert r["same_plan"]
    assert r["ds"][0] == r["ds"][1]
    bench, train = r["rollout"]
    assert bench == train and train["max_batch_rows"] == 8 and train["budget"] == 2**29
    assert r["policy"][0] == r["policy"][1] and r["policy"][1]["stage"] == 3
    assert r["reference"][0] == r["reference"][1] and r["reference"][1]["offload_param"]
