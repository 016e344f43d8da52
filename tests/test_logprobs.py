"""Token log-probs: hand values, chunked == direct (values and gradients), memory behaviour."""

import math

import pytest
import torch

from grpo_ds.logprobs import fused_token_logprobs, logits_to_token_logprobs, token_logprobs

H, V = 6, 50  # H != V so that the projection weight [V, H] is not mistaken for logits [.., V]


def test_reference_by_hand():
    # logits [0, 0, ln 2] -> probabilities [1, 1, 2] / 4 = [.25, .25, .5]
    # log p(2) = ln .5, log p(0) = ln .25; entropy = -(2 * .25 ln .25 + .5 ln .5) = 1.5 ln 2
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)]]], dtype=torch.float64)
    logprobs, entropy = logits_to_token_logprobs(logits, torch.tensor([[2, 0]]), with_entropy=True)
    assert logprobs[0].tolist() == pytest.approx([math.log(0.5), math.log(0.25)])
    assert entropy[0].tolist() == pytest.approx([1.5 * math.log(2)] * 2)
    # temperature 2: logits [0, 0, ln 2 / 2] -> weights [1, 1, sqrt 2], p(2) = sqrt2 / (2 + sqrt2)
    logprobs, none = logits_to_token_logprobs(logits, torch.tensor([[2, 0]]), temperature=2.0)
    assert none is None
    r2 = math.sqrt(2)
    assert logprobs[0].tolist() == pytest.approx([math.log(r2 / (2 + r2)), math.log(1 / (2 + r2))])


def test_reference_matches_torch_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, V, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (3, 4))
    logprobs, entropy = logits_to_token_logprobs(logits, targets, 0.7, with_entropy=True)
    dist = torch.distributions.Categorical(logits=logits / 0.7)
    torch.testing.assert_close(logprobs, dist.log_prob(targets))
    torch.testing.assert_close(entropy, dist.entropy())


def test_fused_gradient_by_hand():
    # d log p_t / d logit_v = (1[v == t] - p_v) / temperature
    # logits [0, 0, ln 2], target 2: p = [.25, .25, .5] -> gradient [-.25, -.25, .5]
    logits = torch.tensor([[0.0, 0.0, math.log(2)]], dtype=torch.float64, requires_grad=True)
    logprobs, _ = fused_token_logprobs(logits, torch.tensor([2]))
    logprobs.sum().backward()
    assert logits.grad[0].tolist() == pytest.approx([-0.25, -0.25, 0.5])
    # temperature 2: p = [1, 1, sqrt 2] / (2 + sqrt 2); an upstream gradient of 3 scales it all
    logits.grad = None
    logprobs, _ = fused_token_logprobs(logits, torch.tensor([2]), temperature=2.0)
    (3 * logprobs).sum().backward()
    r2 = math.sqrt(2)
    p = [1 / (2 + r2), 1 / (2 + r2), r2 / (2 + r2)]
    assert logits.grad[0].tolist() == pytest.approx([3 * (0 - p[0]) / 2, 3 * (0 - p[1]) / 2,
                                                     3 * (1 - p[2]) / 2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_matches_autograd_through_the_reference(dtype, temperature, with_entropy):
    torch.manual_seed(0)
    logits = (torch.randn(9, V) * 4).to(dtype)
    targets = torch.randint(0, V, (9,))
    weights = torch.linspace(-1, 2, 9)  # an upstream gradient that differs per row
    results = []
    for fn in (logits_to_token_logprobs, fused_token_logprobs):
        leaf = logits.clone().requires_grad_(True)
        # the reference upcasts inside, so both see the same float32 (or float64) arithmetic
        logprobs, entropy = fn(leaf, targets, temperature, with_entropy=with_entropy)
        (weights.to(logprobs.dtype) * logprobs).sum().backward()
        results.append((logprobs.detach(), entropy, leaf.grad))
    (want, want_entropy, want_grad), (got, got_entropy, got_grad) = results
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert got.dtype == want.dtype and got_grad.dtype == dtype
    # bf16 gradients: each rounded once from the same float32 value, or one bf16 step apart
    grad_tol = 1e-2 if dtype == torch.bfloat16 else tol
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=grad_tol, atol=grad_tol)
    if with_entropy:
        assert not got_entropy.requires_grad
        torch.testing.assert_close(got_entropy, want_entropy, rtol=tol, atol=tol)
    else:
        assert got_entropy is None and want_entropy is None


def test_fused_keeps_one_float32_block_for_backward():
    # autograd through the reference keeps several [n, V] tensors; the fused function one
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(7, V, dtype=dtype, requires_grad=True)
        saved = []

        def pack(tensor, saved=saved):
            if tensor.dim() == 2 and tensor.shape[-1] == V:
                saved.append((tuple(tensor.shape), tensor.dtype))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fused_token_logprobs(logits, torch.randint(0, V, (7,)), with_entropy=True)
        assert saved == [((7, V), torch.float32)]


def setup(dtype, n=3, t=5, seed=0):
    torch.manual_seed(seed)
    project = torch.nn.Linear(H, V, bias=False).to(dtype)
    hidden = torch.randn(n, t, H, dtype=dtype) * 2
    targets = torch.randint(0, V, (n, t))
    return project, hidden, targets


def run(fn, project, hidden, targets):
    """Values (log-probs, entropy) and gradients wrt hidden and the weight of a log-prob loss."""
    hidden = hidden.clone().requires_grad_(True)
    project.zero_grad()
    logprobs, entropy = fn(hidden, targets)
    assert not entropy.requires_grad  # a metric: no graph, so no backward work over the vocab
    w = torch.linspace(-1, 1, logprobs.numel(), dtype=logprobs.dtype).reshape(logprobs.shape)
    (w * logprobs).sum().backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, project.weight.grad.clone()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 64])  # N*T = 15: 4 and 7 do not divide it
def test_chunked_equals_direct(dtype, tol, chunk_size):
    project, hidden, targets = setup(dtype)
    direct = run(lambda h, t: logits_to_token_logprobs(project(h), t, 0.8, with_entropy=True),
                 project, hidden, targets)
    chunked = run(lambda h, t: token_logprobs(h, project, t, temperature=0.8,
                                              chunk_size=chunk_size, with_entropy=True),
                  project, hidden, targets)
    for got, want in zip(chunked, direct):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert chunked[0].dtype == dtype and chunked[0].shape == (3, 5)


def test_bf16_model_gives_float32_logprobs():
    project, hidden, targets = setup(torch.bfloat16)
    logprobs, entropy = token_logprobs(hidden, project, targets, chunk_size=4)
    assert logprobs.dtype == torch.float32 and entropy is None
    # Same as upcasting the bf16 logits of the whole batch at once.
    want, _ = logits_to_token_logprobs(project(hidden).float(), targets)
    torch.testing.assert_close(logprobs, want)


def test_no_grad_path_has_no_graph():
    project, hidden, targets = setup(torch.float32)
    with torch.no_grad():
        logprobs, _ = token_logprobs(hidden, project, targets, chunk_size=4)
    assert not logprobs.requires_grad


def saved_logits_bytes(fn, hidden, targets):
    """Bytes autograd saves for backward in tensors whose last dim is V (logits-shaped)."""
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.dim() >= 1 and tensor.shape[-1] == V:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs, entropy = fn(hidden.clone().requires_grad_(True), targets)
    return total, logprobs, entropy


def test_chunked_saved_memory_does_not_grow_with_the_batch():
    chunk = 4
    naive_bytes, chunked_bytes = [], []
    for n in (4, 8):  # double the batch
        project, hidden, targets = setup(torch.float32, n=n, t=6)
        naive, *_ = saved_logits_bytes(
            lambda h, t, p=project: logits_to_token_logprobs(p(h), t, with_entropy=True),
            hidden, targets)
        chunked, logprobs, _ = saved_logits_bytes(
            lambda h, t, p=project: token_logprobs(h, p, t, chunk_size=chunk, with_entropy=True),
            hidden, targets)
        assert logprobs.requires_grad
        naive_bytes.append(naive)
        chunked_bytes.append(chunked)
    # naive keeps float32 [N*T, V] logits (several copies) for backward: 24 more rows cost at
    # least 24 * V * 4 bytes more (here 5 copies; the constant rest is the [H, V] weight transpose)
    assert naive_bytes[1] - naive_bytes[0] >= 24 * V * 4
    # chunked: the same for both batch sizes, at most a chunk's worth (checkpoint keeps only the
    # chunk's inputs; backward recomputes the logits one chunk at a time, see the next test)
    assert chunked_bytes[0] == chunked_bytes[1] <= 3 * chunk * V * 4


def test_backward_recomputes_one_chunk_at_a_time():
    project, hidden, targets = setup(torch.float32, n=4, t=5)  # 20 rows, chunks of 6: 6,6,6,2
    rows_seen, in_backward = [], [False]

    def counting_project(h):
        rows_seen.append((in_backward[0], h.shape[0]))
        return project(h)

    hidden = hidden.requires_grad_(True)
    logprobs, _ = token_logprobs(hidden, counting_project, targets, chunk_size=6)
    in_backward[0] = True
    logprobs.sum().backward()
    assert rows_seen == [(False, 6), (False, 6), (False, 6), (False, 2),
                         (True, 2), (True, 6), (True, 6), (True, 6)]


def test_rejects_bad_arguments():
    project, hidden, targets = setup(torch.float32)
    with pytest.raises(ValueError):
        token_logprobs(hidden, project, targets[:, :2])
    with pytest.raises(ValueError):
        token_logprobs(hidden, project, targets, chunk_size=0)
    with pytest.raises(ValueError):
        logits_to_token_logprobs(project(hidden), targets, temperature=0.0)
