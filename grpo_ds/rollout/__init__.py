"""Hybrid generation engine: G samples per prompt from the live (ZeRO-3) policy.

    from grpo_ds.rollout import SamplingParams, RolloutOutput, HybridRollout
    rollout = HybridRollout(policy_engine.module, pad_token_id=tok.pad_token_id)
    out = rollout.generate(prompt_ids, group_size=G, params=SamplingParams(max_new_tokens=256,
                           stop_token_ids=(tok.eos_token_id,)), seed=seed)

Files: backend.py (contract), sampling.py (pure sampling math), gather.py (mode switch, ZeRO-3
gathers), forward.py (full / layer-group forwards), cache.py and attention.py (in-place KV cache,
prompt KV shared by the G samples), decode.py (the loop), stops.py, engine.py (HybridRollout),
ds_hybrid.py (adapter for DeepSpeed's HybridEngineRollout).
"""

from grpo_ds.rollout.backend import RolloutBackend, RolloutOutput, SamplingParams
from grpo_ds.rollout.ds_hybrid import DeepSpeedHybridBackend
from grpo_ds.rollout.engine import HybridRollout
from grpo_ds.rollout.sampling import logprob_gap

__all__ = ["DeepSpeedHybridBackend", "HybridRollout", "RolloutBackend", "RolloutOutput",
           "SamplingParams", "logprob_gap"]
