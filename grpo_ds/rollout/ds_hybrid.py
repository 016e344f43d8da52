"""Adapter: DeepSpeed's `deepspeed.runtime.rollout.HybridEngineRollout` as a RolloutBackend.

DeepSpeed's rollout runs `engine.module.generate` (its injected CUDA kernels for the
architectures it supports; HF generate otherwise). Facts that shape this adapter (read from
deepspeed 0.19.8, hybrid_engine_rollout.py):
- it always decodes max_new_tokens (EOS is ignored so ZeRO-3 ranks stay in lockstep) and pads
  after the first EOS afterwards; we re-mask after the first of `stop_token_ids`;
- it reports no log-probs: `sampled_logprobs` is None, the trainer must compute pi_old itself;
- it samples with torch's global RNG, so we seed that with `seed`;
- stop strings, min_new_tokens and repetition_penalty are not supported (a clear error);
  ignore_eos needs nothing: stop_token_ids=() already decodes every position.
`engine` must be a DeepSpeed engine (ideally built with "hybrid_engine": {"enabled": true}).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from grpo_ds.rollout.backend import (
    ReadsLiveWeights,
    RolloutOutput,
    SamplingParams,
    left_pad,
    mask_through_first_stop,
)


class DeepSpeedHybridBackend(ReadsLiveWeights):
    def __init__(self, engine, tokenizer):
        from deepspeed.runtime.rollout import HybridEngineRollout

        if tokenizer.pad_token_id is None:
            raise ValueError("DeepSpeedHybridBackend needs a tokenizer with pad_token_id")
        self.engine, self.tokenizer = engine, tokenizer
        self.rollout = HybridEngineRollout(engine=engine, tokenizer=tokenizer)

    def generate(self, prompt_ids: Sequence[Sequence[int]], group_size: int,
                 params: SamplingParams, seed: int) -> RolloutOutput:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.rollout import RolloutRequest, SamplingConfig

        if params.stop_strings or params.min_new_tokens or params.repetition_penalty != 1.0:
            raise NotImplementedError(
                "DeepSpeed's HybridEngineRollout has no stop strings, min_new_tokens or "
                f"repetition_penalty (got {params.stop_strings}, {params.min_new_tokens}, "
                f"{params.repetition_penalty}); use our HybridRollout")
        pad = self.tokenizer.pad_token_id
        device = torch.device(get_accelerator().current_device_name())
        ids, mask = left_pad(prompt_ids, pad, device)
        sampling = SamplingConfig(max_new_tokens=params.max_new_tokens,
                                  temperature=params.temperature, top_p=params.top_p,
                                  top_k=params.top_k if params.top_k > 0 else -1,
                                  n_samples_per_prompt=group_size)
        torch.manual_seed(seed)
        start = time.perf_counter()
        was_training = self.engine.training
        self.engine.eval()
        try:
            batch = self.rollout.generate(RolloutRequest(ids, mask), sampling)
        finally:
            self.engine.train(was_training)
        seconds = time.perf_counter() - start
        prompt_len = ids.shape[1]
        completion = batch.input_ids[:, prompt_len:]
        # every position was decoded (EOS is ignored), so only our stop ids end a completion
        completion_mask, stopped = mask_through_first_stop(completion, params.stop_token_ids)
        completion = completion.masked_fill(completion_mask == 0, pad)
        tokens = int(completion_mask.sum())
        return RolloutOutput(
            prompt_ids=ids.repeat_interleave(group_size, 0),
            prompt_mask=mask.repeat_interleave(group_size, 0),
            completion_ids=completion, completion_mask=completion_mask,
            sampled_logprobs=None, truncated=~stopped,
            metrics={"tokens": tokens, "seconds": seconds,
                     "tokens_per_second": tokens / max(seconds, 1e-9),
                     "decoded_tokens": int(completion.numel()),
                     "gather_mode": "deepspeed hybrid engine"})
