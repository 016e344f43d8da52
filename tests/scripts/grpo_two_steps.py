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

from grpo_ds.checkpoint import Checkpointer, RunState
from grpo_ds.config import deepspeed_config, load_config, validate
from grpo_ds.cpu import apply_kernels
from grpo_ds.cpu.fused_layers import apply_fused_layers
from grpo_ds.cpu.onednn_linear import apply_onednn_linears
from grpo_ds.device import resolve_config
from grpo_ds.engine import (
    build_policy,
    build_reference,
    finish_rank,
    init_distributed,
    load_sharded,
)
from grpo_ds.metrics import RunLogger
from grpo_ds.model import build_tiny_llama
from grpo_ds.tasks.arithmetic import ArithmeticSource, ArithmeticTask, build_tokenizer
from grpo_ds.trainer import run_grpo


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
                             "--rollout.max_batch_rows=16"])
    cfg, _ = resolve_config(cfg)  # every `auto` for this accelerator, as train.py
    plan = validate(cfg, world)
    tokenizer = build_tokenizer()
    model_dir = out_dir / "init_model"
    if rank == 0:
        lm = build_tiny_llama(len(tokenizer), 32, 2, 4, 64, {"bos_token_id": 1,
                              "eos_token_id": 2, "pad_token_id": 0}, seed=0)
        lm.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    dist.barrier()
    ds = deepspeed_config(cfg, plan)
    lm, tokenizer = load_sharded(str(model_dir), ds, "float32")
    apply_fused_layers(lm, "on")  # fused layers with activation checkpointing under ZeRO-3
    apply_onednn_linears(lm, "on")
    policy = build_policy(lm, ds, 64, gradient_checkpointing=True)
    reference = build_reference(str(model_dir), ds, "cpu_offload", "float32", 64,
                                lambda m: apply_kernels(m, "on", "on"))
    policy_before, reference_before = full_params(policy), full_params(reference)
    task = ArithmeticTask(digits=2, eval_size=32)
    source = ArithmeticSource(task, cfg.train.prompts_per_step, rank, world, seed=0)
    logger = RunLogger(out_dir, rank, cfg.train.steps, quiet=True)
    state = RunState(model_path=str(model_dir), world_size=world)
    checkpointer = Checkpointer(policy, out_dir / "checkpoints", 1, source, logger.print)
    run_grpo(cfg, plan, policy, reference, tokenizer, source, [leading_one], ["leading_one"],
             logger, state, checkpointer)
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
