"""`grpo-ds export CHECKPOINT OUT_DIR [--dtype bfloat16|float32] [--merge]`: a checkpoint -> Hugging Face model.

CHECKPOINT is a step directory (`runs/x/checkpoints/step_000010`), a checkpoints directory or a
run directory (both follow `latest`). The ZeRO-3 shards are consolidated on this machine's CPU by
DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` (no ranks, no GPU; it needs RAM for the
fp32 weights, 4 bytes per parameter). The `lm.` prefix of the module DeepSpeed trained
(`CausalLMWithLogprobs.lm`) is stripped; the config and tokenizer come from the model the run
started from, which the checkpoint records. The result loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)`, without DeepSpeed. The shards are unpickled
with torch's weights-only loader and an allow-list (grpo_ds/safe_load.py): a crafted file is
refused, never run.

A LoRA run (model.lora) checkpoints the adapters only: OUT_DIR is then a PEFT adapter directory
(`PeftModel.from_pretrained(base, OUT_DIR)`), or with `--merge` the base with the adapters merged
(grpo_ds/lora_export.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from grpo_ds.checkpoint import CheckpointError, find_checkpoint, read_state
from grpo_ds.model import DTYPES
from grpo_ds.safe_load import UnsafeCheckpointError, safe_checkpoint_loading

PREFIX = "lm."


def consolidated_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the HF model inside a ZeRO checkpoint, named as HF names them."""
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str, tag: str) -> dict:
    """DeepSpeed's consolidation of the ZeRO shards (CPU, no ranks); imported when called.
    zero_to_fp32 unpickles with weights_only=False: here it reads weights-only (safe_load.py)."""
    from deepspeed.utils import zero_to_fp32

    with safe_checkpoint_loading():
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
           base: str | Path | None = None, merge: bool = False) -> Path:
    """Write `out_dir` (safetensors, config, tokenizer) from a checkpoint; returns the step dir.
    A LoRA run's checkpoint gives a PEFT adapter directory, or with `merge` a merged model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = find_checkpoint(checkpoint)
    state = read_state(path)
    base = Path(base or state.model_path)
    if not (base / "config.json").is_file():
        raise CheckpointError(f"the run started from {base}, which holds no config.json: pass "
                              "--base DIR, a HF directory of the same architecture and tokenizer")
    if state.adapter_config is not None:  # a LoRA run: the checkpoint holds the adapters only
        from grpo_ds.lora_export import export_lora

        raw = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        export_lora(raw, state.adapter_config, base, out_dir, DTYPES[dtype], merge)
        return path
    if merge:
        raise CheckpointError(f"--merge: {path} is a full fine-tuning checkpoint (no LoRA "
                              "adapters to merge); export it without --merge")
    weights = consolidated_weights(path)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # strict: a missing or unexpected name means the checkpoint is not this architecture.
    model.load_state_dict(weights, strict=True, assign=True)
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-ds export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step dir, checkpoints dir or run dir (follows latest)")
    parser.add_argument("out_dir", help="Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the written weights (default bfloat16)")
    parser.add_argument("--base", default=None,
                        help="config + tokenizer source (default: the model the run started from)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA runs: write the base with the adapters merged in (a plain HF "
                        "model) instead of a PEFT adapter directory")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out_dir, args.dtype, args.base, args.merge)
    except (CheckpointError, UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"grpo-ds export: {err}", file=sys.stderr)
        return 2
    print(f"exported {path} -> {args.out_dir} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
