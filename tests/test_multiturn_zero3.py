"""MultiTurnRollout under real 2-rank ZeRO-3 (deepspeed launcher, CPU, gloo): episodes that end
after very different numbers of turns on the two ranks must not hang them."""

import json
import os
import subprocess
import sys

import pytest

from tests.multirank import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "multiturn_zero3.py")


@pytest.mark.multirank
def test_ranks_whose_episodes_end_after_different_turns_do_not_hang(tmp_path):
    out = tmp_path / "facts.json"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT,
           "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                              cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        phases = [l for l in (exc.stdout or b"").decode().splitlines() if "PHASE" in l]
        pytest.fail(f"2-rank multi-turn rollout hung; completed phases: {phases}")
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        pytest.fail(f"2-rank multi-turn script failed with exit code {proc.returncode}")
    rank0, rank1 = json.loads(out.read_text())
    for phase in ("uneven_full", "uneven_layers", "uneven_layers_reencode"):
        assert rank0[phase]["turns"] == [1] * 4, phase  # ended after the first turn
        assert rank1[phase]["turns"] == [6] * 4, phase  # six model turns each
        # the same number of generate calls (collective gathers) on both ranks
        assert rank0[phase]["generate_calls"] == rank1[phase]["generate_calls"] == 6, phase
        assert rank1[phase]["own"] == [18] * 4  # 6 turns x 3 own tokens; observations not own
        assert all(n > 18 for n in rank1[phase]["lengths"])
    # the same episodes, token for token, whether each turn extends the KV cache or re-encodes
    for rank in (rank0, rank1):
        assert rank["uneven_layers"] == rank["uneven_layers_reencode"]
    assert rank0["empty_rank"]["turns"] == [] and rank1["empty_rank"]["turns"] == [6] * 4
    assert rank0["empty_rank"]["generate_calls"] == 6
