"""Run under the deepspeed launcher (1 or 2 ranks): the full ZeRO-3 gradient of one GRPO
optimizer step, for several micro-batch sizes and each loss aggregation and loss variant, through
the trainer's own `micro_batch_loss`, with HF's decoder layers and torch's default matmuls ("off")
or the fused layers with oneDNN Linears ("on": model.fused_layers and model.onednn_linears).
Rank 0 saves {(variant, micro): {param: grad}} to OUT; variant "lora" is a second engine per
micro-batch size, LoRA adapters on a frozen base, whose gradient holds the adapters' only.

One engine per micro-batch size serves every variant: after reading a step's gradient, an
optimizer step at learning rate 0 clears it and leaves the weights as they were ("repeat" runs the
first variant again last, so the test sees if anything carried over)."""

import sys

import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_get_full_grad

from grpo_ds.batch import RolloutBatch
from grpo_ds.config import LoraConfig, deepspeed_config, load_config, validate
from grpo_ds.cpu.fused_layers import apply_fused_layers
from grpo_ds.cpu.onednn_linear import apply_onednn_linears
from grpo_ds.device import resolve_config
from grpo_ds.engine import build_policy, finish_rank, init_distributed
from grpo_ds.lora import add_adapters
from grpo_ds.model import build_tiny_llama
from grpo_ds.update import micro_batch_loss, step_counts

SEQUENCES, PROMPT, COMPLETION, VOCAB = 16, 5, 7, 17

# variant -> (config overrides, whether pi_old differs from the policy: mu > 1 stands in).
# Without old log-probs (mu = 1) every ratio is 1 and no clip or sequence ratio would act.
VARIANTS = {
    "grpo": ([], False),
    "token_mean": (["--grpo.loss_aggregation=token_mean"], False),
    "dr_grpo": (["--grpo.loss_aggregation=dr_grpo"], False),
    "bnpo": (["--grpo.loss_aggregation=bnpo"], False),
    "clip_old": (["--grpo.loss_aggregation=token_mean"], True),
    "gspo": (["--grpo.ratio_level=sequence"], True),
    "gspo_token": (["--grpo.ratio_level=sequence_token", "--grpo.loss_aggregation=token_mean"],
                   True),
    "cispo": (["--grpo.policy_loss=cispo", "--grpo.loss_aggregation=token_mean"], True),
    "dual_clip": (["--grpo.clip_ratio_c=1.5", "--grpo.loss_aggregation=token_mean"], True),
    "tis_token": (["--grpo.importance_sampling=token_truncate",
                   "--grpo.loss_aggregation=token_mean"], True),
    "mis_sequence": (["--grpo.importance_sampling=sequence_mask",
                      "--grpo.loss_aggregation=dr_grpo", "--grpo.importance_sampling_cap=3"],
                     True),
    "repeat": ([], False),  # "grpo" again, after all the others on the same engine
}


def fixed_batch() -> RolloutBatch:
    """The same 16 sequences on every rank and every run: uneven completion lengths; old
    log-probs around the tiny model's log(1/17) so ratios spread over ~0.25 .. 4, and sampler
    log-probs near them so some trainer/sampler ratios pass the rollout-correction cap."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, VOCAB, (SEQUENCES, PROMPT), generator=gen)
    completion = torch.randint(3, VOCAB, (SEQUENCES, COMPLETION), generator=gen)
    lengths = torch.randint(1, COMPLETION + 1, (SEQUENCES,), generator=gen)
    mask = (torch.arange(COMPLETION)[None] < lengths[:, None]).float()
    old = -2.83 + 0.7 * torch.randn(SEQUENCES, COMPLETION, generator=gen)
    return RolloutBatch(
        input_ids=torch.cat([prompt, completion], 1),
        attention_mask=torch.cat([torch.ones_like(prompt), mask.long()], 1),
        completion_ids=completion, completion_mask=mask,
        advantages=torch.randn(SEQUENCES, generator=gen),
        sampled_logprobs=old + 0.5 * torch.randn(SEQUENCES, COMPLETION, generator=gen),
        ref_logprobs=-torch.rand(SEQUENCES, COMPLETION, generator=gen) * 3,
        old_logprobs=old)


def config(micro: int, overrides: list[str], world: int):
    cfg = load_config(None, ["--train.prompts_per_step=2", "--rollout.group_size=8",
                             f"--train.micro_batch_size={micro}", "--grpo.beta=0.1",
                             f"--rollout.max_new_tokens={COMPLETION}", *overrides])
    cfg, _ = resolve_config(cfg)  # every `auto` for this accelerator, as train.py
    return cfg, validate(cfg, world)


def step_gradient(engine, cfg, batch: RolloutBatch, micro: int, world: int, with_old: bool):
    counts = step_counts(batch, engine.device)
    starts = list(range(0, len(batch), micro))
    for start in starts:
        part = batch.slice(start, start + micro)
        loss, _, _ = micro_batch_loss(engine, part, cfg, counts,
                                      part.old_logprobs if with_old else None)
        engine.backward(loss * world, scale_wrt_gas=False)
        if start != starts[-1]:
            engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
             if p.requires_grad}  # with LoRA: the adapters
    engine.step()  # the boundary: learning rate 0, so it only clears the gradients
    return grads


def micro_gradients(micro: int, world: int, rank: int, layers: str) -> dict:
    cfg, plan = config(micro, [], world)
    lm = build_tiny_llama(VOCAB, 32, 2, 4, 32, {"pad_token_id": 0}, seed=0)
    apply_fused_layers(lm, layers)
    apply_onednn_linears(lm, layers)
    engine = build_policy(lm, deepspeed_config(cfg, plan), chunk_size=8,
                          gradient_checkpointing=False)
    for group in engine.optimizer.optimizer.param_groups:
        group["lr"] = 0.0
    per_rank = SEQUENCES // world
    batch = fixed_batch().slice(rank * per_rank, (rank + 1) * per_rank)
    results = {}
    for name, (overrides, with_old) in VARIANTS.items():
        variant_cfg, _ = config(micro, overrides, world)
        results[(name, micro)] = step_gradient(engine, variant_cfg, batch, micro, world, with_old)
    engine.destroy()
    results[("lora", micro)] = lora_gradient(cfg, plan, batch, micro, world, layers)
    return results


def lora_gradient(cfg, plan, batch: RolloutBatch, micro: int, world: int, layers: str) -> dict:
    """The adapters' gradient (rank 4 on every Linear of the frozen base) for the "grpo" loss.
    B is drawn at random (PEFT starts it at 0, where A's gradient is 0 too). The decoder layers
    stay HF's (fused ones would skip the adapters); `layers` sets the oneDNN Linears."""
    lm = build_tiny_llama(VOCAB, 32, 2, 4, 32, {"pad_token_id": 0}, seed=0)
    add_adapters(lm, LoraConfig(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    apply_onednn_linears(lm, layers)
    engine = build_policy(lm, deepspeed_config(cfg, plan), chunk_size=8,
                          gradient_checkpointing=False)
    for group in engine.optimizer.optimizer.param_groups:
        group["lr"] = 0.0
    grads = step_gradient(engine, cfg, batch, micro, world, with_old=False)
    engine.destroy()
    return grads


def main() -> None:
    out, micros, layers = sys.argv[-3], [int(m) for m in sys.argv[-2].split(",")], sys.argv[-1]
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for micro in micros:
        results.update(micro_gradients(micro, world, rank, layers))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish_rank(0)
