"""Generation in passes under `max_batch_rows`: the split by hand, and one pass vs several on a
tiny unpartitioned Llama (single process, CPU, seconds). The 2-rank ZeRO-3 case (ranks with
different numbers of passes) is in tests/scripts/rollout_zero3.py."""

import pytest
import torch

from grpo_ds.config import ConfigError, load_config, validate
from grpo_ds.rollout import HybridRollout, SamplingParams
from grpo_ds.rollout.decode import DecodeResult
from grpo_ds.rollout.passes import (
    concat_results,
    largest_pass_rows,
    plan_passes,
    prompts_per_pass,
    release_cached_memory,
)
from tests.test_rollout_engine import EOS, PAD, prompts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the split, by hand -----------------------------------------------------------------------


@pytest.mark.parametrize("num_prompts, group, max_rows, expected", [
    # 12 rows hold 4 groups of 3: 5 prompts need 2 passes, split evenly 3 + 2 (not 4 + 1)
    (5, 3, 12, [(0, 3), (3, 5)]),
    # 13 rows hold 3 groups of 4: 10 prompts need ceil(10/3) = 4 passes: 3 + 3 + 2 + 2
    (10, 4, 13, [(0, 3), (3, 6), (6, 8), (8, 10)]),
    (8, 4, 16, [(0, 4), (4, 8)]),  # exactly 4 groups per pass
    (8, 4, 32, [(0, 8)]),  # 32 rows = all 8 groups: one pass
    (16, 8, None, [(0, 16)]),  # no bound: the default run's 16 prompts x 8 a rank, one pass
    (3, 2, 2, [(0, 1), (1, 2), (2, 3)]),  # one group per pass
    (0, 4, 8, [(0, 0)]),  # no prompts: one empty pass (it joins the gathers under ZeRO-3)
])
def test_plan_passes_by_hand(num_prompts, group, max_rows, expected):
    assert plan_passes(num_prompts, group, max_rows) == expected


def test_pass_bound_in_rows():
    assert prompts_per_pass(3, 12) == 4 and prompts_per_pass(4, 13) == 3
    assert prompts_per_pass(8, None) is None
    assert largest_pass_rows(5, 3, 12) == 9  # 3 prompts x 3 rows, under the bound of 12
    assert largest_pass_rows(10, 4, 13) == 12
    assert largest_pass_rows(16, 8, None) == 128
    with pytest.raises(ValueError, match="max_batch_rows=3 is smaller than one group of 4"):
        plan_passes(3, 4, 3)


def test_concat_results_stacks_rows_and_adds_counts():
    def result(tokens, lengths, forwards):
        t = torch.tensor(tokens)
        return DecodeResult(t, t.float() / 10, torch.tensor(lengths), torch.tensor(lengths) < 2,
                            forwards, 0.5)

    a, b = result([[5, 6], [7, 0]], [2, 1], 3), result([[8, 0]], [1], 2)
    out = concat_results([a, b])
    assert out.tokens.tolist() == [[5, 6], [7, 0], [8, 0]]
    assert out.lengths.tolist() == [2, 1, 1] and out.stopped.tolist() == [False, True, True]
    assert torch.equal(out.logprobs, torch.cat([a.logprobs, b.logprobs]))
    assert (out.forwards, out.prefill_seconds) == (5, 1.0)
    assert concat_results([a]) is a


# ---- one pass vs several ----------------------------------------------------------------------


def rows_seen(model):
    """Batch rows of every forward the model runs (a hook on the embedding)."""
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    return seen


@pytest.mark.parametrize("temperature, share_prefix", [(1.0, True), (0.0, True), (0.8, False)])
def test_passes_return_what_one_pass_returns(temperature, share_prefix):
    model = tiny_llama(vocab=16)
    # 4 of 16 tokens stop a row: rows, and so the passes' own widths, end at different lengths
    params = SamplingParams(max_new_tokens=12, temperature=temperature,
                            stop_token_ids=(EOS, 2, 3, 4))
    batch = prompts(16, lengths=(5, 9, 3, 7, 2))
    seen = rows_seen(model)
    one = HybridRollout(model, PAD, share_prefix=share_prefix).generate(batch, 3, params, seed=4)
    seen_one = list(seen)
    seen.clear()
    split = HybridRollout(model, PAD, share_prefix=share_prefix, max_batch_rows=7).generate(
        batch, 3, params, seed=4)
    # 7 rows hold 2 groups of 3: 5 prompts in 3 passes of 2, 2 and 1 prompts
    assert split.metrics["passes"] == 3 and split.metrics["rows_per_pass"] == 6
    assert max(seen) <= 7 < max(seen_one)  # no forward of the passes held more rows than 7
    assert one.metrics["passes"] == 1 and one.metrics["rows_per_pass"] == 15
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                 "sampled_logprobs", "truncated"):
        assert torch.equal(getattr(split, name), getattr(one, name)), name
    lengths = one.completion_mask.sum(1)
    widths = {int(lengths[a:b].max()) for a, b in ((0, 6), (6, 12), (12, 15))}
    assert len(widths) > 1  # the passes' own widths differed; padding made them one


def test_group_larger_than_the_bound_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_batch_rows=2 is smaller than one group of 3"):
        HybridRollout(model, PAD, max_batch_rows=2).generate(prompts(), 3, SamplingParams(4), 0)
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1"):
        HybridRollout(model, PAD, max_batch_rows=0)


def test_config_bound_must_hold_a_group():
    cfg = load_config(None, ["--rollout.max_batch_rows=7"])  # group_size 8 by default
    with pytest.raises(ConfigError, match="rollout.max_batch_rows=7: must be at least "
                                          "rollout.group_size=8"):
        validate(cfg, 2)
    assert load_config(None).rollout.max_batch_rows is None
    validate(load_config(None, ["--rollout.max_batch_rows=8"]), 2)


def test_release_cached_memory_empties_the_accelerators_cache(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    calls = []
    monkeypatch.setattr(get_accelerator(), "empty_cache", lambda: calls.append(1))
    release_cached_memory()
    assert calls == [1]


# ---- the bound on a device with its own memory ------------------------------------------------


def test_generation_row_bytes_by_hand():
    from grpo_ds.model_spec import generation_row_bytes, llama_spec

    spec = llama_spec({"hidden_size": 32, "vocab_size": 32, "intermediate_size": 64,
                       "num_attention_heads": 4, "num_key_value_heads": 2,
                       "num_hidden_layers": 2})
    # KV: 2 (k, v) x 2 layers x 2 kv heads x head_dim 8 x 20 tokens x 4 B = 5120;
    # sampling: 32 logits x 32 B = 1024.
    assert generation_row_bytes(spec, 4, 20) == 5120 + 1024


@pytest.mark.parametrize("free, per_row, group, expected", [
    (10_000, 100, 4, 80),  # 80 % of 10,000 B = 8,000 B = 80 rows = 20 groups of 4
    (10_000, 100, 3, 78),  # 80 rows, cut to whole groups of 3: 26 groups
    (1_000, 100, 16, 16),  # not even one group fits: one group (it fails as it would anyway)
])
def test_rows_that_fit_by_hand(free, per_row, group, expected):
    from grpo_ds.rollout.passes import rows_that_fit

    assert rows_that_fit(free, per_row, group) == expected


def test_unset_bound_on_a_device_sizes_passes_to_its_free_memory(monkeypatch):
    """max_batch_rows=None: one pass on the CPU; on a device with its own memory (the meta
    stand-in for a GPU, tests/second_device.py) the rows that fit in 80 % of what is free."""
    from deepspeed.accelerator import get_accelerator

    from grpo_ds.model_spec import generation_row_bytes, llama_spec
    from tests.second_device import second_device

    model, group = tiny_llama(), 4
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(EOS,))
    on_cpu = HybridRollout(model, pad_token_id=PAD).generate(prompts(), group, params, seed=3)
    assert on_cpu.metrics["passes"] == 1
    # Free memory for exactly 2 groups at the longest prompt (9) + 6 new tokens.
    per_row = generation_row_bytes(llama_spec(model.config.to_dict()), 4, 9 + 6)
    monkeypatch.setattr(type(get_accelerator()), "available_memory",
                        lambda self, device_index=None: int(8 * per_row / 0.8) + 1)
    with second_device() as device:
        out = HybridRollout(model.to(device), pad_token_id=PAD).generate(
            prompts(), group, params, seed=3)
        assert out.metrics["rows_per_pass"] == 8 and out.metrics["passes"] == 2
        assert torch.equal(out.completion_ids.cpu(), on_cpu.completion_ids)
