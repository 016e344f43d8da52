"""Run under the deepspeed launcher (2 ranks): the trainer's `update` with mu = 2 on a batch of
uneven lengths (left-padded prompts, right-padded completions, different on each rank), so
micro-batches are length-sorted, trimmed, and the ranks' widths differ. Rank 0 saves, per rank,
the log-probs of a no-grad forward before the update and the old log-probs `update` kept: they
must be the same numbers in the same (batch) order."""

import sys

import deepspeed.comm as dist
import torch

from grpo_ds.batch import RolloutBatch, left_pad, right_pad
from grpo_ds.config import deepspeed_config, load_config, validate
from grpo_ds.device import resolve_config
from grpo_ds.engine import build_policy, finish_rank, init_distributed
from grpo_ds.model import build_tiny_llama
from grpo_ds.update import forward_logprobs, update

SEQUENCES, VOCAB = 8, 23


def uneven_batch(rank: int) -> RolloutBatch:
    gen = torch.Generator().manual_seed(rank)
    prompt_lens = torch.randint(1, 6, (SEQUENCES,), generator=gen).tolist()
    completion_lens = torch.randint(1, 9 + 4 * rank, (SEQUENCES,), generator=gen).tolist()
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in prompt_lens]
    completions = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in completion_lens]
    p_ids, p_mask = left_pad(prompts, 0)
    c_ids, c_mask = right_pad(completions, 0)
    return RolloutBatch(
        input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=torch.cat([p_mask, c_mask], 1),
        completion_ids=c_ids, completion_mask=c_mask.float(),
        advantages=torch.randn(SEQUENCES, generator=gen),
        sampled_logprobs=torch.zeros(c_ids.shape),
        ref_logprobs=-torch.rand(c_ids.shape, generator=gen) * 3)


def main() -> None:
    out = sys.argv[-1]
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, ["--train.prompts_per_step=2", "--rollout.group_size=8",
                             "--train.micro_batch_size=2", "--grpo.beta=0.1",
                             "--grpo.num_iterations=2", "--rollout.max_new_tokens=16"])
    cfg, _ = resolve_config(cfg)  # every `auto` for this accelerator, as train.py
    plan = validate(cfg, world)
    lm = build_tiny_llama(VOCAB, 32, 2, 4, 64, {}, seed=0)
    engine = build_policy(lm, deepspeed_config(cfg, plan), chunk_size=4,
                          gradient_checkpointing=False)
    batch = uneven_batch(rank)
    before = forward_logprobs(engine, batch, 3, cfg.rollout.temperature)  # other micro size
    updated = update(engine, batch, cfg, plan)
    mask = batch.completion_mask.bool()
    mine = torch.stack([before[mask], updated.old_logprobs[mask]])
    everyone = [None] * world
    dist.all_gather_object(everyone, {"values": mine, "loss": updated.metrics["loss"].value})
    if rank == 0:
        torch.save(everyone, out)
    dist.barrier()


if __name__ == "__main__":
    main()
    finish_rank(0)
