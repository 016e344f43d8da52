"""The generation benchmark end to end on its --quick workload (2 ranks, ~30 s)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.multirank
def test_generation_bench_quick_prints_one_json_line():
    cmd = [sys.executable, "-m", "grpo_ds.tools.bench.generation", "--quick", "--json", "--repeats", "1",
           "--timeout", "240"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    no_eos, eos = report["scenarios"]["no_eos"], report["scenarios"]["eos"]
    w = report["workload"]
    # without EOS every method decodes exactly prompts * G * new tokens (both ranks), DeepSpeed's
    # rollout through our adapter too: it runs on Qwen2 (HF fallback), fails on Llama (CUDA)
    expected = 2 * w["prompts_per_rank"] * w["group_size"] * w["new_tokens"]
    for name in ("a", "a/layers", "a/unpacked", "b", "c", "d"):
        assert no_eos[name]["tokens"] == expected, name
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        assert "not been implemented on CPU" in no_eos["d/llama"]["error"]
    assert no_eos["a"]["x_vs_b"] > 0 and no_eos["a"]["x_vs_c"] > 0
    # the floor runs a's weight matmuls for the same tokens, and is compared with c like a;
    # the KV reads are the bytes ceiling.py counts, and floor+kv takes as long as the two
    floor, kv, both = no_eos["floor"], no_eos["kv_read"], no_eos["floor+kv"]
    assert floor["tokens"] == kv["tokens"] == both["tokens"] == expected
    assert 0 < floor["fraction_of_peak"] and floor["x_vs_c"] > both["x_vs_c"] > 0
    assert both["seconds"] == floor["seconds"] + kv["seconds"]
    from grpo_ds.tools.bench.ceiling import DecodeShape, kv_read_bytes

    shape = DecodeShape(w["prompts_per_rank"], w["group_size"], w["prompt_len"], w["new_tokens"],
                        w["layers"], w["hidden"])
    assert kv["bytes_per_rank"] == kv_read_bytes(shape, element_size=4)
    assert no_eos["a"]["x_vs_b_cpu"] > 0 and no_eos["a"]["cpu_seconds"] > 0
    # with EOS our two gather modes sample the same tokens (same seed), so count the same
    assert eos["a"]["tokens"] == eos["a/layers"]["tokens"] <= expected
    # c runs with EOS too: its useful tokens (through the first EOS) are its own samples'
    assert 0 < eos["c"]["tokens"] <= expected and eos["a"]["x_vs_c"] > 0
    assert "d" not in eos
