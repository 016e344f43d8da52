"""What the GPU check's tests share: where they run, the model they train, its settings, results.

MODE is "cuda" where torch sees a CUDA GPU. GRPO_DS_GPU_CHECK_CPU=1 makes it "cpu": the same
tests on the CPU with a much smaller model, so that this code is exercised where there is no GPU
(by hand, not in CI: minutes on a small machine). Otherwise MODE is None and every module of
tests/gpu skips when it is collected.

The model has Qwen2.5-0.5B's shapes (494M parameters, vocabulary 151,936, tied embeddings, q/k/v
biases) with random weights, saved with a character-level tokenizer whose other ids are filler
tokens: nothing is downloaded. Figures go to gpu_results.json in results_dir(), one section per
test, written before the test asserts, so they come back even when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.tiny_models import text_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "data" / "gsm8k_sample.jsonl"
CONFIG = REPO / "grpo_ds" / "configs" / "gsm8k.yaml"
# Completion length in characters / 8: varies within every group (filler tokens decode to
# strings of different lengths), so every step has non-zero advantages and a real gradient.
REWARD = REPO / "tests" / "scripts" / "ckpt_reward.py"


def detect_mode() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("GRPO_DS_GPU_CHECK_CPU") == "1" else None


MODE = detect_mode()
SKIP_REASON = "the GPU check needs a CUDA GPU (GRPO_DS_GPU_CHECK_CPU=1 runs it on the CPU)"

# Qwen2.5-0.5B's config.json, less its rope scaling and sliding-window fields (both unused).
QWEN25_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
              "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True}
SMALL = {**QWEN25_05B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 1024}
# One rank's GRPO step: prompts x G sequences of <= prompt + new tokens.
WORKLOAD = {"cuda": {"prompts": 8, "group": 8, "new_tokens": 128, "micro": 16, "prompt_len": 256},
            "cpu": {"prompts": 2, "group": 4, "new_tokens": 8, "micro": 8, "prompt_len": 48}}


def save_qwen2(path: Path) -> Path:
    """A random Qwen2 of the mode's shapes, in bfloat16, with its tokenizer, at `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shapes = QWEN25_05B if MODE == "cuda" else SMALL
    config = Qwen2Config(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    text_tokenizer(shapes["vocab_size"]).save_pretrained(path)
    return path


def train_overrides(model: Path, run_dir: Path) -> list[str]:
    """The GRPO run's settings after grpo_ds/configs/gsm8k.yaml, all but train.steps."""
    w = WORKLOAD[MODE]
    return [f"--model.path={model}", "--model.dtype=bfloat16", f"--data.train_path={SAMPLE}",
            f"--data.max_prompt_length={w['prompt_len']}", f"--rewards.functions=[{REWARD}:length_reward]",
            "--rewards.weights=[1.0]", f"--rollout.group_size={w['group']}",
            f"--rollout.max_new_tokens={w['new_tokens']}",
            f"--train.prompts_per_step={w['prompts']}", f"--train.micro_batch_size={w['micro']}",
            "--train.lr=1e-5", "--train.eval_every=0", "--grpo.beta=0.04",
            "--deepspeed.reference_placement=cpu_offload", "--deepspeed.num_gpus=1",
            "--checkpoint.save_every=0", "--output.log_samples_every=0",
            f"--output.run_dir={run_dir}"] + CPU_ONLY[MODE]


# The CPU rollout's packed oneDNN weights crash on a Qwen2's q/k/v biases ("could not create a
# primitive descriptor", issue 19 deliverable 2): the CPU mode runs around it until that is fixed.
CPU_ONLY = {"cuda": [], "cpu": ["--rollout.packed_weights=off"]}


def run(command: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` from the repo root, output captured; fails the test with its tail if it fails.

    The interpreter's own bin/ leads PATH, so `grpo-ds train` finds the `deepspeed` launcher
    installed beside it even when that virtual environment is not activated."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, (f"exit {proc.returncode}: {' '.join(command[:6])} ...\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "grpo_ds.cli", *args]


def step_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows of GRPO steps (those with a loss), in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def results_dir() -> Path:
    """$GRPO_DS_GPU_RESULTS, else $OUT (the device machine's folder that comes back), else
    runs/gpu_check under the repo (ignored by git)."""
    folder = os.environ.get("GRPO_DS_GPU_RESULTS") or os.environ.get("OUT")
    path = Path(folder) if folder else REPO / "runs" / "gpu_check"
    path.mkdir(parents=True, exist_ok=True)
    return path


def record(section: str, figures: dict) -> None:
    """Merge {section: figures} into results_dir()/gpu_results.json, with the mode and device."""
    path = results_dir() / "gpu_results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["mode"] = MODE
    results["device"] = torch.cuda.get_device_name(0) if MODE == "cuda" else "cpu"
    results[section] = figures
    path.write_text(json.dumps(results, indent=1))
