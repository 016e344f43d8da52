"""GRPO on one GPU: 3 steps of a 0.5B Qwen2 under ZeRO-3 in bf16 with the CPU-offloaded
reference, the planner against the run's torch.cuda.max_memory_reserved, then resume and export.

One run (the module's fixture) serves every test; the resume test runs last and extends it.
"""

import json
import math
import sys
import time

import pytest

from tests.gpu.check import (
    CONFIG,
    MODE,
    SKIP_REASON,
    cli,
    record,
    run,
    save_qwen2,
    step_rows,
    train_overrides,
)

if MODE is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

STEPS = 3
# The planner's device estimate and the measured peak reserved must agree within this factor,
# either way: enough to say whether a model fits a GPU, not a byte-exact prediction.
PLAN_FACTOR = 2.0


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The 3-step run, launched like `grpo-ds train` but through tests/gpu/record_memory.py."""
    from grpo_ds.cli import free_port, launcher_env

    root = tmp_path_factory.mktemp("gpu_training")
    start = time.time()
    model = save_qwen2(root / "model")
    built = time.time() - start
    run_dir, memory = root / "run", root / "device_memory"
    overrides = train_overrides(model, run_dir)
    env, _ = launcher_env("auto")  # the host allocator `grpo-ds train` gives its ranks
    env.update(GRPO_DS_DEVICE_MEMORY=str(memory), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
               "--master_port", str(free_port()), "--module", "tests.gpu.record_memory",
               str(CONFIG), *overrides, f"--train.steps={STEPS}"]
    start = time.time()
    proc = run(command, timeout=300, env=env)
    peaks = json.loads((memory.parent / f"{memory.name}.rank0.json").read_text())
    return {"model": model, "run_dir": run_dir, "overrides": overrides, "peaks": peaks,
            "output": proc.stdout, "seconds": time.time() - start, "build_seconds": built}


def test_three_grpo_steps_in_bf16_with_the_offloaded_reference(trained):
    from safetensors import safe_open

    run_dir = trained["run_dir"]
    rows = step_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    record("train", {"launch_seconds": round(trained["seconds"], 1),
                     "model_build_seconds": round(trained["build_seconds"], 1),
                     "summary": summary, "peaks": trained["peaks"],
                     "steps": [{k: v for k, v in row.items() if k.startswith(
                         ("step", "loss", "kl", "grad_norm", "time/", "throughput/", "memory/",
                          "reward", "completions/mean_length"))} for row in rows]})
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert finite(row["loss"]) and finite(row["kl"]), row
        # the reward varies within groups, so every step has a real gradient
        assert finite(row["grad_norm"]) and row["grad_norm"] > 0, row
    assert summary["steps"] == STEPS and summary["world_size"] == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["dtype"] == "bfloat16"
    assert config["deepspeed"]["reference_placement"] == "cpu_offload"
    with safe_open(str(run_dir / "model" / "model.safetensors"), "pt") as saved:
        name = next(iter(saved.keys()))
        assert str(saved.get_tensor(name).dtype) == "torch.bfloat16"
    if MODE == "cuda":
        # the policy's bf16 weights alone are ~1 GB: the training ran on the GPU
        assert trained["peaks"]["max_memory_allocated"] > 2**30, trained["peaks"]
        assert trained["peaks"]["max_memory_reserved"] >= trained["peaks"]["max_memory_allocated"]


def test_planner_against_max_memory_reserved(trained):
    proc = run(cli("plan", "--config", str(CONFIG), "--model", str(trained["model"]),
                   "--world-size", "1", "--json", *trained["overrides"]), timeout=120)
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    reserved = trained["peaks"]["max_memory_reserved"]
    planned = plan["device_per_rank"]
    record("plan", {"device_per_rank_planned": planned, "max_memory_reserved": reserved,
                    "max_memory_allocated": trained["peaks"]["max_memory_allocated"],
                    "reserved_over_planned": reserved / planned if planned else None,
                    "peak_phase": plan["peak_phase"], "verdict": plan["verdict"],
                    "budget_device_bytes": plan["budgets"]["device_bytes"],
                    "components": {k: c["device"] for k, c in plan["components"].items()}})
    assert plan["fits"] and planned > 0
    if MODE == "cuda":
        assert 1 / PLAN_FACTOR <= reserved / planned <= PLAN_FACTOR, (reserved, planned)


def test_resume_then_export(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = trained["run_dir"]
    start = time.time()
    proc = run(cli("train", str(CONFIG), *trained["overrides"], f"--train.steps={STEPS + 1}",
                   "--resume"), timeout=300)
    resumed = time.time() - start
    assert f"step_{STEPS:06d}" in proc.stdout and "resumed from" in proc.stdout, proc.stdout[-2000:]
    rows = step_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # step 4 added, none repeated
    assert finite(rows[-1]["loss"]) and finite(rows[-1]["grad_norm"])
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS + 1

    start = time.time()
    out = tmp_path / "exported"
    proc = run(cli("export", str(run_dir), str(out), "--dtype", "bfloat16"), timeout=300)
    exported_in = time.time() - start
    assert f"step_{STEPS + 1:06d}" in proc.stdout
    record("resume_export", {"resume_launch_seconds": round(resumed, 1),
                             "export_seconds": round(exported_in, 1)})
    exported = AutoModelForCausalLM.from_pretrained(out)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # saved at the end of step 4
    assert exported.dtype == torch.bfloat16
    exported_state, final_state = exported.state_dict(), final.state_dict()
    assert sorted(exported_state) == sorted(final_state)
    # the last checkpoint is the end-of-training model: the same bf16 rounding of the same
    # fp32 weights
    for name, tensor in final_state.items():
        assert torch.equal(exported_state[name], tensor), (
            name, (exported_state[name].float() - tensor.float()).abs().max().item())
    device = "cuda" if MODE == "cuda" else "cpu"
    ids = torch.tensor([[1, 40, 41, 42]], device=device)
    with torch.no_grad():
        logits = exported.to(device)(ids).logits
    assert logits.shape[-1] == exported.config.vocab_size and torch.isfinite(logits).all()
