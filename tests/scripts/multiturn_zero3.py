"""2-rank ZeRO-3 check of MultiTurnRollout, launched by tests/test_multiturn_zero3.py.

    deepspeed --num_gpus 2 --master_port P tests/scripts/multiturn_zero3.py --out result.json

Rank 0's environment ends every episode after its first model turn; rank 1's answers every turn,
so its episodes run max_turns = 6 model turns. Every generate call gathers the partitioned
weights (a collective), so rank 0 must keep joining with empty calls. Phases (each prints
"PHASE <name> ok", so a hang shows where it stopped): uneven_full (gather="full"),
uneven_layers (layer groups, lockstep inside each call), empty_rank (rank 0 has no prompts),
all with the KV cache extended between turns, and uneven_layers_reencode (each turn a fresh
generate over the whole context).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed
import torch
from deepspeed import comm as dist
from transformers import LlamaForCausalLM

from grpo_ds.agents.environment import EnvReply
from grpo_ds.agents.rollout import MultiTurnRollout
from grpo_ds.engine import finish_rank, init_distributed
from grpo_ds.rollout import HybridRollout, SamplingParams
from tests.tiny_models import llama_config, text_tokenizer

torch.set_num_threads(1)


class Scripted:
    """Ends the episode at once (rank 0) or always answers (rank 1)."""

    def __init__(self, answers: bool):
        self.answers = answers

    def step(self, messages, row):
        return EnvReply(observation="<ok>", tool_calls=1) if self.answers else EnvReply(done=True)


def run(engine, tok, rank, gather, prompts, kv_cache="extend"):
    backend = HybridRollout(engine.module, tok.pad_token_id, gather=gather, layers_per_group=1)
    env = Scripted(answers=rank == 1)
    rollout = MultiTurnRollout(backend, lambda: env, tok, "]", max_turns=6, max_total_tokens=200,
                               kv_cache=kv_cache)
    params = SamplingParams(max_new_tokens=3, temperature=1.0)  # no stop: every turn runs 3
    out = rollout.generate(prompts, 2, params, seed=11 + rank)
    return {"turns": out.columns["turns"], "generate_calls": out.metrics["generate_calls"],
            "lengths": out.completion_mask.sum(1).tolist(),
            "own": out.loss_mask.sum(1).tolist(), "tokens": out.completion_ids.tolist()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    init_distributed()
    rank = dist.get_rank()
    tok = text_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tok))
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      model_parameters=model.parameters())
    prompts = [tok(p)["input_ids"] for p in ("3*4=", "12*5=")]
    facts = {}
    for name, gather, mine, kv in (("uneven_full", "full", prompts, "extend"),
                                   ("uneven_layers", "layers", prompts, "extend"),
                                   ("uneven_layers_reencode", "layers", prompts, "reencode"),
                                   ("empty_rank", "layers", [] if rank == 0 else prompts,
                                    "extend")):
        facts[name] = run(engine, tok, rank, gather, mine, kv)
        print(f"PHASE {name} ok", flush=True)
    gathered = [None, None]
    dist.all_gather_object(gathered, facts)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    return 0


if __name__ == "__main__":
    finish_rank(main())
