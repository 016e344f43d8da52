"""Multi-turn rollouts on a real tiny Llama: observations inserted as tokens and masked out of
the loss, limits kept, and max_turns=1 identical to the single-turn rollout and loss."""

import pytest
import torch

from grpo_ds.agents.environment import ToolEnvironment
from grpo_ds.agents.rollout import MultiTurnRollout
from grpo_ds.agents.tools import CallFormat
from grpo_ds.loss import grpo_loss
from grpo_ds.model import CausalLMWithLogprobs
from grpo_ds.rollout import HybridRollout, SamplingParams, logprob_gap
from tests.tiny_models import calc, text_tokenizer, tool_calling_llama


@pytest.fixture(scope="module")
def setup():
    tok = text_tokenizer()
    lm = tool_calling_llama(tok)
    prompts = [tok(p)["input_ids"] for p in ("3*4=", "12*5=", "7*7=")]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    return tok, lm, prompts, params


def multiturn(tok, lm, max_turns, budget=200):
    env = ToolEnvironment([calc], CallFormat("[", "]", "python"), "<{result}>", timeout=1.0)
    return MultiTurnRollout(HybridRollout(lm, tok.pad_token_id), lambda: env, tok, "]",
                            max_turns=max_turns, max_total_tokens=budget)


def test_observations_are_tokens_in_context_and_not_the_models_own(setup):
    tok, lm, prompts, params = setup
    out = multiturn(tok, lm, max_turns=4).generate(prompts, 4, params, seed=3)
    own, full = out.loss_mask, out.completion_mask
    turns = torch.tensor(out.columns["turns"])
    assert turns.max() > 1 and (turns <= 4).all()  # some episodes went on after a call
    assert ((own == 0) & (full == 1)).any()  # observation tokens: attended, not own
    assert (own <= full).all()
    assert (out.sampled_logprobs[own == 0] == 0).all()
    # an observation decodes to what the environment wrote (malformed calls are observations)
    row = int(turns.argmax())
    obs = out.completion_ids[row][(own[row] == 0) & (full[row] == 1)].tolist()
    assert tok.decode(obs).startswith("<")
    # each own token's sampled log-prob equals the teacher-forced one over the whole episode:
    # the training forward sees exactly the context the sampler saw, observations included
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, full], 1)
    with torch.no_grad():
        forced, _ = CausalLMWithLogprobs(lm)(ids, mask, out.completion_ids, 1.0)
    assert torch.allclose(forced[own == 1], out.sampled_logprobs[own == 1], atol=1e-4)
    metrics = out.metrics["episode_metrics"]
    assert metrics["multiturn/own_token_fraction"] == pytest.approx(
        own.sum().item() / full.sum().item())
    assert metrics["tools/call_frequency"] == pytest.approx(
        sum(out.columns["tool_calls"]) / len(turns))
    assert metrics["tools/failure_frequency"] > 0  # a random model's calls are mostly malformed


def test_token_budget_bounds_each_episode(setup):
    tok, lm, prompts, params = setup
    out = multiturn(tok, lm, max_turns=6, budget=15).generate(prompts, 4, params, seed=5)
    lengths = out.completion_mask.sum(1)
    assert (lengths <= 15).all()
    assert out.truncated[lengths == 15].all()


def test_max_turns_1_is_the_single_turn_rollout(setup):
    tok, lm, prompts, params = setup
    single = HybridRollout(lm, tok.pad_token_id).generate(prompts, 4, params, seed=9)
    multi = multiturn(tok, lm, max_turns=1).generate(prompts, 4, params, seed=9)
    assert torch.equal(single.completion_ids, multi.completion_ids)
    assert torch.equal(single.completion_mask, multi.completion_mask)
    assert torch.equal(multi.loss_mask, multi.completion_mask)
    assert torch.allclose(single.sampled_logprobs, multi.sampled_logprobs)
    assert torch.equal(single.truncated, multi.truncated)


def test_max_turns_1_gives_the_single_turn_loss_through_the_trainer(setup):
    from grpo_ds.config import Config
    from grpo_ds.sample import generate_and_score

    tok, lm, _, _ = setup
    cfg = Config()
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = 4, 12
    rows = [{"prompt": p, "answer": "1"} for p in ("3*4=", "12*5=")]

    def reward(completions, **kw):
        return [float(len(c) % 3) for c in completions]

    sampled = [generate_and_score(cfg, r, tok, rows, [reward], ["r"], seed=4)
               for r in (HybridRollout(lm, tok.pad_token_id), multiturn(tok, lm, 1))]
    batches = [(s.batch, s.rewards) for s in sampled]
    losses = []
    for batch, rewards in batches:
        logprobs, _ = CausalLMWithLogprobs(lm)(batch.input_ids, batch.attention_mask,
                                               batch.completion_ids)
        losses.append(grpo_loss(logprobs, None, None, rewards - rewards.mean(),
                                batch.completion_mask)[0])
    assert torch.equal(batches[0][1], batches[1][1])
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-7)


def test_observation_tokens_get_no_gradient_kl_or_gap(setup):
    tok, lm, prompts, params = setup
    out = multiturn(tok, lm, max_turns=4).generate(prompts, 4, params, seed=3)
    own = out.loss_mask.float()
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    logprobs, _ = CausalLMWithLogprobs(lm)(ids, mask, out.completion_ids)
    logprobs.retain_grad()
    advantages = torch.linspace(-1, 1, len(own))
    ref = out.sampled_logprobs - 0.3
    loss, _ = grpo_loss(logprobs, None, ref, advantages, own, beta=0.1)
    loss.backward()
    observed = (own == 0) & (out.completion_mask == 1)
    assert observed.any()
    assert (logprobs.grad[observed] == 0).all() and (logprobs.grad[own == 1] != 0).any()
    # what sits at observation positions in the reference or the sampler changes nothing
    moved = ref.masked_fill(observed, 5.0)
    again, _ = grpo_loss(logprobs.detach(), None, moved, advantages, own, beta=0.1)
    assert again.item() == pytest.approx(loss.item(), abs=1e-7)
    gap = logprob_gap(out.sampled_logprobs, logprobs.detach(), own)
    moved_gap = logprob_gap(out.sampled_logprobs.masked_fill(observed, -9.0), logprobs.detach(),
                            own)
    assert gap == moved_gap
