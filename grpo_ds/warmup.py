"""Supervised warm-up on a task's demonstrations, until held-out accuracy plateaus.

This stands in for the SFT model a user would normally bring. It trains on the same ZeRO-3
engine type as GRPO, maximising the log-likelihood of the demonstration tokens (token mean over
the whole global batch), and records the held-out greedy accuracy curve so that anyone can see it
had flattened before GRPO started.
"""

from __future__ import annotations

import time
from pathlib import Path

import deepspeed.comm as dist
import torch

from grpo_ds.batch import join, left_pad, right_pad
from grpo_ds.config import Config, deepspeed_config, validate
from grpo_ds.engine import build_policy
from grpo_ds.model import build_tiny_llama, save_hf_model


def sft_loss(engine, tokenizer, pairs: list[tuple[str, str]], num_tokens: int) -> torch.Tensor:
    """-sum log p(demonstration | prompt) / global demonstration tokens, for this rank's pairs."""
    prompts = [tokenizer(p)["input_ids"] for p, _ in pairs]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for _, a in pairs]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    completion_ids, completion_mask = right_pad(answers, tokenizer.pad_token_id)
    device = engine.device
    input_ids, attention_mask = join(prompt_ids, prompt_mask, completion_ids, completion_mask)
    logprobs, _ = engine(input_ids.to(device), attention_mask.to(device), completion_ids.to(device))
    return -(logprobs * completion_mask.to(device)).sum() / num_tokens


def run_warmup(engine, tokenizer, source, cfg, evaluate, log) -> list[dict]:
    """Train until `patience` evaluations bring no gain; returns the curve [{step, accuracy}]."""
    world = dist.get_world_size()
    curve = [{"step": 0, "accuracy": evaluate(), "seconds": 0.0}]
    log(f"warm-up step 0: held-out accuracy {curve[0]['accuracy']:.3f}")
    best, stale, start = curve[0]["accuracy"], 0, time.time()
    for step in range(1, cfg.max_steps + 1):
        pairs = source.demonstrations(step, cfg.batch_size)
        local_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1
                           for _, a in pairs)
        total = torch.tensor([local_tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(total)
        # DeepSpeed averages gradients over ranks; scaling by world makes it the global mean.
        loss = sft_loss(engine, tokenizer, pairs, total.item()) * world
        engine.backward(loss)
        engine.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            accuracy = evaluate()
            curve.append({"step": step, "accuracy": accuracy,
                          "seconds": round(time.time() - start, 1)})
            log(f"warm-up step {step}: loss {loss.item() / world:.4f}, "
                f"held-out accuracy {accuracy:.3f}")
            if accuracy > best + cfg.min_gain:
                best, stale = accuracy, 0
            else:
                stale += 1
            if stale >= cfg.patience:
                break
    return curve


def warm_start(cfg: Config, source, tokenizer, logger, reward_fn) -> tuple[str, list[dict]]:
    """Build the default task's tiny Llama, run the supervised warm-up, save it as a HF dir."""
    from grpo_ds.rollout import HybridRollout
    from grpo_ds.trainer import evaluate

    world = dist.get_world_size()
    lm = build_tiny_llama(
        len(tokenizer), cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads,
        max_positions=64, seed=cfg.train.seed,
        special={"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id})
    ds = deepspeed_config(cfg, validate(cfg, world))
    ds.update(train_micro_batch_size_per_gpu=cfg.warmup.batch_size // world,
              gradient_accumulation_steps=1, train_batch_size=cfg.warmup.batch_size)
    ds["optimizer"]["params"]["lr"] = cfg.warmup.lr
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": cfg.warmup.zero_stage}
    ds.pop("scheduler", None)
    engine = build_policy(lm, ds, cfg.train.logprob_chunk_size, False)
    from grpo_ds.agents.build import build_multiturn

    rollout = HybridRollout(engine.module.lm, pad_token_id=tokenizer.pad_token_id,
                            tokenizer=tokenizer, packed_weights=cfg.rollout.packed_weights,
                            max_batch_rows=cfg.rollout.max_batch_rows)
    rollout = build_multiturn(cfg, rollout, tokenizer, engine.device)  # a tool task evaluates with its tools
    eval_rows = source.eval_rows()
    curve = run_warmup(engine, tokenizer, source, cfg.warmup,
                       lambda: evaluate(cfg, rollout, tokenizer, eval_rows, reward_fn,
                                        engine.device),
                       logger.print)
    out_dir = Path(cfg.output.run_dir) / "sft_model"
    save_hf_model(engine, tokenizer, out_dir)
    engine.destroy()
    return str(out_dir), curve
