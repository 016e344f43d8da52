"""KV-cache extension across turns (grpo_ds/rollout/turns.py): the same episodes, token for
token, as re-encoding each turn's whole context, on a tiny float64 Llama; and the choice of path
(auto falls back with a log line, extend refuses what it cannot do)."""

import logging

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from grpo_ds.agents.environment import ToolEnvironment
from grpo_ds.agents.rollout import MultiTurnRollout
from grpo_ds.agents.tools import CallFormat
from grpo_ds.rollout import HybridRollout, SamplingParams
from tests.tiny_models import calc, text_tokenizer, tool_calling_llama


@pytest.fixture(scope="module")
def setup():
    tok = text_tokenizer()
    lm = tool_calling_llama(tok, open_bias=4.5, digit_bias=1.0, dtype=torch.float64)
    prompts = [tok(p)["input_ids"] for p in ("3*4=", "12*5=", "7*7=")]
    return tok, lm, prompts


def rollout(tok, lm, kv_cache, gather="full", call_end="]", max_turns=5, **engine):
    env = ToolEnvironment([calc], CallFormat("[", call_end, "python"), "<{result}>", timeout=1.0)
    backend = HybridRollout(lm, tok.pad_token_id, gather=gather, tokenizer=tok,
                            packed_weights="off", **engine)
    return MultiTurnRollout(backend, lambda: env, tok, call_end, max_turns=max_turns,
                            max_total_tokens=300, kv_cache=kv_cache)


def assert_same_episodes(a, b):
    for name in ("completion_ids", "completion_mask", "loss_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.allclose(a.sampled_logprobs, b.sampled_logprobs, atol=1e-9)
    assert a.columns == b.columns
    assert a.metrics["generate_calls"] == b.metrics["generate_calls"]


CASES = {
    "sampled": {"params": {"temperature": 1.0}},
    "greedy": {"params": {"temperature": 0.0}},
    "top_p_penalty": {"params": {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.3}},
    "stop_string": {"params": {"temperature": 1.0}, "call_end": "])"},
    "layer_groups": {"params": {"temperature": 1.0}, "gather": "layers", "layers_per_group": 1},
    "no_shared_prefix": {"params": {"temperature": 1.0}, "share_prefix": False},
}


@pytest.mark.parametrize("case", CASES)
def test_extension_gives_the_reencoded_episodes(setup, case, one_thread):
    tok, lm, prompts = setup
    spec = dict(CASES[case])
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(tok.eos_token_id,),
                            **spec.pop("params"))
    turns_seen = []
    for seed in (1, 2, 3):
        reencoded = rollout(tok, lm, "reencode", **spec).generate(prompts, 4, params, seed)
        extended = rollout(tok, lm, "extend", **spec).generate(prompts, 4, params, seed)
        assert_same_episodes(reencoded, extended)
        turns_seen += reencoded.columns["turns"]
    assert max(turns_seen) >= 3  # episodes really went on after observations
    if params.temperature > 0:  # and some left the batch before others (greedy: all alike)
        assert min(turns_seen) < max(turns_seen)


def test_auto_extends_where_it_can_and_says_why_where_it_cannot(setup, caplog):
    tok, lm, prompts = setup
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(tok.eos_token_id,))
    auto = rollout(tok, lm, "auto")
    assert auto._extend(12, 4, 70) is True
    # a pass bound below the episodes: their caches cannot all be kept
    bounded = rollout(tok, lm, "auto", max_batch_rows=4)
    with caplog.at_level(logging.WARNING, logger="grpo_ds.agents.rollout"):
        out = bounded.generate(prompts, 4, params, seed=1)
    assert "re-encodes the whole episode" in caplog.text and "max_batch_rows" in caplog.text
    assert_same_episodes(out, rollout(tok, lm, "reencode").generate(prompts, 4, params, seed=1))
    with pytest.raises(RuntimeError, match="kv_cache='extend'.*max_batch_rows"):
        rollout(tok, lm, "extend", max_batch_rows=4).generate(prompts, 4, params, seed=1)


def test_sliding_window_layers_are_refused_by_extend(setup):
    tok, _, prompts = setup
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=8, pad_token_id=0)
    lm = MistralForCausalLM(config).eval()
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(tok.eos_token_id,))
    with pytest.raises(RuntimeError, match="sliding window"):
        rollout(tok, lm, "extend").generate(prompts, 2, params, seed=1)
    out = rollout(tok, lm, "auto").generate(prompts, 2, params, seed=1)  # re-encodes
    assert out.completion_ids.shape[0] == 6


def test_the_config_field_is_checked_before_launch():
    from grpo_ds.config import ConfigError, load_config, validate

    cfg = load_config(None, ["--task.name=tool_arithmetic", "--multiturn.kv_cache=reuse"])
    with pytest.raises(ConfigError, match="multiturn.kv_cache='reuse'"):
        validate(cfg, world_size=1)
