"""Run under the deepspeed launcher (1 or 2 ranks): the full ZeRO-3 gradient of one GRPO
optimizer step, for several micro-batch sizes and each loss aggregation, through the trainer's
own `micro_batch_loss`, with HF's decoder layers and torch's default matmuls ("off") or the fused
layers with oneDNN Linears ("on": model.fused_layers and model.onednn_linears). Rank 0 saves
{(aggregation, micro): {param: grad}} to OUT."""

import sys

import deepspeed.comm as dist
import torch
from deepspeed.utils import safe_get_full_grad

from grpo_ds.batch import RolloutBatch
from grpo_ds.config import deepspeed_config, load_config, validate
from grpo_ds.cpu.fused_layers import apply_fused_layers
from grpo_ds.cpu.onednn_linear import apply_onednn_linears
from grpo_ds.device import resolve_config
from grpo_ds.engine import build_policy, finish_rank, init_distributed
from grpo_ds.model import build_tiny_llama
from grpo_ds.trainer import micro_batch_loss, step_counts

SEQUENCES, PROMPT, COMPLETION, VOCAB = 16, 5, 7, 17


def fixed_batch() -> RolloutBatch:
    """The same 16 sequences on every rank and every run: uneven completion lengths."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, VOCAB, (SEQUENCES, PROMPT), generator=gen)
    completion = torch.randint(3, VOCAB, (SEQUENCES, COMPLETION), generator=gen)
    lengths = torch.randint(1, COMPLETION + 1, (SEQUENCES,), generator=gen)
    mask = (torch.arange(COMPLETION)[None] < lengths[:, None]).float()
    return RolloutBatch(
        input_ids=torch.cat([prompt, completion], 1),
        attention_mask=torch.cat([torch.ones_like(prompt), mask.long()], 1),
        completion_ids=completion, completion_mask=mask,
        advantages=torch.randn(SEQUENCES, generator=gen),
        sampled_logprobs=torch.zeros(SEQUENCES, COMPLETION),
        ref_logprobs=-torch.rand(SEQUENCES, COMPLETION, generator=gen) * 3)


def step_gradient(aggregation: str, micro: int, world: int, rank: int, layers: str) -> dict:
    cfg = load_config(None, ["--train.prompts_per_step=2", "--rollout.group_size=8",
                             f"--train.micro_batch_size={micro}", "--grpo.beta=0.1",
                             f"--grpo.loss_aggregation={aggregation}",
                             f"--rollout.max_new_tokens={COMPLETION}"])
    cfg, _ = resolve_config(cfg)  # every `auto` for this accelerator, as train.py
    plan = validate(cfg, world)
    lm = build_tiny_llama(VOCAB, 32, 2, 4, 32, {"pad_token_id": 0}, seed=0)
    apply_fused_layers(lm, layers)
    apply_onednn_linears(lm, layers)
    engine = build_policy(lm, deepspeed_config(cfg, plan), chunk_size=8,
                          gradient_checkpointing=False)
    per_rank = SEQUENCES // world
    batch = fixed_batch().slice(rank * per_rank, (rank + 1) * per_rank)
    counts = step_counts(batch, engine.device)
    starts = list(range(0, len(batch), micro))
    for i, start in enumerate(starts):
        loss, _, _ = micro_batch_loss(engine, batch.slice(start, start + micro), cfg, counts, None)
        engine.backward(loss * world, scale_wrt_gas=False)
        if i < len(starts) - 1:
            engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.destroy()
    return grads


def main() -> None:
    out, micros, layers = sys.argv[-3], [int(m) for m in sys.argv[-2].split(",")], sys.argv[-1]
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {(agg, micro): step_gradient(agg, micro, world, rank, layers)
               for agg in ("grpo", "token_mean", "dr_grpo") for micro in micros}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish_rank(0)
