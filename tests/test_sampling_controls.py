"""Sampling controls from the config: rollout.min_new_tokens, ignore_eos, stop, repetition_penalty.

Each goes config -> sample.sampling_params -> HybridRollout on a tiny Llama (CPU, seconds).
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from grpo_ds.config import load_config
from grpo_ds.rollout import HybridRollout
from grpo_ds.rollout.sampling import penalise_repetitions, sample_next_tokens
from grpo_ds.sample import sampling_params
from tests.test_rollout_engine import PAD, prompts, tiny_llama, trainer_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 1


class Tok:
    """What sampling_params reads from a tokenizer."""

    eos_token_id = EOS


def params_from(*overrides, greedy=False):
    cfg = load_config(None, list(overrides))
    return sampling_params(cfg, Tok(), greedy=greedy)


def eos_heavy_llama() -> LlamaForCausalLM:
    """A tiny Llama whose lm_head makes EOS the likeliest token almost everywhere."""
    model = tiny_llama(vocab=16)
    head = torch.nn.Linear(model.lm_head.in_features, 16, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = 6.0  # e^6 ~ 400 times any other token
    model.lm_head = head
    return model


def test_repetition_penalty_by_hand():
    # seen tokens 0 and 1, penalty 2: 2 -> 2/2 = 1, -1 -> -1*2 = -2; unseen .5 stays.
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    assert penalise_repetitions(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_tokens_are_never_drawn_and_the_logprob_stays_the_policys(temperature):
    logits = torch.tensor([[5.0, 0.0, 1.0, 0.5]]).expand(64, -1)
    u = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, logprobs = sample_next_tokens(logits, u, temperature, banned_ids=torch.tensor([0]))
    assert (tokens != 0).all() and (tokens == 2).any()
    policy = torch.log_softmax(logits / (temperature or 1.0), -1)  # token 0's mass included
    torch.testing.assert_close(logprobs, policy.gather(-1, tokens[:, None]).squeeze(-1))


def test_config_maps_to_sampling_params():
    p = params_from("--rollout.min_new_tokens=3", "--rollout.ignore_eos=true",
                    '--rollout.stop=["\\n\\n", "Q:"]', "--rollout.repetition_penalty=1.3")
    assert (p.min_new_tokens, p.stop_token_ids, p.repetition_penalty) == (3, (), 1.3)
    assert p.stop_strings == ("\n\n", "Q:")
    greedy = params_from("--rollout.min_new_tokens=3", "--rollout.stop=Q:", greedy=True)
    assert greedy.temperature == 0 and greedy.stop_strings == ("Q:",)  # evaluation honours them
    assert greedy.min_new_tokens == 3 and greedy.stop_token_ids == (EOS,)


def test_min_new_tokens_with_ignore_eos_gives_exactly_k_tokens():
    model, k = eos_heavy_llama(), 12
    free = HybridRollout(model, PAD).generate(prompts(16), 8, params_from(
        f"--rollout.max_new_tokens={k}"), seed=0)
    assert free.completion_mask.sum(1).float().mean() < 2  # EOS ends nearly every row at once
    params = params_from(f"--rollout.max_new_tokens={k}", f"--rollout.min_new_tokens={k}",
                         "--rollout.ignore_eos=true")
    out = HybridRollout(model, PAD).generate(prompts(16), 8, params, seed=0)
    assert (out.completion_mask.sum(1) == k).all() and out.completion_ids.shape[1] == k


def test_min_new_tokens_delays_eos_and_keeps_policy_logprobs():
    model, k = eos_heavy_llama(), 5
    params = params_from("--rollout.max_new_tokens=12", f"--rollout.min_new_tokens={k}",
                         "--rollout.temperature=0.9")
    out = HybridRollout(model, PAD).generate(prompts(16), 8, params, seed=3)
    lengths = out.completion_mask.sum(1)
    assert (lengths >= k).all()
    assert not (out.completion_ids[:, :k] == EOS).any()  # EOS was banned from the first k draws
    assert ((out.completion_ids[:, k] == EOS) & ~out.truncated).float().mean() > 0.5  # then wins
    ref = trainer_logprobs(model, out, 0.9)  # the reported log-prob is the policy's, EOS included
    assert ((ref - out.sampled_logprobs).abs() * out.completion_mask).max() < 1e-4


def test_ignore_eos_runs_every_completion_to_the_maximum():
    model = eos_heavy_llama()
    params = params_from("--rollout.max_new_tokens=9", "--rollout.ignore_eos=true")
    out = HybridRollout(model, PAD).generate(prompts(16), 4, params, seed=1)
    assert (out.completion_mask.sum(1) == 9).all() and out.truncated.all()
    assert (out.completion_ids == EOS).float().mean() > 0.5  # EOS sampled, and decoding went on


def test_stop_string_cuts_completions_where_it_first_appears():
    from tests.test_rollout_layers import char_tokenizer

    tok = char_tokenizer()  # one character per token: each stop string spans a token boundary
    model = tiny_llama(vocab=24)
    stops = ("ab", "ba", "bc", "cb")
    cfg = load_config(None, ["--rollout.max_new_tokens=40", f"--rollout.stop={','.join(stops)}",
                             "--rollout.ignore_eos=true"])
    out = HybridRollout(model, PAD, tokenizer=tok).generate(
        prompts(24), 16, sampling_params(cfg, tok), seed=0)
    cut = 0
    for row in range(out.completion_ids.shape[0]):
        n = int(out.completion_mask[row].sum())
        text = tok.decode(out.completion_ids[row, :n].tolist())
        assert (out.sampled_logprobs[row, n:] == 0).all()  # mask and log-probs end at the cut
        assert (out.completion_ids[row, n:] == PAD).all()
        if out.truncated[row]:
            assert n == 40 and not any(s in text for s in stops)
        else:  # ends with the token that completes the first occurrence of any stop string
            cut += 1
            assert text.endswith(stops) and not any(s in text[:-1] for s in stops)
    assert cut > 8
    ref = trainer_logprobs(model, out, 1.0)
    assert ((ref - out.sampled_logprobs).abs() * out.completion_mask).max() < 1e-4


def test_min_new_tokens_defers_stop_strings():
    from tests.test_rollout_layers import char_tokenizer

    tok = char_tokenizer()
    cfg = load_config(None, ["--rollout.max_new_tokens=30", "--rollout.stop=a",
                             "--rollout.min_new_tokens=6", "--rollout.ignore_eos=true"])
    out = HybridRollout(tiny_llama(vocab=24), PAD, tokenizer=tok).generate(
        prompts(24), 16, sampling_params(cfg, tok), seed=0)
    lengths = out.completion_mask.sum(1)
    assert (lengths >= 6).all() and (~out.truncated).any()
    early = [tok.decode(out.completion_ids[r, :5].tolist()) for r in range(len(lengths))]
    assert any("a" in text for text in early)  # "a" appeared early and did not stop those rows


def test_repetition_penalty_greedy_matches_hf_generate():
    model = tiny_llama(vocab=32).eval()
    prompt = prompts(lengths=(6,))[0]
    params = params_from("--rollout.max_new_tokens=12", "--rollout.repetition_penalty=1.8",
                         "--rollout.ignore_eos=true", greedy=True)
    ours = HybridRollout(model, PAD).generate([prompt], 1, params, seed=0)
    plain = HybridRollout(model, PAD).generate([prompt], 1, params_from(
        "--rollout.max_new_tokens=12", "--rollout.ignore_eos=true", greedy=True), seed=0)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            repetition_penalty=1.8, eos_token_id=None, pad_token_id=PAD)
    assert ours.completion_ids[0].tolist() == hf[0, len(prompt):].tolist()
    assert not torch.equal(ours.completion_ids, plain.completion_ids)  # the penalty acted
