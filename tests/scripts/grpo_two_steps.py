"""Run under `deepspeed --num_gpus 2`: two real GRPO steps on ZeRO-3 (fused decoder layers and
oneDNN Linears with activation checkpointing, and in the CPU-offloaded reference), then report
per rank what the test checks: did the policy change, how much of it does this rank hold, and
did the reference stay frozen. Writes OUT_DIR/rank{r}.json."""

import json
import sys
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for tests.tiny_models

from grpo_ds.build import build_run
from grpo_ds.checkpoint import Checkpointer, RunState
from grpo_ds.config import load_config
from grpo_ds.engine import finish_rank, init_distributed
from grpo_ds.metrics import RunLogger
from grpo_ds.trainer import run_grpo
from tests.tiny_models import save_arithmetic_lm


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter gathered to full size (a collective), copied to CPU."""
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone().cpu() for name, p in params.items()}


def leading_one(prompts, completions, **kwargs):
    """A reward an untrained model earns on some samples, so advantages are not all 0."""
    return [float(c.startswith("1")) for c in completions]


def main() -> None:
    out_dir = Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, [f"--output.run_dir={out_dir}", "--train.steps=2",
                             "--train.eval_every=0", "--task.eval_size=32",
                             "--train.prompts_per_step=8", "--train.micro_batch_size=16",
                             "--grpo.beta=0.1", "--train.lr=0.01", "--output.save_model=false",
                             # 4 prompts x G=8 a rank, 2 groups a pass: the rollout in 2 passes
                             "--rollout.max_batch_rows=16",
                             # fused layers and oneDNN Linears under activation checkpointing
                             "--model.fused_layers=on", "--model.onednn_linears=on",
                             "--model.gradient_checkpointing=true", "--model.dtype=float32",
                             "--train.logprob_chunk_size=64"])
    model_dir = out_dir / "init_model"
    if rank == 0:
        save_arithmetic_lm(model_dir)
    dist.barrier()
    # the builder `grpo-ds train` uses: plan, device, arithmetic prompts, engines, rollout
    run = build_run(cfg, rank, world, str(model_dir), reward_fns=[leading_one], say=lambda _: None)
    policy, reference = run.engines.policy, run.engines.reference
    policy_before, reference_before = full_params(policy), full_params(reference)
    logger = RunLogger(out_dir, rank, cfg.train.steps, quiet=True)
    state = RunState(model_path=str(model_dir), world_size=world)
    checkpointer = Checkpointer(policy, out_dir / "checkpoints", 1, run.inputs.source,
                                logger.print)
    run_grpo(run, logger, state, checkpointer)
    logger.close()
    policy_after, reference_after = full_params(policy), full_params(reference)
    local = sum(p.ds_tensor.numel() for p in policy.module.parameters())
    total = sum(p.ds_numel for p in policy.module.parameters())
    report = {
        "world": world,
        # from_pretrained leaves eval mode, where HF silently skips gradient checkpointing
        "policy_in_train_mode": policy.module.lm.training,
        "checkpointing_on": policy.module.lm.model.gradient_checkpointing,
        "local_fraction": local / total,
        "policy_total_params": total,
        "policy_max_abs_change": max((policy_after[k] - policy_before[k]).abs().max().item()
                                     for k in policy_before),
        "reference_max_abs_change": max(
            (reference_after[k] - reference_before[k]).abs().max().item()
            for k in reference_before),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main()
    finish_rank(0)
