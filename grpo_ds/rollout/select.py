"""Which RolloutBackend generates the trainer's completions (`rollout.backend`), and the hooks a
colocated engine needs called around each rollout (backend.RolloutBackend says what they do).

Backends by name (config.ROLLOUT_BACKENDS; an unknown name is a config error before launch):
- "hybrid": HybridRollout, our engine over the live ZeRO-3 policy (rollout/engine.py).
DeepSpeed's HybridEngineRollout (ds_hybrid.DeepSpeedHybridBackend) is a RolloutBackend too, but
not selectable for training: it calls `engine.module.generate`, and the policy engine's module
is our log-prob wrapper around the HF model (model.CausalLMWithLogprobs); it needs
`hybrid_engine` enabled in the DeepSpeed config, and it reports no sampled log-probs. It runs in
`grpo-ds bench generation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

from grpo_ds.config import Config, ConfigError
from grpo_ds.rollout.backend import RolloutBackend, RolloutOutput, SamplingParams
from grpo_ds.rollout.engine import HybridRollout


class ColocatedRollout:
    """A backend with its hooks called around every generate: wake, sync the weights if the
    policy has taken an optimizer step since the last sync, generate, sleep (even on error).

    `policy`: the DeepSpeed engine being trained (its `global_steps` counts optimizer steps).
    """

    def __init__(self, backend: RolloutBackend, policy):
        self.backend, self.policy = backend, policy
        self.synced_step: int | None = None  # the policy's global_steps at the last sync

    def generate(self, prompt_ids: Sequence[Sequence[int]], group_size: int,
                 params: SamplingParams, seed: int) -> RolloutOutput:
        self.backend.wake()
        try:
            self._sync()
            return self.backend.generate(prompt_ids, group_size, params, seed)
        finally:
            self.backend.sleep()

    def _sync(self) -> None:
        if self.policy.global_steps != self.synced_step:
            self.backend.sync_weights(self.policy)
            self.synced_step = self.policy.global_steps

    def kv_extension_unsupported(self, rows: int, group_size: int, capacity: int) -> str | None:
        ask = getattr(self.backend, "kv_extension_unsupported", None)
        if ask is None:
            return f"{type(self.backend).__name__} has no multi-turn session"
        return ask(rows, group_size, capacity)

    @contextmanager
    def turns(self, rows_hint: int):
        """The backend's multi-turn session, with the hooks around it as around generate."""
        self.backend.wake()
        try:
            self._sync()
            with self.backend.turns(rows_hint) as session:
                yield session
        finally:
            self.backend.sleep()

    def sync_weights(self, policy) -> None:
        self.backend.sync_weights(policy)

    def sleep(self) -> None:
        self.backend.sleep()

    def wake(self) -> None:
        self.backend.wake()


def build_rollout(cfg: Config, policy, tokenizer):
    """The configured backend over the policy engine, hooks included."""
    r = cfg.rollout
    if r.backend == "hybrid":
        budget = None if r.memory_budget_gb is None else int(r.memory_budget_gb * 2**30)
        backend = HybridRollout(policy.module.lm, pad_token_id=tokenizer.pad_token_id,
                                gather=r.gather, tokenizer=tokenizer,
                                packed_weights=r.packed_weights, memory_budget_bytes=budget,
                                max_batch_rows=r.max_batch_rows)
    else:  # validate() refuses it before launch; this guards callers that skip it
        raise ConfigError(f"rollout.backend={r.backend!r}: no such backend")
    from grpo_ds.agents.build import build_multiturn

    # multi-turn (cfg.multiturn or a tool task): episodes of model and environment turns
    return build_multiturn(cfg, ColocatedRollout(backend, policy), tokenizer, policy.device)
