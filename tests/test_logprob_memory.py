"""Chunked log-probs hold O(chunk x vocab) memory, whatever the number of positions.

Measured as the process's RSS high-water mark (grpo_ds.tools.bench.memory_worker's logprob worker, in
a fresh process), for 256 and 1024 positions: full logits grow 4x with the positions, chunks
must not grow, with or without entropy in the graph.
"""

import json
import os
import subprocess
import sys

import pytest

from grpo_ds.tools.bench.memory import MALLOC_FOLLOWS_LIVE_MEMORY


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    out = tmp_path_factory.mktemp("logprobs") / "peaks.json"
    cmd = [sys.executable, "-m", "grpo_ds.tools.bench.memory_worker", "--logprob-worker",
           "--out", str(out), "--logprob-shape", "256+1024,32000,64", "--chunks", "64"]
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL,
                   env={**os.environ, **MALLOC_FOLLOWS_LIVE_MEMORY})
    report = json.loads(out.read_text())
    return {rows: {name: {mode: v["peak_extra_bytes"] for mode, v in modes.items()}
                   for name, modes in variants.items()}
            for rows, variants in report["rows"].items()}


def test_full_logits_grow_with_positions(peaks):
    # the measurement sees growth when there is some: 4x the positions, about 4x the bytes
    assert peaks["1024"]["naive"]["backward"] > 3 * peaks["256"]["naive"]["backward"]


@pytest.mark.parametrize("mode", ["forward", "backward", "backward_entropy"])
def test_chunks_do_not_grow_with_positions(peaks, mode):
    small, large = peaks["256"]["64"][mode], peaks["1024"]["64"][mode]
    assert large < 1.5 * small, (small, large)
    assert large < peaks["1024"]["naive"][mode] / 2
