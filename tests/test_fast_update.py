"""No compute on padding: the policy module trims all-padding columns and gives the same log-probs
and gradients; micro-batches are bucketed by length and their results come back in batch order."""

import pytest
import torch

from grpo_ds.batch import RolloutBatch, left_pad, right_pad
from grpo_ds.logprobs import logits_to_token_logprobs
from grpo_ds.model import CausalLMWithLogprobs, build_tiny_llama, real_columns
from grpo_ds.update import length_sorted_micro_batches, take_rows, unsort
from tests.multirank import launch

VOCAB = 17


def padded_batch():
    """Prompts of 2, 3, 3 tokens left-padded to 5 columns (plus 2 more all-pad columns in front),
    completions of 1, 2, 4 tokens right-padded to 6 (the last 2 columns are padding in every row).
    """
    prompts = [[3, 4], [5, 6, 7], [8, 9, 10]]
    completions = [[11], [12, 13], [14, 15, 16, 3]]
    pad2 = torch.zeros(3, 2, dtype=torch.long)
    p_ids, p_mask = left_pad(prompts, 0)  # width 3
    p_ids, p_mask = torch.cat([pad2, p_ids], 1), torch.cat([pad2, p_mask], 1)  # width 5
    c_ids, c_mask = right_pad(completions, 0)  # width 4
    c_ids, c_mask = torch.cat([c_ids, pad2], 1), torch.cat([c_mask, pad2], 1)  # width 6
    return torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), c_ids, c_mask


def untrimmed(module, ids, mask, completion_ids):
    """The forward before trimming: the whole padded width through the model."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = module.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=False).last_hidden_state
    logits = module.lm.lm_head(hidden[:, -completion_ids.shape[1] - 1:-1])
    return logits_to_token_logprobs(logits, completion_ids)[0]


def test_real_columns_by_hand():
    ids, mask, completion_ids, _ = padded_batch()
    # 11 columns: prompt 0..4 (real from column 2: the longest prompt has 3 tokens),
    # completion 5..10 (real up to column 5 + 4 - 1 = 8), so [2, 9)
    assert ids.shape == (3, 11)
    assert real_columns(mask, completion_ids.shape[1]) == (2, 9)
    # nothing real at all: keep the last prompt column and the first completion column
    assert real_columns(torch.zeros(2, 7, dtype=torch.long), 3) == (3, 5)


def test_trimmed_forward_equals_untrimmed_and_skips_padding():
    ids, mask, completion_ids, completion_mask = padded_batch()
    lm = build_tiny_llama(VOCAB, 32, 2, 4, 64, {}, seed=0)
    module = CausalLMWithLogprobs(lm, chunk_size=5)
    widths = []
    lm.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    weights = torch.linspace(-1, 1, completion_mask.numel()).reshape(completion_mask.shape)
    weights = weights * completion_mask  # a loss over real completion tokens only

    def grads(logprobs):
        module.zero_grad()
        (weights * logprobs).sum().backward()
        return [p.grad.clone() for p in module.parameters() if p.grad is not None]

    fast, entropy = module(ids, mask, completion_ids, with_entropy=True)
    fast_grads = grads(fast)
    assert widths == [9 - 2]  # the model saw only the 7 real columns
    slow = untrimmed(module, ids, mask, completion_ids)
    slow_grads = grads(slow)
    assert fast.shape == entropy.shape == completion_ids.shape
    real = completion_mask.bool()
    torch.testing.assert_close(fast[real], slow[real], rtol=1e-5, atol=1e-6)
    assert (fast[:, 4:] == 0).all()  # trimmed columns come back as 0
    assert len(fast_grads) == len(slow_grads) > 0
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_length_buckets_sort_and_unsort():
    # real lengths 5, 2, 4, 2, 3 -> stable order 1, 3, 4, 2, 0
    lengths = [5, 2, 4, 2, 3]
    mask = torch.tensor([[0] * (5 - n) + [1] * n for n in lengths])
    rows = torch.arange(5.0)
    batch = RolloutBatch(input_ids=mask.clone(), attention_mask=mask, completion_ids=mask,
                         completion_mask=mask.float(), advantages=rows,
                         sampled_logprobs=mask.float(), process_steps=[[i] for i in range(5)])
    parts, order = length_sorted_micro_batches(batch, 2)
    assert order.tolist() == [1, 3, 4, 2, 0]
    assert [p.advantages.tolist() for p in parts] == [[1.0, 3.0], [4.0, 2.0], [0.0]]
    assert parts[0].process_steps == [[1], [3]]  # list fields follow the rows too
    computed = torch.cat([p.advantages * 10 for p in parts])  # a per-row result, sorted order
    assert unsort(computed, order).tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert take_rows(batch, order).attention_mask.sum(1).tolist() == [2, 2, 3, 4, 5]


@pytest.mark.multirank
def test_update_keeps_batch_order_under_zero3(tmp_path):
    out = tmp_path / "order.pt"
    launch("update_order.py", str(out), ranks=2)
    for rank in torch.load(out):
        before, old = rank["values"]
        assert before.numel() > 0 and torch.isfinite(torch.tensor(rank["loss"]))
        # the first pass's log-probs, unsorted back, equal a plain forward in batch order
        torch.testing.assert_close(old, before, rtol=1e-5, atol=1e-5)
