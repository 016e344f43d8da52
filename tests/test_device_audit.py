"""Device audit: every trainer path with the policy, the rollout and the reference on a second
device, while rewards are built on the CPU as they are in a real run.

On a GPU the policy and the rollout's tensors live on CUDA and reward functions return Python
numbers that become CPU tensors. This machine has no GPU, so `tests/second_device.py` makes the
`meta` device a data-holding stand-in for CUDA that raises CUDA's mixed-device error, and holds
collectives to NCCL's device-tensors-only rule.

The engines here are the real `CausalLMWithLogprobs` module, the real `HybridRollout` and the
real `RewardModel.__call__`, without DeepSpeed around them: DeepSpeed places an engine on its
accelerator (the CPU here) and cannot be put on a stand-in device. `DeviceEngine` gives the
module the engine methods the trainer calls. The same trainer code runs under the real ZeRO-3
engine in tests/test_multirank_grpo.py.
"""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from grpo_ds.config import load_config, validate
from grpo_ds.evaluate import evaluate
from grpo_ds.model import CausalLMWithLogprobs
from grpo_ds.rewards.model import RewardModel
from grpo_ds.rollout import HybridRollout
from grpo_ds.trainer import grpo_step
from tests.second_device import audited_collectives, on_device, second_device
from tests.tiny_models import llama_config, text_tokenizer

PROMPTS = [{"prompt": "12+7=", "answer": "19"}, {"prompt": "3+4=", "answer": "7"}]


def spread_reward(prompts, completions, **columns):
    """Differs between almost any two completions, so groups rarely tie; CPU floats as in a run."""
    return [(sum(map(ord, c)) % 7) / 6 for c in completions]


def tying_reward(prompts, completions, **columns):
    """The first prompt's group ties (all 1.0): the filter has a group to drop."""
    return [1.0 if p == PROMPTS[0]["prompt"] else spread_reward([p], [c])[0]
            for p, c in zip(prompts, completions)]


def process_steps(prompts, completions, **columns):
    """Process supervision: two steps per completion, ending at tokens 1 and 3."""
    return [[(1, (len(c) % 3) / 2), (3, (sum(map(ord, c)) % 5) / 4)] for c in completions]


class DeviceEngine:
    """The DeepSpeed engine methods the trainer calls, over a module on the stand-in device:
    one optimizer step per `accumulation` micro-batches, as DeepSpeed's engine.step does."""

    def __init__(self, module: CausalLMWithLogprobs, accumulation: int = 1, lr: float = 1e-2):
        self.module, self.device, self.accumulation = module, module.lm.lm_head.weight.device, accumulation
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr) if lr else None
        self.skipped_steps, self.micro_steps, self.grad_norm, self.monitor = 0, 0, None, None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            self.grad_norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return self.grad_norm

    def get_lr(self):
        return [self.optimizer.param_groups[0]["lr"]]


class DeviceClassifier(torch.nn.Module):
    """A sequence classifier called as RewardModel calls its engine, with the engine's `device`."""

    def __init__(self, model):
        super().__init__()
        self.model, self.device = model, model.score.weight.device

    def forward(self, **inputs):
        return self.model(**inputs)


PATHS = {
    "grpo_k3": [],
    "token_mean": ["--grpo.loss_aggregation=token_mean"],
    "dr_grpo": ["--grpo.loss_aggregation=dr_grpo"],
    "k1": ["--grpo.kl_estimator=k1"],
    "k2": ["--grpo.kl_estimator=k2"],
    "kl_in_reward": ["--grpo.kl_in_reward=true", "--grpo.kl_estimator=k1"],
    "process_supervision": ["--grpo.process_reward=tests.test_device_audit:process_steps"],
    "filter_tied_groups": ["--grpo.filter_tied_groups=true"],
    "refill": ["--grpo.filter_tied_groups=true", "--grpo.refill_max_rounds=2"],
    "mu_2": ["--grpo.num_iterations=2"],
    "beta_0": ["--grpo.beta=0.0"],
    "scale_batch": ["--grpo.scale_rewards=batch"],
    "reward_model": [],
    "gspo_dual_clip_tis": ["--grpo.ratio_level=sequence", "--grpo.clip_ratio_c=3",
                           "--grpo.importance_sampling=sequence_truncate", "--grpo.num_iterations=2"],
    "cispo_bnpo_mis": ["--grpo.policy_loss=cispo", "--grpo.loss_aggregation=bnpo",
                       "--grpo.importance_sampling=token_mask"],
}


def run_config(overrides):
    cfg = load_config(None, ["--rollout.group_size=4", "--train.prompts_per_step=2",
                             "--train.micro_batch_size=4", "--rollout.max_new_tokens=6",
                             "--rollout.packed_weights=off", *overrides])
    return cfg, validate(cfg, world_size=1)


@pytest.mark.parametrize("path", PATHS)
def test_a_grpo_step_keeps_every_tensor_on_the_engine_device(path, process_group, monkeypatch,
                                                              one_thread):
    cfg, plan = run_config(PATHS[path])
    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config(tokenizer))
    classifier = LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1))
    with second_device() as device, audited_collectives(monkeypatch.setattr):
        policy = DeviceEngine(CausalLMWithLogprobs(lm).to(device), plan.grad_accum)
        reference = None
        if cfg.grpo.beta > 0:
            frozen = CausalLMWithLogprobs(copy.deepcopy(lm)).to(device).requires_grad_(False)
            reference = DeviceEngine(frozen, lr=0.0)
        rollout = HybridRollout(policy.module.lm, pad_token_id=tokenizer.pad_token_id,
                                packed_weights="off", tokenizer=tokenizer)
        reward_fns = [tying_reward if "tied" in path or path == "refill" else spread_reward]
        if path == "reward_model":
            judge = RewardModel.__new__(RewardModel)  # its __call__, on a device-placed model
            judge.tokenizer, judge.micro_batch_size = tokenizer, 3
            judge.engine = DeviceClassifier(classifier.to(device))
            reward_fns = [judge, spread_reward]
        before = policy.module.lm.lm_head.weight.detach().cpu()
        for step in (1, 2):
            result = grpo_step(
                cfg, plan, policy, reference, rollout, tokenizer, PROMPTS, reward_fns,
                [f"r{i}" for i in range(len(reward_fns))], step,
                refill_rows=(lambda r: PROMPTS) if path == "refill" else None)
        batch, rewards, metrics = result.batch, result.rewards, result.metrics
        after = policy.module.lm.lm_head.weight.detach().cpu()

    tensors = {name: value for name, value in vars(batch).items()
               if isinstance(value, torch.Tensor)}
    assert {name for name, value in tensors.items() if not on_device(value)} == set()
    assert on_device(rewards) and rewards.shape == (8,)
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert not torch.equal(before, after), "the policy did not train"
    if path == "filter_tied_groups":
        assert metrics["filtered_groups_fraction"] == 0.5
        assert batch.completion_mask.cpu()[:4].sum() == 0
    if path == "refill":  # round 1's second group replaced round 0's tied first group
        assert metrics["refill/rounds"] == 1.0 and metrics["refill/missing_groups"] == 0.0
        assert metrics["filtered_groups_fraction"] == 0.0
        assert batch.completion_mask.cpu().sum(1).min() > 0
    if path == "process_supervision":
        assert batch.advantages.shape == batch.completion_mask.shape
    if path == "mu_2":
        assert on_device(batch.old_logprobs)
        assert any(k.startswith("rollout/logprob_gap") for k in metrics)
    if path == "reward_model":
        assert "rewards/r0/mean" in metrics and "rewards/r1/mean" in metrics


def test_evaluation_on_the_second_device(process_group, monkeypatch, one_thread):
    cfg, _ = run_config(["--train.eval_pass_at_k=true"])
    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config(tokenizer))
    with second_device() as device, audited_collectives(monkeypatch.setattr):
        lm = lm.to(device)
        rollout = HybridRollout(lm, pad_token_id=tokenizer.pad_token_id, packed_weights="off",
                                tokenizer=tokenizer)
        accuracy = evaluate(cfg, rollout, tokenizer, PROMPTS, spread_reward, device)
    assert 0.0 <= accuracy <= 1.0


def test_the_stand_in_device_refuses_what_cuda_refuses():
    """The audit is only as good as its device: mixing must raise, scalars and indices must not."""
    from tests.second_device import DeviceMismatch

    with second_device() as device:
        on = torch.ones(3, device=device)
        with pytest.raises(DeviceMismatch):
            torch.where(on > 0, on, torch.zeros(3))
        with pytest.raises(DeviceMismatch):
            on * torch.ones(3)
        assert (on * torch.tensor(2.0)).sum().item() == 6.0  # a 0-dim CPU tensor is a scalar
        assert on[torch.tensor([0, 2])].tolist() == [1.0, 1.0]  # CPU indices may index
        assert not on_device(on.cpu()) and on_device(torch.zeros(2).to(device))


class AnswersTwice:
    """Two observations per episode, then done with a final reward: every episode has several
    model turns and observation tokens, whatever the random model writes."""

    def __init__(self):
        self.turns = 0

    def step(self, messages, row):
        from grpo_ds.agents.environment import EnvReply

        self.turns += 1
        if self.turns > 2:
            return EnvReply(done=True, reward=float(len(messages[-2]["content"]) % 3) / 2)
        return EnvReply(observation=f"<{row['answer']}>", tool_calls=1,
                        tool_failures=self.turns % 2)


@pytest.mark.parametrize("kv_cache", ["reencode", "extend"])
def test_a_multiturn_grpo_step_keeps_every_tensor_on_the_engine_device(
        kv_cache, process_group, monkeypatch, one_thread):
    """Episodes of three model turns: rewards (the environment's and a function's), own-token
    masks, advantages and the loss all on the engine's device."""
    from grpo_ds.agents.rewards import env_reward
    from grpo_ds.agents.rollout import MultiTurnRollout

    cfg, plan = run_config(["--multiturn.max_turns=4", "--multiturn.max_total_tokens=40"])
    tokenizer = text_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config(tokenizer))
    with second_device() as device, audited_collectives(monkeypatch.setattr):
        policy = DeviceEngine(CausalLMWithLogprobs(lm).to(device), plan.grad_accum)
        reference = DeviceEngine(CausalLMWithLogprobs(copy.deepcopy(lm)).to(device)
                                 .requires_grad_(False), lr=0.0)
        backend = HybridRollout(policy.module.lm, pad_token_id=tokenizer.pad_token_id,
                                packed_weights="off", tokenizer=tokenizer)
        rollout = MultiTurnRollout(backend, AnswersTwice, tokenizer, "]", max_turns=4,
                                   max_total_tokens=40, device=device, kv_cache=kv_cache)
        before = policy.module.lm.lm_head.weight.detach().cpu()
        for step in (1, 2):
            result = grpo_step(cfg, plan, policy, reference, rollout, tokenizer, PROMPTS,
                               [env_reward, spread_reward], ["env", "spread"], step)
        batch, rewards, metrics = result.batch, result.rewards, result.metrics
        after = policy.module.lm.lm_head.weight.detach().cpu()

    tensors = {name: value for name, value in vars(batch).items()
               if isinstance(value, torch.Tensor)}
    assert {name for name, value in tensors.items() if not on_device(value)} == set()
    assert on_device(rewards) and rewards.shape == (8,)
    own = batch.completion_mask.cpu()  # the own-token mask: observations attended, not trained
    attended = batch.attention_mask.cpu()[:, -own.shape[1]:]
    assert ((own == 0) & (attended == 1)).any(), "no observation tokens: nothing was audited"
    # three model turns unless the model wrote EOS first
    assert 1.0 < metrics["multiturn/turns_mean"] <= 3.0 and metrics["tools/call_frequency"] > 0
    assert "rewards/env/mean" in metrics
    assert all(isinstance(v, float) for v in metrics.values()), metrics
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert not torch.equal(before, after), "the policy did not train"
