"""The DeepSpeed config a run uses: its preset (`deepspeed.config`, shipped in
grpo_ds/ds_configs/) with the batch, precision, clipping and optimizer filled from the config."""

from __future__ import annotations

import json
from pathlib import Path

from grpo_ds.config_error import ConfigError
from grpo_ds.config_schema import BatchPlan, Config

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_path(path: str) -> Path:
    """A relative path is taken from the working directory, else from the package (the presets:
    `ds_configs/zero3.json` is grpo_ds/ds_configs/zero3.json, shipped with the package)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    for base in (REPO_ROOT, PACKAGE_CONFIGS.parent):
        if (base / path).exists():
            return base / path
    return candidate


def load_ds_preset(path: str) -> dict:
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config={path!r}: file not found")
    try:
        preset = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config={path!r}: not valid JSON: {err}") from None
    autos = [k for k, v in _flatten(preset) if v == "auto"]
    if autos:
        raise ConfigError(
            f"deepspeed.config={path!r}: 'auto' values are only resolved by the HF Trainer and "
            f"DeepSpeed drops them silently; set {', '.join(autos)} explicitly"
        )
    return preset


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def deepspeed_config(cfg: Config, plan: BatchPlan) -> dict:
    """The preset with the batch, precision, clipping and optimizer filled from the training config."""
    ds = load_ds_preset(cfg.deepspeed.config)
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.micro_batch_size * plan.grad_accum * plan.world_size
    if "auto" in (cfg.model.dtype, cfg.train.optimizer):
        raise ValueError("deepspeed_config needs a resolved config: pass it through "
                         "grpo_ds.device.resolve_config first (model.dtype, train.optimizer)")
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = ds["optimizer"].setdefault("params", {})
    params.update(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    params.setdefault("betas", [0.9, 0.999])
    # DeepSpeed builds "AdamW" as torch's with torch_adam, as DeepSpeedCPUAdam when the
    # optimizer is offloaded, and as FusedAdam otherwise (runtime/engine.py)
    if cfg.train.optimizer == "torch_adamw":
        params.setdefault("torch_adam", True)
    if cfg.train.lr_warmup_steps:
        ds["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.train.lr,
            "warmup_num_steps": cfg.train.lr_warmup_steps, "warmup_type": "linear"}}
    ds.setdefault("steps_per_print", 10**9)
    return ds
