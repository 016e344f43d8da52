"""A 2-rank GRPO run on GSM8K-format prompts with a tiny model, scored by the rule-based
`math_answer` and a reward model combined (issue 5), through the real `grpo-ds train` CLI."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.multirank import free_port
from tests.tiny_models import save_causal_lm, save_reward_model, text_tokenizer

pytestmark = pytest.mark.multirank
SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"


def test_gsm8k_run_with_rule_and_model_rewards(tmp_path):
    tokenizer = text_tokenizer()
    policy = save_causal_lm(tmp_path / "policy", tokenizer)
    scorer = save_reward_model(tmp_path / "scorer", tokenizer)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [shutil.which("grpo-ds"), "train", "grpo_ds/configs/gsm8k.yaml",
         f"--model.path={policy}", f"--data.train_path={SAMPLE}", f"--data.eval_path={SAMPLE}",
         "--model.dtype=float32", "--data.max_prompt_length=96",
         f"--rewards.functions=[math_answer, 'model:{scorer}']", "--rewards.weights=[1.0,0.5]",
         "--rollout.group_size=4", "--rollout.max_new_tokens=8", "--train.prompts_per_step=4",
         "--train.micro_batch_size=4", "--train.steps=2", "--train.eval_every=1",
         "--train.eval_pass_at_k=true", "--checkpoint.save_every=0",
         f"--output.run_dir={run_dir}", f"--deepspeed.master_port={free_port()}"],
        check=False, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        # Both reward functions scored every completion: the classifier's logits vary.
        assert s["rewards/math_answer/mean"] >= 0.0
        assert s["rewards/scorer/std"] > 0.0
    # Held-out pass@k over G = 4 samples per prompt, logged at the step-1 evaluation.
    passes = [steps[0][f"eval/pass@{k}"] for k in (1, 2, 4)]
    assert 0.0 <= passes[0] <= passes[1] <= passes[2] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
