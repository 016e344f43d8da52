"""Bad inputs that can only show at run time: real 1-rank jobs, each must end cleanly and say why.

The pre-launch table is tests/test_fuzz.py; these cost a launch each, so they are few.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multirank

REPO = Path(__file__).resolve().parents[1]
TINY = ["--deepspeed.num_gpus=1", "--train.prompts_per_step=2", "--rollout.group_size=2",
        "--train.micro_batch_size=4", "--rollout.max_new_tokens=4", "--task.eval_size=8",
        "--train.eval_every=0", "--warmup.max_steps=2", "--warmup.eval_every=2",
        "--warmup.batch_size=8", "--output.log_samples_every=0", "--output.quiet=true"]
RAISING_REWARD = "def fn(prompts, completions, **kwargs):\n    raise ValueError('reward exploded')\n"


def train(run_dir: Path, *args: str, timeout: int = 400) -> tuple[int, str, float]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "grpo_ds.cli", "train", *TINY,
                           f"--output.run_dir={run_dir}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    return done.returncode, done.stdout + done.stderr, time.time() - started


def test_weights_gone_non_finite_stop_after_max_bad_steps_keeping_a_checkpoint(tmp_path):
    # lr=1e30 is finite, so it passes validation; the first real update blows the weights up,
    # the sampler then meets NaN logits (an IndexError before), and the steps are skipped.
    code, out, took = train(tmp_path / "run", "--train.lr=1e30", "--train.steps=12",
                            "--checkpoint.save_every=1", "--checkpoint.max_bad_steps=2")
    assert code == 1 and "launching" in out, out[-3000:]
    assert "all had a NaN/inf loss or gradient" in out and "checkpoint.max_bad_steps=2" in out
    assert "IndexError" not in out and took < 400
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_a_reward_function_that_raises_is_named(tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text(RAISING_REWARD)
    code, out, took = train(tmp_path / "run", f"--rewards.functions={reward}:fn",
                            "--train.steps=2")
    assert code == 1 and "launching" in out, out[-3000:]
    assert "reward exploded" in out and "fn" in out and took < 400
    assert (tmp_path / "run" / "failure.txt").is_file()
