"""2-rank ZeRO-3 checks of HybridRollout, launched by tests/test_rollout_zero3.py.

    deepspeed --num_gpus 2 --master_port P tests/scripts/rollout_zero3.py --out result.json

Phases (each prints "PHASE <name> ok" when done, so a hang shows where it stopped):
  same_tokens   each rank has its own prompts; gather="full", gather="layers" (1 and 2 layers
                per group) and an unpartitioned copy of the same weights give identical tokens
                (the engine's model has the fused decoder layers, the copy HF's)
  uneven_full   rank 0 stops after 2 tokens, rank 1 runs 48 (full gather) - must not hang
  uneven_layers the same with layer groups (lockstep), plus a rank with 0 prompts
  passes        max_batch_rows=6 (2 groups of 3 a pass): rank 0 has 5 prompts (3 passes), rank 1
                has 1 (1 pass) or, with layer groups, as many passes as rank 0 (2 empty); then
                a rank 0 with no prompts beside a rank 1 with 5 (3 empty passes); the tokens
                equal one pass's - must not hang
  packed        inside the full gather with oneDNN copies: every Linear's weights partitioned
                again (the copies stand in), everything else gathered
  train_after   the engine still trains: params partitioned again, train mode restored,
                forward/backward/step run
Rank 0 writes the collected facts to --out as JSON.
"""

import argparse
import copy
import json

import deepspeed
import torch
from deepspeed import comm as dist
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_ds.cpu.fused_layers import fuse_decoder_layers
from grpo_ds.engine import finish_rank, init_distributed
from grpo_ds.rollout import HybridRollout, SamplingParams
from grpo_ds.rollout.gather import gathered_bytes

torch.set_num_threads(1)
VOCAB, EOS, PAD = 96, 1, 0


def build_engine():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    plain = copy.deepcopy(model)  # HF's layers, not sharded
    fuse_decoder_layers(model)  # as training runs it: fused layers, ZeRO-3 leaf modules
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=model.parameters())
    return engine, plain


def rank_prompts(rank: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(100 + rank)
    lengths = torch.randint(3, 12, (count,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def same_tokens(engine, plain, rank, facts):
    prompts = rank_prompts(rank, 3)
    full_bytes = gathered_bytes(list(engine.module.parameters()))
    facts["auto_no_budget"] = HybridRollout(engine.module, PAD).gather_mode()
    facts["auto_big_budget"] = HybridRollout(engine.module, PAD,
                                             memory_budget_bytes=full_bytes).gather_mode()
    facts["auto_small_budget"] = HybridRollout(engine.module, PAD,
                                               memory_budget_bytes=full_bytes - 1).gather_mode()
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95)
    outs = {
        "full": HybridRollout(engine.module, PAD, gather="full").generate(prompts, 4, params, 7),
        "layers1": HybridRollout(engine.module, PAD, gather="layers",
                                 layers_per_group=1).generate(prompts, 4, params, 7),
        "layers2": HybridRollout(engine.module, PAD, gather="layers",
                                 layers_per_group=2).generate(prompts, 4, params, 7),
        "plain": HybridRollout(plain, PAD).generate(prompts, 4, params, 7),
        # auto with half the model's bytes as budget: layer groups sized by the planner
        "auto": HybridRollout(engine.module, PAD, memory_budget_bytes=full_bytes // 2
                              ).generate(prompts, 4, params, 7),
    }
    facts["auto_layers_per_group"] = outs["auto"].metrics.get("layers_per_group")
    ref = outs["plain"]
    for name, out in outs.items():
        facts[f"same_tokens_{name}_equal"] = bool(torch.equal(out.completion_ids, ref.completion_ids))
        facts[f"same_tokens_{name}_logprob_diff"] = float(
            (out.sampled_logprobs - ref.sampled_logprobs).abs().max())
        facts[f"same_tokens_{name}_mode"] = out.metrics["gather_mode"]
    # the two ranks sampled different prompts: their outputs must differ
    both = [None, None]
    dist.all_gather_object(both, outs["full"].completion_ids.tolist())
    facts["ranks_differ"] = both[0] != both[1]


def uneven(engine, rank, gather, facts, empty_rank0=False):
    # rank 0: tiny budget and an early EOS chance; rank 1: long completions without a stop
    if rank == 0:
        params = SamplingParams(max_new_tokens=2, stop_token_ids=(EOS,))
        prompts = [] if empty_rank0 else rank_prompts(rank, 2)
    else:
        params = SamplingParams(max_new_tokens=48)
        prompts = rank_prompts(rank, 2)
    out = HybridRollout(engine.module, PAD, gather=gather).generate(prompts, 3, params, 11)
    lengths = out.completion_mask.sum(-1).tolist()
    gathered = [None, None]
    dist.all_gather_object(gathered, {"lengths": lengths, "forwards": out.metrics["forwards"]})
    key = f"uneven_{gather}" + ("_empty" if empty_rank0 else "")
    facts[key] = gathered


def passes(engine, rank, gather, facts, empty_rank0=False):
    count = (0 if empty_rank0 else 5) if rank == 0 else (5 if empty_rank0 else 1)
    prompts = rank_prompts(rank, count)
    # different lengths per rank: the passes of the two ranks end at different steps
    params = SamplingParams(max_new_tokens=6 if rank == 0 else 20, temperature=0.9)
    kwargs = {"gather": gather, "layers_per_group": 1 if gather == "layers" else None}
    one = HybridRollout(engine.module, PAD, **kwargs).generate(prompts, 3, params, 5)
    split = HybridRollout(engine.module, PAD, max_batch_rows=6, **kwargs).generate(
        prompts, 3, params, 5)
    fact = {"passes": split.metrics["passes"], "forwards": split.metrics["forwards"],
            "rows": split.completion_ids.shape[0],
            "equal": bool(torch.equal(split.completion_ids, one.completion_ids)
                          and torch.equal(split.completion_mask, one.completion_mask)),
            "logprob_diff": float((split.sampled_logprobs - one.sampled_logprobs).abs().max())
            if count else 0.0}
    gathered = [None, None]
    dist.all_gather_object(gathered, fact)
    facts[f"passes_{gather}" + ("_empty" if empty_rank0 else "")] = gathered


def packed(engine, facts):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from grpo_ds.rollout.gather import full_gather, suspend_zero3_hooks

    module = engine.module
    linear = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad(), suspend_zero3_hooks(module), full_gather(module, {}, 4) as copies:
        status = [(id(p) in linear, p.ds_status) for p in module.parameters()]
    facts["packed_linears_partitioned"] = all(s == ZeroParamStatus.NOT_AVAILABLE
                                              for is_linear, s in status if is_linear)
    facts["packed_others_gathered"] = all(s == ZeroParamStatus.AVAILABLE
                                          for is_linear, s in status if not is_linear)
    facts["packed_bytes"] = copies
    facts["linear_weight_bytes"] = sum(p.ds_numel * p.element_size()
                                       for p in module.parameters() if id(p) in linear)


def train_after(engine, facts):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    module = engine.module
    facts["train_mode_restored"] = module.training
    facts["all_partitioned"] = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE
                                   for p in module.parameters())
    ids = torch.randint(2, VOCAB, (2, 10))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    facts["train_loss_finite"] = bool(torch.isfinite(loss).item())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()  # the project's: also frees DeepSpeed's /dev/shm buffer at exit
    torch.set_num_threads(1)
    rank = dist.get_rank()
    engine, plain = build_engine()
    engine.train()
    facts = {}
    for name, run in [("same_tokens", lambda: same_tokens(engine, plain, rank, facts)),
                      ("uneven_full", lambda: uneven(engine, rank, "full", facts)),
                      ("uneven_layers", lambda: uneven(engine, rank, "layers", facts)),
                      ("uneven_layers_empty",
                       lambda: uneven(engine, rank, "layers", facts, empty_rank0=True)),
                      ("passes_full", lambda: passes(engine, rank, "full", facts)),
                      ("passes_layers", lambda: passes(engine, rank, "layers", facts)),
                      ("passes_layers_empty",
                       lambda: passes(engine, rank, "layers", facts, empty_rank0=True)),
                      ("packed", lambda: packed(engine, facts)),
                      ("train_after", lambda: train_after(engine, facts))]:
        run()
        print(f"rank {rank} PHASE {name} ok", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(facts, f)


if __name__ == "__main__":
    main()
    finish_rank(0)
