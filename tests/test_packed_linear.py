"""Linears on weights reordered once for oneDNN (CPU generation's matmuls)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from grpo_ds.cpu.packed_linear import linear, packed_linears, packing_supported
from grpo_ds.rollout import HybridRollout, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

needs_onednn = pytest.mark.skipif(packing_supported(nn.Linear(2, 2)) is not None,
                                  reason="no oneDNN on this torch build or CPU")
# bf16 weight copies need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; an AVX2-only CPU has neither
needs_onednn_bf16 = pytest.mark.skipif(
    packing_supported(nn.Linear(2, 2).to(torch.bfloat16)) is not None,
    reason="no oneDNN bf16 on this CPU")


def two_linears(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 32), nn.Linear(32, 16, bias=False)).to(dtype)


@needs_onednn
@pytest.mark.parametrize("dtype,tol", [
    (torch.float32, 1e-5), pytest.param(torch.bfloat16, 0.0, marks=needs_onednn_bf16)])
def test_packed_forward_matches_plain_linear(dtype, tol):
    model = two_linears(dtype)
    x = torch.randn(3, 5, 48, dtype=dtype)  # 3-D input: rows are the leading dims
    with torch.no_grad():
        plain = model(x)
        with packed_linears(model, rows_hint=15) as copied:
            packed = model(x)
            assert linear(model[0], x).shape == (3, 5, 32)
    assert copied == (48 * 32 + 32 + 32 * 16) * x.element_size()  # weights and the bias
    # bf16 results are bit-identical here; float32 differs in the last bits (summation order)
    assert torch.allclose(packed.float(), plain.float(), rtol=tol, atol=tol)


@needs_onednn
def test_forwards_and_attributes_come_back_after_the_block():
    model = two_linears()
    marker = model[1].forward = lambda x: x  # an instance forward someone set before us
    with torch.no_grad(), packed_linears(model, rows_hint=4):
        assert "forward" in model[0].__dict__
    assert "forward" not in model[0].__dict__ and model[1].forward is marker
    assert not any(name.startswith("_grpo") for m in model for name in vars(m))


def test_packing_supported_names_what_is_missing():
    assert "dtype" in packing_supported(nn.Linear(2, 2).half())
    assert "CPU" in packing_supported(nn.Linear(2, 2, device="meta"))
    assert "CPU" in packing_supported(nn.Identity())  # no parameters at all


def test_rollout_packs_where_supported_and_on_fails_where_not():
    from tests.test_rollout_engine import PAD, prompts, tiny_llama

    model = tiny_llama()
    params = SamplingParams(max_new_tokens=4)
    auto = HybridRollout(model, PAD).generate(prompts(), 2, params, seed=0)
    off = HybridRollout(model, PAD, packed_weights="off").generate(prompts(), 2, params, seed=0)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    supported = packing_supported(model) is None
    assert auto.metrics["packed_weight_bytes"] == (linear_bytes if supported else 0)
    assert off.metrics["packed_weight_bytes"] == 0
    with pytest.raises(ValueError, match="packed_weights='on' but .*dtype"):
        HybridRollout(tiny_llama().half(), PAD, packed_weights="on")
    with pytest.raises(ValueError, match="packed_weights must be one of"):
        HybridRollout(model, PAD, packed_weights="yes")


@needs_onednn
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases, partitioned too
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows", [4, 1100])  # a decode step, and a prefill above FUSE_MIN_ROWS
def test_forward_never_reads_the_partitioned_linear_weights(kind, fused, rows):
    # Under ZeRO-3 the rollout partitions each Linear again once its copy is made: the forward
    # must run on the copies alone. Emptying weights and biases as DeepSpeed's release does
    # shows it (a bias left empty failed in oneDNN: "could not create a primitive descriptor").
    from grpo_ds.cpu.fused_layers import FUSE_MIN_ROWS, fuse_decoder_layers
    from tests.test_rollout_engine import tiny_llama
    from tests.tiny_models import tiny_qwen2

    assert (rows >= FUSE_MIN_ROWS) == (rows == 1100)
    model = (tiny_llama() if kind == "llama" else tiny_qwen2()).eval()
    if fused:
        fuse_decoder_layers(model)
    ids = torch.randint(2, 32, (1, rows))
    params = [p for m in model.modules() if isinstance(m, nn.Linear)
              for p in m.parameters(recurse=False)]
    assert (kind == "qwen2") == any(p.dim() == 1 for p in params)  # biases only in Qwen2
    with torch.no_grad():
        expected = model(ids).logits
        with packed_linears(model, rows_hint=rows):
            whole = [p.data for p in params]
            for p in params:
                p.data = torch.empty(0)
            try:
                logits = model(ids).logits
            finally:
                for p, w in zip(params, whole):
                    p.data = w
    assert torch.allclose(logits, expected, atol=1e-4)


def zero3_qwen2_rollout(out: str) -> None:
    """One rank: a tiny Qwen2 under real ZeRO-3 (every parameter partitioned), its rollout with
    the full gather and packed weights against the same weights unpartitioned."""
    import copy
    import json
    import os

    import deepspeed

    from grpo_ds.engine import init_distributed
    from tests.test_rollout_engine import prompts
    from tests.tiny_models import tiny_qwen2

    os.environ["MASTER_PORT"] = sys.argv[3]
    init_distributed()
    model = tiny_qwen2()
    plain = copy.deepcopy(model).eval()
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    params = SamplingParams(max_new_tokens=6)
    ours = HybridRollout(engine.module, 0, gather="full", packed_weights="on").generate(
        prompts(), 2, params, seed=0)
    want = HybridRollout(plain, 0, packed_weights="on").generate(prompts(), 2, params, seed=0)
    Path(out).write_text(json.dumps({
        "same_tokens": ours.completion_ids.tolist() == want.completion_ids.tolist(),
        "packed_bytes": ours.metrics["packed_weight_bytes"]}))


@needs_onednn
def test_qwen2_biases_generate_under_zero3_with_packed_weights(tmp_path):
    from tests.multirank import free_port

    out = tmp_path / "facts.json"
    repo = Path(__file__).resolve().parents[1]
    # A script run by path has tests/ on sys.path, not the repo root it imports `tests.` from.
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "zero3", str(out), str(free_port())],
                          check=False, capture_output=True, text=True, timeout=300, cwd=repo,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    facts = json.loads(out.read_text())
    assert facts["same_tokens"] and facts["packed_bytes"] > 0


if __name__ == "__main__" and sys.argv[1] == "zero3":
    zero3_qwen2_rollout(sys.argv[2])
