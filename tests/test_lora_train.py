"""`grpo-ds train --model.lora.rank=4` end to end on 2 ranks (warm-up, two GRPO steps with
beta > 0, checkpoints, the final save), then `grpo-ds export` of its checkpoint with and without
--merge. About a minute and a half on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "grpo_ds.cli", *args], check=False, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.multirank
def test_lora_run_checkpoints_saves_and_exports(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    proc = cli("train", f"--output.run_dir={run}", "--train.steps=2", "--train.lr=0.01",
               "--train.prompts_per_step=4", "--rollout.group_size=4",
               "--train.micro_batch_size=8", "--rollout.max_new_tokens=6",
               "--task.eval_size=16", "--train.eval_every=0", "--warmup.max_steps=4",
               "--warmup.eval_every=2", "--warmup.batch_size=16", "--grpo.beta=0.1",
               "--checkpoint.save_every=1", "--model.lora.rank=4", "--model.lora.alpha=8",
               "--deepspeed.config=ds_configs/zero3_lora_offload.json",  # the LoRA preset
               # a length term: every group has distinct rewards, so step 1 moves the adapters
               "--rewards.functions=grpo_ds.tasks.arithmetic:exact_answer,"
               f"{REPO / 'tests' / 'scripts' / 'ckpt_reward.py'}:length_reward")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["kl"] >= 0 for m in steps) and steps[1]["kl"] > 0  # the base as reference
    state = json.loads((run / "checkpoints" / "step_000002" / "grpo_state.json").read_text())
    assert state["adapter_config"]["r"] == 4 and state["adapter_config"]["peft_type"] == "LORA"

    base = AutoModelForCausalLM.from_pretrained(state["model_path"])
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        base_logits = base(ids).logits
        trained = PeftModel.from_pretrained(base, run / "adapter")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "model")(ids).logits
    assert (trained - base_logits).abs().max() > 1e-4  # the adapters trained
    assert (merged - trained).abs().max() < 1e-4  # RUN/model is the base with them merged

    # export of the last checkpoint: the adapter dir, and the merged model, match the run's own
    assert cli("export", str(run), str(tmp_path / "adapter"), "--dtype=float32").returncode == 0
    assert cli("export", str(run), str(tmp_path / "merged"), "--dtype=float32",
               "--merge").returncode == 0
    base = AutoModelForCausalLM.from_pretrained(state["model_path"])
    with torch.no_grad():
        exported = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
        merged_export = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    assert (exported - trained).abs().max() < 1e-5
    assert (merged_export - trained).abs().max() < 1e-4
