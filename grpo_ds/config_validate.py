"""Validation before any rank starts, and the batch arithmetic.

One GRPO step samples `prompts_per_step` prompts x `group_size` completions (the step's
sequences), split evenly over ranks and then into micro-batches of `micro_batch_size` sequences;
the quotient is DeepSpeed's gradient-accumulation count. `validate()` runs in the CLI before any
rank starts, so a bad value fails in seconds with the field and the value named.
"""

from __future__ import annotations

from pathlib import Path

from grpo_ds.agents.config import validate_multiturn
from grpo_ds.config_bounds import bounds_problem
from grpo_ds.config_deepspeed import load_ds_preset
from grpo_ds.config_error import ConfigError
from grpo_ds.config_schema import (
    ATTN_CHOICES,
    DTYPE_CHOICES,
    FUSED_LAYER_CHOICES,
    HOST_ALLOCATORS,
    ONEDNN_LINEAR_CHOICES,
    OPTIMIZER_CHOICES,
    PACKED_WEIGHT_CHOICES,
    ROLLOUT_BACKENDS,
    BatchPlan,
    Config,
    GRPOConfig,
)

CHOICES = {
    "model.dtype": DTYPE_CHOICES,
    "model.attn_implementation": ATTN_CHOICES,
    "train.optimizer": OPTIMIZER_CHOICES,
    "task.name": ("arithmetic", "tool_arithmetic", "dataset"),
    "data.overlong_prompts": ("truncate", "drop"),
    "rewards.on_error": ("raise", "skip"),
    "rollout.backend": ROLLOUT_BACKENDS,
    "rollout.gather": ("auto", "full", "layers"),
    "rollout.packed_weights": PACKED_WEIGHT_CHOICES,
    "grpo.kl_estimator": ("k1", "k2", "k3"),
    "grpo.loss_aggregation": ("grpo", "token_mean", "dr_grpo", "bnpo"),
    "grpo.policy_loss": ("clip", "cispo"),
    "grpo.ratio_level": ("token", "sequence", "sequence_token"),
    "grpo.importance_sampling": ("none", "token_truncate", "token_mask", "sequence_truncate",
                                 "sequence_mask"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.std": ("sample", "population"),
    "deepspeed.reference_placement": ("cpu_offload", "sharded", "none"),
    "deepspeed.host_allocator": HOST_ALLOCATORS,
    "model.fused_layers": FUSED_LAYER_CHOICES,
    "model.onednn_linears": ONEDNN_LINEAR_CHOICES,
}

POSITIVE = (
    "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature", "train.steps",
    "train.prompts_per_step", "train.micro_batch_size", "train.lr", "grpo.num_iterations",
    "train.logprob_chunk_size", "warmup.batch_size", "warmup.eval_every", "task.digits",
    "checkpoint.max_bad_steps",
)


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    prompts, group = cfg.train.prompts_per_step, cfg.rollout.group_size
    micro = cfg.train.micro_batch_size
    if prompts % world_size:
        raise ConfigError(
            f"train.prompts_per_step={prompts} does not divide over {world_size} ranks: "
            f"each rank samples whole groups, use a multiple of {world_size}"
        )
    per_rank = prompts // world_size * group
    if per_rank % micro:
        options = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        raise ConfigError(
            f"train.micro_batch_size={micro} does not divide the {per_rank} sequences each rank "
            f"gets per step (train.prompts_per_step={prompts} x rollout.group_size={group} "
            f"/ {world_size} ranks); valid values: {options}"
        )
    return BatchPlan(world_size, prompts // world_size, prompts * group, per_rank, micro,
                     per_rank // micro)


def validate(cfg: Config, world_size: int) -> BatchPlan:
    """Check every field once, before any rank starts. Raises ConfigError naming field and value."""
    _check_fields(cfg)
    _check_rollout(cfg)
    _check_grpo(cfg)
    _check_inputs(cfg)
    load_ds_preset(cfg.deepspeed.config)
    validate_multiturn(cfg.multiturn, ConfigError)
    from grpo_ds.lora_checks import validate_lora

    validate_lora(cfg)
    return batch_plan(cfg, world_size)


def _check_fields(cfg: Config) -> None:
    """Field by field: finite, in range, one of the choices, positive where it must be."""
    problem = bounds_problem(cfg)  # finite floats, ints in range: driven by the fields' types
    if problem:
        raise ConfigError(problem)
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r}: must be one of {', '.join(allowed)}")
    for dotted in POSITIVE:
        if not _get(cfg, dotted) > 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r}: must be > 0")
    for dotted in ("checkpoint.save_every", "checkpoint.keep_last"):
        if _get(cfg, dotted) < 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)}: must be >= 0")
    timeout = cfg.deepspeed.timeout_minutes
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"deepspeed.timeout_minutes={timeout!r}: must be > 0 (or null for "
                          "DeepSpeed's default)")
    if not 0 <= cfg.task.carry_drop <= 1:
        raise ConfigError(f"task.carry_drop={cfg.task.carry_drop}: must be in [0, 1]")
    if cfg.model.onednn_linears == "on" and cfg.model.dtype == "bfloat16":
        raise ConfigError(f"model.onednn_linears='on' needs model.dtype=float32 (got "
                          f"{cfg.model.dtype!r}): torch already runs bf16 matmuls on oneDNN")


def _check_rollout(cfg: Config) -> None:
    r = cfg.rollout
    if r.group_size < 2:
        raise ConfigError(
            f"rollout.group_size={r.group_size}: GRPO needs at least 2 samples per "
            "prompt (a group of one has advantage 0)"
        )
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p}: must be in (0, 1]")
    if r.top_k < 0:
        raise ConfigError(f"rollout.top_k={r.top_k}: must be >= 0")
    if r.max_batch_rows is not None and r.max_batch_rows < r.group_size:
        raise ConfigError(f"rollout.max_batch_rows={r.max_batch_rows}: must be at least "
                          f"rollout.group_size={r.group_size} (a generation pass holds whole "
                          "groups)")
    if not 0 <= r.min_new_tokens <= r.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens={r.min_new_tokens}: must be in "
                          f"[0, rollout.max_new_tokens={r.max_new_tokens}]")
    if not r.repetition_penalty > 0:
        raise ConfigError(f"rollout.repetition_penalty={r.repetition_penalty}: "
                          "must be > 0 (1.0 = off)")
    if any(not s for s in r.stop):
        raise ConfigError(f"rollout.stop={r.stop!r}: stop strings must not be empty")


def _check_grpo(cfg: Config) -> None:
    g = cfg.grpo
    if g.beta < 0:
        raise ConfigError(f"grpo.beta={g.beta}: must be >= 0")
    if g.epsilon_low < 0 or (g.epsilon_high or 0) < 0:
        raise ConfigError("grpo.epsilon_low / grpo.epsilon_high: must be >= 0")
    _validate_loss_variant(g)
    _validate_refill(g)
    if g.beta > 0 and cfg.deepspeed.reference_placement == "none":
        raise ConfigError(
            f"deepspeed.reference_placement='none' needs grpo.beta=0 (got {g.beta}): "
            "the KL term needs the reference model"
        )
    if g.process_reward and (g.kl_in_reward or g.filter_tied_groups):
        raise ConfigError("grpo.process_reward: cannot be combined with grpo.kl_in_reward or "
                          "grpo.filter_tied_groups (both act on outcome rewards)")


def _check_inputs(cfg: Config) -> None:
    """Rewards, the task or dataset, and the model directory."""
    weights = cfg.rewards.weights
    if weights is not None and len(weights) != len(cfg.rewards.functions):
        raise ConfigError(
            f"rewards.weights has {len(weights)} entries but rewards.functions has "
            f"{len(cfg.rewards.functions)}"
        )
    for spec in cfg.rewards.functions:
        if spec.startswith("model:"):
            from grpo_ds.rewards.model import check_classifier

            check_classifier(spec.removeprefix("model:"))
    if cfg.task.name == "dataset" and not cfg.data.train_path:
        raise ConfigError("data.train_path: required when task.name='dataset'")
    given = [f for f in ("data.train_path", "data.eval_path") if _get(cfg, f)]
    if cfg.task.name in ("arithmetic", "tool_arithmetic") and given:
        raise ConfigError(
            f"task.name={cfg.task.name!r} trains on the built-in synthetic task, which does not "
            f"read {' or '.join(given)}={_get(cfg, given[0])!r}: set task.name=dataset (or "
            "leave task.name unset, and data.train_path selects the dataset)")
    if cfg.model.path is not None and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r}: no config.json there (a local HF "
                          "model dir)")
    if cfg.task.name == "dataset" and cfg.model.path is None:
        raise ConfigError("model.path: required when task.name='dataset' (a local HF model dir)")


def _validate_refill(g: GRPOConfig) -> None:
    if g.refill_max_rounds and not g.filter_tied_groups:
        raise ConfigError(f"grpo.refill_max_rounds={g.refill_max_rounds}: refills the groups "
                          "grpo.filter_tied_groups drops; set grpo.filter_tied_groups=true")
    if g.refill_max_rounds and g.kl_in_reward:
        raise ConfigError(f"grpo.refill_max_rounds={g.refill_max_rounds}: cannot be combined "
                          "with grpo.kl_in_reward (the KL-penalised rewards the filter sees "
                          "almost never tie, so refill and filter would disagree on the groups)")


def _validate_loss_variant(g: GRPOConfig) -> None:
    if g.clip_ratio_c is not None and not g.clip_ratio_c > 1:
        raise ConfigError(f"grpo.clip_ratio_c={g.clip_ratio_c}: must be > 1 (it caps the ratio "
                          "for negative advantages; verl uses 3), or none")
    if g.clip_ratio_c is not None and g.policy_loss != "clip":
        raise ConfigError(f"grpo.clip_ratio_c={g.clip_ratio_c}: dual clip applies to "
                          f"grpo.policy_loss=clip only, got {g.policy_loss!r}")
    if not g.importance_sampling_cap >= 1:
        raise ConfigError(f"grpo.importance_sampling_cap={g.importance_sampling_cap}: must be >= 1")
