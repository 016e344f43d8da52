"""Checks of `model.lora` that run before any rank starts (no torch, no peft imported here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from grpo_ds.config_error import ConfigError

if TYPE_CHECKING:  # config.validate calls these checks: no import back at run time
    from grpo_ds.config import Config

# The log-prob head and the embeddings are called outside the decoder layers (logprobs.py, the
# rollout's layer path); adapters there are untested, so they are refused, not silently run.
UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens")


def lora_enabled(cfg: Config) -> bool:
    """Whether the run trains LoRA adapters (a rank, or an adapter to start from)."""
    return bool(cfg.model.lora.rank) or bool(cfg.model.lora.adapter_path)


def validate_lora(cfg: Config) -> None:
    """Raise ConfigError naming the `model.lora.*` field and value that cannot run."""
    lora = cfg.model.lora
    if lora.rank is not None and lora.rank < 0:
        raise ConfigError(f"model.lora.rank={lora.rank}: must be >= 0 (0 or null = LoRA off)")
    if not lora_enabled(cfg):
        return
    if not lora.alpha > 0:
        raise ConfigError(f"model.lora.alpha={lora.alpha}: must be > 0")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout}: must be in [0, 1)")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules: empty; name modules (q_proj,v_proj) or "
                          "all-linear")
    if "all-linear" in lora.target_modules and len(lora.target_modules) > 1:
        raise ConfigError(f"model.lora.target_modules={lora.target_modules}: all-linear "
                          "stands alone")
    bad = [t for t in lora.target_modules if t in UNSUPPORTED_TARGETS]
    if bad:
        raise ConfigError(f"model.lora.target_modules={lora.target_modules}: {bad[0]} is not "
                          "supported (adapters go on the decoder layers' Linears)")
    if cfg.model.fused_layers == "on":
        raise ConfigError("model.fused_layers='on' with model.lora: the fused decoder layers "
                          "read the Linears' weights directly and would skip the adapters; "
                          "use auto (off with LoRA) or off")
    if lora.adapter_path:
        check_adapter_dir(lora.adapter_path)


def check_adapter_dir(path: str) -> dict:
    """The adapter_config.json of a PEFT LoRA directory; ConfigError when it is not one. Only
    safetensors weights are accepted: a pickled adapter_model.bin can run code when loaded."""
    where = f"model.lora.adapter_path={path!r}"
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"{where}: no adapter_config.json there (a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: adapter_config.json is not valid JSON: {err}") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where}: peft_type={config.get('peft_type')!r}, expected 'LORA'")
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{where}: no adapter_model.safetensors (a pickled adapter_model.bin "
                          "is refused: loading it could run code)")
    return config
