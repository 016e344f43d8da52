"""2-rank ZeRO-3 checks of LoRA (grpo_ds/lora.py), launched by tests/test_lora_zero3.py.

    deepspeed --num_gpus 2 --master_port P tests/scripts/lora_zero3.py --out DIR

Phases (each prints "PHASE <name> ok"):
  build      a tiny Llama saved to DIR/base, loaded sharded, adapters added, the engine built:
             which parameters train, and how many elements the optimizer holds (all ranks)
  step       one optimizer step (B leaves zero, so the adapters now matter); the base unchanged
  reference  AdapterFreeReference's log-probs vs a separately loaded, unsharded base model
  adapter    save_adapter -> DIR/adapter; every rank loads it with PeftModel.from_pretrained onto
             an unsharded base: the unsharded PEFT model
  rollout    full-gather and layer-group sampling from the engine vs the unsharded PEFT model
  merged     save_adapter_and_merged -> DIR/run/model vs the PEFT model's merge_and_unload
  resume     checkpoint after step 1, step 2; a fresh engine (other adapter init) loads the
             checkpoint and takes step 2 again: the adapters must be bit-identical
Rank 0 writes the facts to DIR/facts.json.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for a clean launch

import deepspeed
import torch
from deepspeed import comm as dist

from grpo_ds.checkpoint import Checkpointer, RunState
from grpo_ds.config import deepspeed_config, load_config, validate
from grpo_ds.device import resolve_config
from grpo_ds.engine import build_policy, finish_rank, init_distributed, load_sharded
from grpo_ds.lora import (
    AdapterFreeReference,
    adapter_numel,
    adapter_parameters,
    add_adapters,
    save_adapter,
    save_adapter_and_merged,
)
from grpo_ds.model import CausalLMWithLogprobs
from grpo_ds.rollout import HybridRollout, SamplingParams
from tests.tiny_models import save_causal_lm, text_tokenizer

torch.set_num_threads(1)
PAD = 0


def make_cfg():
    cfg = load_config(None, ["--train.prompts_per_step=2", "--rollout.group_size=2",
                             "--train.micro_batch_size=2", "--model.dtype=float32",
                             "--train.lr=0.01", "--model.lora.rank=4", "--model.lora.alpha=8",
                             "--model.fused_layers=off", "--model.onednn_linears=off"])
    cfg, _ = resolve_config(cfg)
    return cfg, deepspeed_config(cfg, validate(cfg, dist.get_world_size()))


def build(base_dir, cfg, ds, seed):
    lm, tokenizer = load_sharded(str(base_dir), ds, "float32", "sdpa")
    peft_model = add_adapters(lm, cfg.model.lora, seed)
    return build_policy(lm, ds, chunk_size=8, gradient_checkpointing=False), peft_model, tokenizer


def fixed_batch(tokenizer):
    prompt = tokenizer(["2+2=", "10-3="], padding=True, return_tensors="pt")
    completion = torch.tensor([[20, 21, 22], [23, 24, 25]])
    input_ids = torch.cat([prompt["input_ids"], completion], dim=1)
    mask = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
    return input_ids, mask, completion


def train_step(policy, batch):
    logprobs, _ = policy(*batch)
    policy.backward(-logprobs.mean())
    policy.step()


def gathered(params):
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def optimizer_elements(policy) -> int:
    """Adam's exp_avg elements on this rank, summed over ranks."""
    local = sum(s["exp_avg"].numel() for s in policy.optimizer.optimizer.state.values())
    total = torch.tensor([local], dtype=torch.long)
    dist.all_reduce(total)
    return int(total.item())


def phase_build_and_step(policy, facts, batch):
    lm = policy.module.lm
    frozen = [p for p in lm.parameters() if not p.requires_grad]
    facts["adapter_numel"] = adapter_numel(lm)
    facts["base_numel"] = sum(p.ds_numel for p in frozen)
    facts["trainable_all_lora"] = all("lora_" in n for n, _ in adapter_parameters(lm))
    facts["adapters_partitioned"] = all(hasattr(p, "ds_id") for _, p in adapter_parameters(lm))
    base_weight = lm.model.layers[0].self_attn.q_proj.base_layer.weight
    before = gathered([base_weight])[0]
    train_step(policy, batch)
    facts["optimizer_elements"] = optimizer_elements(policy)
    facts["base_unchanged"] = bool(torch.equal(before, gathered([base_weight])[0]))
    b = lm.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    facts["lora_b_nonzero"] = bool(gathered([b])[0].abs().max() > 0)
    print("PHASE step ok", flush=True)


def phase_reference(policy, peft_model, base_dir, batch, facts):
    from transformers import AutoModelForCausalLM

    reference = AdapterFreeReference(policy, peft_model)
    ref_logprobs, _ = reference(*batch)
    facts["train_mode_after_reference"] = policy.training
    base = CausalLMWithLogprobs(AutoModelForCausalLM.from_pretrained(base_dir), chunk_size=8)
    with torch.no_grad():
        base_logprobs, _ = base.eval()(*batch)
        policy_logprobs, _ = policy(*batch)
    facts["reference_vs_base"] = float((ref_logprobs - base_logprobs).abs().max())
    facts["policy_vs_base"] = float((policy_logprobs - base_logprobs).abs().max())
    print("PHASE reference ok", flush=True)


def phase_rollout(policy, unsharded, base_dir, facts, rank):
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(100 + rank)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 7, 5)]
    params = SamplingParams(max_new_tokens=10, temperature=0.9)
    lm = policy.module.lm
    outs = {"full": HybridRollout(lm, PAD, gather="full").generate(prompts, 2, params, 7),
            "layers": HybridRollout(lm, PAD, gather="layers", layers_per_group=1
                                    ).generate(prompts, 2, params, 7),
            "peft": HybridRollout(unsharded, PAD).generate(prompts, 2, params, 7),
            "base": HybridRollout(AutoModelForCausalLM.from_pretrained(base_dir), PAD
                                  ).generate(prompts, 2, params, 7)}
    ref = outs["peft"]
    for name in ("full", "layers"):
        facts[f"rollout_{name}_tokens_equal"] = bool(torch.equal(outs[name].completion_ids,
                                                                 ref.completion_ids))
        facts[f"rollout_{name}_logprob_diff"] = float(
            (outs[name].sampled_logprobs - ref.sampled_logprobs).abs().max())
    same = torch.equal(outs["base"].completion_ids, ref.completion_ids)
    facts["rollout_peft_vs_base_logprob_diff"] = float(
        (outs["base"].sampled_logprobs - ref.sampled_logprobs).abs().max()) if same else None
    facts["rollout_peft_tokens_differ_from_base"] = not same
    print("PHASE rollout ok", flush=True)


def adapter_values(policy):
    return gathered([p for _, p in adapter_parameters(policy.module.lm)])


def phase_resume(policy, cfg, ds, base_dir, out, batch, facts):
    log = print if dist.get_rank() == 0 else (lambda *_: None)
    checkpointer = Checkpointer(policy, out / "ckpt", keep_last=2, source=object(), log=log)
    path = checkpointer.save(RunState(step=1, model_path=str(base_dir), world_size=2))
    states = torch.load(next(path.glob("*model_states.pt")), weights_only=False)
    facts["checkpoint_module_keys"] = len(states["module"])
    facts["checkpoint_module_all_lora"] = all("lora_" in k for k in states["module"])
    train_step(policy, batch)
    after = adapter_values(policy)
    fresh, _, _ = build(base_dir, cfg, ds, seed=1234)  # another A init: the load must replace it
    before_load = adapter_values(fresh)
    facts["fresh_init_differs"] = any(not torch.equal(a, b) for a, b in zip(after, before_load))
    Checkpointer(fresh, out / "ckpt", keep_last=2, source=object(), log=log).load(
        path, RunState(step=1, model_path=str(base_dir), world_size=2))
    train_step(fresh, batch)
    resumed = adapter_values(fresh)
    facts["resume_max_diff"] = max(float((a - b).abs().max()) for a, b in zip(after, resumed))
    print("PHASE resume ok", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    init_distributed()
    rank = dist.get_rank()
    cfg, ds = make_cfg()
    base_dir = out / "base"
    if rank == 0:
        save_causal_lm(base_dir, text_tokenizer())
    dist.barrier()
    policy, peft_model, tokenizer = build(base_dir, cfg, ds, cfg.train.seed)
    print("PHASE build ok", flush=True)
    facts = {}
    batch = fixed_batch(tokenizer)
    phase_build_and_step(policy, facts, batch)
    phase_reference(policy, peft_model, base_dir, batch, facts)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_adapter(policy, peft_model, tokenizer, out / "adapter", torch.float32)
    unsharded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                          out / "adapter").eval()
    print("PHASE adapter ok", flush=True)
    phase_rollout(policy, unsharded.get_base_model(), base_dir, facts, rank)

    save_adapter_and_merged(policy, peft_model, tokenizer, out / "run", "float32")
    merged = AutoModelForCausalLM.from_pretrained(out / "run" / "model").eval()
    input_ids, mask, _ = batch
    with torch.no_grad():
        want = unsharded.merge_and_unload()(input_ids=input_ids, attention_mask=mask).logits
        got = merged(input_ids=input_ids, attention_mask=mask).logits
    facts["merged_logit_diff"] = float((want - got).abs().max())
    print("PHASE merged ok", flush=True)
    phase_resume(policy, cfg, ds, base_dir, out, batch, facts)
    if rank == 0:
        (out / "facts.json").write_text(json.dumps(facts, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
    finish_rank(0)
