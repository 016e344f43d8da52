"""`rollout.backend` picks the generation engine; the hooks a colocated engine needs (sync the
weights, sleep, wake) are called around every rollout, in order, and only when needed."""

from types import SimpleNamespace

import pytest
import torch

from grpo_ds.config import ConfigError, load_config, validate
from grpo_ds.rollout import HybridRollout, RolloutBackend, SamplingParams
from grpo_ds.rollout.select import ColocatedRollout, build_rollout
from tests.test_rollout_engine import PAD, prompts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder:
    """Wraps a real backend and records the calls the trainer's rollout makes on it."""

    def __init__(self, backend, fail: bool = False):
        self.backend, self.fail, self.calls = backend, fail, []

    def generate(self, prompt_ids, group_size, params, seed):
        self.calls.append("generate")
        if self.fail:
            raise RuntimeError("engine died")
        return self.backend.generate(prompt_ids, group_size, params, seed)

    def sync_weights(self, policy):
        self.calls.append(f"sync@{policy.global_steps}")

    def sleep(self):
        self.calls.append("sleep")

    def wake(self):
        self.calls.append("wake")


def test_hooks_wrap_every_rollout_and_sync_only_after_an_optimizer_step():
    policy = SimpleNamespace(global_steps=0)
    recorder = Recorder(HybridRollout(tiny_llama(), PAD))
    rollout = ColocatedRollout(recorder, policy)
    params = SamplingParams(max_new_tokens=3)
    rollout.generate(prompts(), 2, params, seed=0)
    rollout.generate(prompts(), 2, params, seed=1)  # an evaluation: same weights, no sync
    policy.global_steps = 1  # the update stepped the optimizer
    out = rollout.generate(prompts(), 2, params, seed=2)
    assert recorder.calls == ["wake", "sync@0", "generate", "sleep",
                              "wake", "generate", "sleep",
                              "wake", "sync@1", "generate", "sleep"]
    assert out.completion_ids.shape[0] == 3 * 2


def test_the_engine_sleeps_even_when_generation_fails():
    recorder = Recorder(HybridRollout(tiny_llama(), PAD), fail=True)
    rollout = ColocatedRollout(recorder, SimpleNamespace(global_steps=0))
    with pytest.raises(RuntimeError, match="engine died"):
        rollout.generate(prompts(), 2, SamplingParams(max_new_tokens=3), seed=0)
    assert recorder.calls == ["wake", "sync@0", "generate", "sleep"]


def test_hybrid_backend_is_built_from_the_config_and_generates():
    cfg = load_config(None, ["--rollout.backend=hybrid", "--rollout.gather=full",
                             "--rollout.packed_weights=off"])
    policy = SimpleNamespace(module=SimpleNamespace(lm=tiny_llama()), global_steps=0,
                             device=torch.device("cpu"))  # as a DeepSpeed engine has
    rollout = build_rollout(cfg, policy, SimpleNamespace(pad_token_id=PAD))
    assert isinstance(rollout.backend, HybridRollout)
    assert isinstance(rollout, RolloutBackend) and isinstance(rollout.backend, RolloutBackend)
    assert rollout.backend.gather == "full" and not rollout.backend.pack
    out = rollout.generate(prompts(), 2, SamplingParams(max_new_tokens=4), seed=0)
    reference = HybridRollout(policy.module.lm, PAD).generate(
        prompts(), 2, SamplingParams(max_new_tokens=4), seed=0)
    assert torch.equal(out.completion_ids, reference.completion_ids)  # the hooks change nothing


def test_an_unknown_backend_is_a_config_error_naming_field_and_value():
    cfg = load_config(None, ["--rollout.backend=vllm"])
    with pytest.raises(ConfigError, match=r"rollout.backend='vllm': must be one of hybrid"):
        validate(cfg, 2)


def test_grpo_ds_train_refuses_an_unknown_backend_before_launch(monkeypatch, capsys):
    from deepspeed.accelerator import get_accelerator

    from grpo_ds import cli

    get_accelerator()  # detected (it runs a subprocess) before Popen is replaced
    started = []
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: started.append(a))
    assert cli.main(["train", "--rollout.backend=vllm"]) == 2
    assert not started
    assert "config error: rollout.backend='vllm'" in capsys.readouterr().err
