"""`grpo-ds export` for a LoRA run: the checkpoint's adapters as a PEFT adapter directory, or,
with `--merge`, merged into the base as a plain Hugging Face model.

A LoRA checkpoint holds the adapters and their optimizer state only (the frozen base is the model
the run started from, `RunState.model_path`), so the consolidated fp32 weights are A and B, named
as the engine's module names them (`lm.model.layers.0.self_attn.q_proj.lora_A.default.weight`).
PEFT saves them as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from grpo_ds.checkpoint import CheckpointError

ENGINE_PREFIX = "lm."  # CausalLMWithLogprobs.lm
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model


def peft_names(weights: dict[str, torch.Tensor], adapter: str = "default") -> dict:
    """Engine names -> PEFT's saved names (the adapter name dropped); any non-adapter weight
    means the checkpoint is not a LoRA one."""
    out = {}
    for key, value in weights.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise CheckpointError(f"{key}: a trained weight that is not a LoRA adapter's; this "
                                  "checkpoint is not a LoRA run's")
        out[PEFT_PREFIX + key.removeprefix(ENGINE_PREFIX).replace(f".{adapter}.", ".")] = value
    return out


def write_adapter(weights: dict, adapter_config: dict, base: Path, out_dir: Path,
                  dtype: torch.dtype) -> None:
    """A PEFT adapter directory: adapter_config.json, adapter_model.safetensors, tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(adapter_config, base_model_name_or_path=str(base), inference_mode=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.to(dtype).contiguous() for k, v in peft_names(weights).items()},
              str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)


def export_lora(weights: dict, adapter_config: dict, base: Path, out_dir: str | Path,
                dtype: torch.dtype, merge: bool) -> None:
    """Write the adapter to `out_dir`; with `merge`, the base with the adapter merged in."""
    out_dir = Path(out_dir)
    if not merge:
        write_adapter(weights, adapter_config, base, out_dir, dtype)
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(weights, adapter_config, base, Path(tmp), torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, tmp).merge_and_unload()  # W + (a/r) B A
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
