"""LoRA on the real 2-rank ZeRO-3 engine (deepspeed launcher, CPU, gloo): one launch of
tests/scripts/lora_zero3.py (about a minute) runs every phase; the tests read its facts."""

import json
import os
import subprocess
import sys

import pytest

from tests.multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "lora_zero3.py")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_zero3")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT,
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400,
                              cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        phases = [l for l in (exc.stdout or b"").decode().splitlines() if "PHASE" in l]
        pytest.fail(f"2-rank LoRA script hung; completed phases: {phases}")
    if proc.returncode != 0 or not (out / "facts.json").exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        pytest.fail(f"2-rank LoRA script failed with exit code {proc.returncode}")
    return json.loads((out / "facts.json").read_text())


@pytest.mark.multirank
def test_only_adapters_train_and_only_they_have_optimizer_states(facts):
    assert facts["trainable_all_lora"] and facts["adapters_partitioned"]
    # rank 4 on 2 layers x 7 Linears of a 32-wide Llama: 4096 adapter elements
    assert facts["adapter_numel"] == 4096
    assert facts["optimizer_elements"] == facts["adapter_numel"] < facts["base_numel"]
    assert facts["base_unchanged"] and facts["lora_b_nonzero"]


@pytest.mark.multirank
def test_reference_is_the_base_model_with_adapters_off(facts):
    assert facts["reference_vs_base"] < 1e-6
    assert facts["policy_vs_base"] > 1e-3  # the adapters matter, so the check can fail
    assert facts["train_mode_after_reference"]


@pytest.mark.multirank
def test_rollout_samples_what_an_unsharded_peft_model_samples(facts):
    for name in ("full", "layers"):
        assert facts[f"rollout_{name}_tokens_equal"], name
        assert facts[f"rollout_{name}_logprob_diff"] < 1e-5, name
    # the adapters change what is sampled, or at least its log-probs
    assert (facts["rollout_peft_tokens_differ_from_base"]
            or facts["rollout_peft_vs_base_logprob_diff"] > 1e-4)


@pytest.mark.multirank
def test_merged_model_equals_peft_merge_and_unload(facts):
    assert facts["merged_logit_diff"] < 1e-5


@pytest.mark.multirank
def test_checkpoint_holds_adapters_only_and_resume_is_exact(facts):
    assert facts["checkpoint_module_keys"] == 28  # A and B of 14 Linears; no base weight
    assert facts["checkpoint_module_all_lora"]
    assert facts["fresh_init_differs"]
    assert facts["resume_max_diff"] == 0.0
