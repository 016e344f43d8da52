"""Typed training configuration: YAML plus `--section.key=value` overrides, validated once.

The face of the config layer; every caller imports through here:
    config_schema.py     the sections and fields (typed dataclasses, a docstring per field)
    config_load.py       YAML and overrides -> Config, coerced to the fields' types
    config_validate.py   validate(cfg, world) before any rank starts; the batch arithmetic
    config_deepspeed.py  the DeepSpeed preset filled from the config
"""

from grpo_ds.config_deepspeed import deepspeed_config, load_ds_preset, resolve_path
from grpo_ds.config_error import ConfigError
from grpo_ds.config_load import load_config
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
    CheckpointConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    GRPOConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RewardsConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
    WarmupConfig,
)
from grpo_ds.config_validate import batch_plan, validate

__all__ = [
    "ATTN_CHOICES", "DTYPE_CHOICES", "FUSED_LAYER_CHOICES", "HOST_ALLOCATORS",
    "ONEDNN_LINEAR_CHOICES", "OPTIMIZER_CHOICES", "PACKED_WEIGHT_CHOICES", "ROLLOUT_BACKENDS",
    "BatchPlan", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig",
    "GRPOConfig", "LoraConfig", "ModelConfig", "OutputConfig", "RewardsConfig", "RolloutConfig",
    "TaskConfig", "TrainConfig", "WarmupConfig", "batch_plan", "deepspeed_config",
    "load_config", "load_ds_preset", "resolve_path", "validate",
]
