"""HybridRollout on a tiny unpartitioned Llama (single process, CPU, seconds)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_ds.rollout import HybridRollout, RolloutBackend, SamplingParams
from grpo_ds.rollout.cache import OWN_CHUNK, make_cache
from grpo_ds.rollout.forward import FullForward

PAD, EOS = 0, 1


pytestmark = pytest.mark.usefixtures("one_thread")



def tiny_llama(vocab=32, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config)


def prompts(vocab=32, lengths=(5, 9, 3), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def trainer_logprobs(model, out, temperature) -> torch.Tensor:
    """What the trainer computes: log_softmax(model(prompt + completion).logits / T) at the tokens."""
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    width = out.completion_ids.shape[1]
    logits = logits[:, -width - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_sampled_logprobs_match_training_forward(temperature, top_k, top_p):
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_token_ids=(EOS,))
    out = HybridRollout(model, PAD).generate(prompts(), 4, params, seed=0)
    ref = trainer_logprobs(model, out, temperature)
    gap = (ref - out.sampled_logprobs).abs() * out.completion_mask
    assert gap.max() < 1e-4
    assert (out.sampled_logprobs[out.completion_mask == 0] == 0).all()


def test_output_layout_and_padding():
    model = tiny_llama(vocab=16)  # EOS (1 of 16 tokens) ends some rows early
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(EOS,))
    out = HybridRollout(model, PAD).generate(prompts(16), 5, params, seed=2)
    assert out.prompt_ids.shape == (15, 9) and out.completion_ids.shape[0] == 15
    # rows i*G .. i*G+G-1 repeat prompt i, left-padded
    assert torch.equal(out.prompt_ids[5], out.prompt_ids[9])
    assert out.prompt_mask[0].tolist() == [0] * 4 + [1] * 5
    lengths = out.completion_mask.sum(-1)
    for row in range(15):
        n = int(lengths[row])
        assert out.completion_mask[row, :n].all() and not out.completion_mask[row, n:].any()
        assert (out.completion_ids[row, n:] == PAD).all()
        ends_with_eos = out.completion_ids[row, n - 1] == EOS
        assert bool(out.truncated[row]) == (not ends_with_eos)
        assert ends_with_eos or n == 12
        assert not (out.completion_ids[row, : n - 1] == EOS).any()  # stops at the FIRST EOS
    assert out.truncated.any() and not out.truncated.all()
    assert out.metrics["tokens"] == int(lengths.sum())
    assert isinstance(HybridRollout(model, PAD), RolloutBackend)


def test_same_seed_same_samples_other_seed_differs():
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=8)
    a = HybridRollout(model, PAD).generate(prompts(), 3, params, seed=5)
    b = HybridRollout(model, PAD).generate(prompts(), 3, params, seed=5)
    c = HybridRollout(model, PAD).generate(prompts(), 3, params, seed=6)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.sampled_logprobs, b.sampled_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_shared_prefill_equals_prefilling_g_copies():
    # group_size=G over N prompts vs group_size=1 over the N*G prompt copies: same rows, same
    # uniforms[r, t], so the same tokens, and the same log-probs up to float noise.
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=10, temperature=0.8)
    shared = HybridRollout(model, PAD).generate(prompts(), 4, params, seed=9)
    copies = [p for p in prompts() for _ in range(4)]
    separate = HybridRollout(model, PAD).generate(copies, 1, params, seed=9)
    assert torch.equal(shared.completion_ids, separate.completion_ids)
    assert torch.allclose(shared.sampled_logprobs, separate.sampled_logprobs, atol=1e-5)
    assert shared.metrics["prefill_seconds"] >= 0


def test_left_padding_gives_per_prompt_logits():
    model = tiny_llama().eval()
    batch = HybridRollout(model, PAD).generate(prompts(), 1, SamplingParams(6, temperature=0), 0)
    for i, prompt in enumerate(prompts()):
        alone = HybridRollout(model, PAD).generate([prompt], 1, SamplingParams(6, temperature=0), 0)
        assert torch.equal(batch.completion_ids[i], alone.completion_ids[0])
        assert torch.allclose(batch.sampled_logprobs[i], alone.sampled_logprobs[0], atol=1e-5)
    # and the prefill logits themselves, padded batch vs one prompt alone
    from transformers import DynamicCache

    from grpo_ds.rollout.backend import left_pad

    ids, mask = left_pad(prompts(), PAD, torch.device("cpu"))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = FullForward(model)(ids, mask, positions, DynamicCache())
        for i, prompt in enumerate(prompts()):
            one = torch.tensor([prompt])
            alone = FullForward(model)(one, torch.ones_like(one),
                                       torch.arange(len(prompt)).unsqueeze(0), DynamicCache())
            assert torch.allclose(logits[i], alone[0], atol=1e-5)


def test_compaction_changes_nothing():
    model = tiny_llama(vocab=16)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=(EOS,), top_p=0.95)
    compact = HybridRollout(model, PAD).generate(prompts(16), 6, params, seed=4)
    full = HybridRollout(model, PAD, compact=False).generate(prompts(16), 6, params, seed=4)
    lengths = compact.completion_mask.sum(-1)
    assert lengths.min() < 10 and lengths.max() == 20  # rows really finished at varied steps
    assert torch.equal(compact.completion_ids, full.completion_ids)
    assert torch.allclose(compact.sampled_logprobs, full.sampled_logprobs, atol=1e-5)
    assert torch.equal(compact.truncated, full.truncated)


def test_preallocated_cache_matches_dynamic_cache():
    from transformers import DynamicCache

    model = tiny_llama().eval()
    ids = torch.tensor([prompts(lengths=(6,))[0]] * 2)
    mask, positions = torch.ones_like(ids), torch.arange(6).expand(2, -1)
    caches = [DynamicCache(), make_cache(model.config, capacity=12)]
    with torch.no_grad():
        outs = [FullForward(model)(ids, mask, positions, c) for c in caches]
        for c in caches:
            c.batch_repeat_interleave(2)
            c.batch_select_indices(torch.tensor([0, 3]))
        step = [FullForward(model)(torch.tensor([[5], [7]]), torch.ones(2, 7, dtype=torch.long),
                                   torch.tensor([[6], [6]]), c) for c in caches]
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.allclose(step[0], step[1], atol=1e-6)
    assert caches[1].get_seq_length() == 7


def test_greedy_is_deterministic_and_train_mode_is_restored():
    model = tiny_llama()
    model.train()
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    a = HybridRollout(model, PAD).generate(prompts(), 2, params, seed=1)
    b = HybridRollout(model, PAD).generate(prompts(), 2, params, seed=2)
    assert torch.equal(a.completion_ids, b.completion_ids)  # seed is irrelevant for greedy
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])  # G greedy samples agree
    assert model.training and torch.is_grad_enabled()


def test_invalid_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="gather"):
        HybridRollout(model, PAD, gather="sometimes")
    with pytest.raises(ValueError, match="tokenizer"):
        HybridRollout(model, PAD).generate(prompts(), 1, SamplingParams(4, stop_strings=("x",)), 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=0.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_kv_equals_repeated_kv(attn):
    # GQA (4 heads, 2 kv heads), left padding, EOS stops (compaction), completions longer than
    # one chunk of the completion KV buffer: reading the prompt KV once per prompt must give
    # what the G-times repeated KV gives.
    model = tiny_llama(vocab=16)
    model.config._attn_implementation = attn
    params = SamplingParams(max_new_tokens=2 * OWN_CHUNK + 5, stop_token_ids=(EOS,),
                            temperature=0.9)
    shared = HybridRollout(model, PAD).generate(prompts(16), 5, params, seed=8)
    repeated = HybridRollout(model, PAD, share_prefix=False).generate(prompts(16), 5, params, 8)
    assert model.config._attn_implementation == attn  # restored after generate
    lengths = shared.completion_mask.sum(-1)
    assert lengths.min() < 16 and lengths.max() > OWN_CHUNK  # compaction, and buffer growth
    assert torch.equal(shared.completion_ids, repeated.completion_ids)
    assert torch.allclose(shared.sampled_logprobs, repeated.sampled_logprobs, atol=1e-5)
    ref = trainer_logprobs(model, shared, 0.9)
    assert ((ref - shared.sampled_logprobs).abs() * shared.completion_mask).max() < 1e-4
