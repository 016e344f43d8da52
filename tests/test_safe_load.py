"""A crafted checkpoint runs no code: export, resume and DeepSpeed's own loaders refuse it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_ds.export import main as export_main
from grpo_ds.safe_load import UnsafeCheckpointError, safe_checkpoint_loading, safe_torch_load

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff the code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft(path: Path, marker: Path) -> Path:
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path


def test_the_crafted_file_does_run_code_under_plain_pickle(tmp_path):
    # Proof that the payload is real, so the refusals below mean something.
    marker = tmp_path / "pwned"
    torch.load(craft(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_safe_load_refuses_naming_the_file_and_the_type(tmp_path):
    marker = tmp_path / "pwned"
    path = craft(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt.*io\.open"):
        safe_torch_load(path, weights_only=False)
    assert not marker.exists()


def test_deepspeeds_checkpoint_engine_is_guarded_inside_the_context(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    path = craft(tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    with safe_checkpoint_loading(), pytest.raises(UnsafeCheckpointError, match="io.open"):
        TorchCheckpointEngine().load(str(path), map_location="cpu")  # passes weights_only=False
    assert not marker.exists()
    assert torch.load is not safe_torch_load  # restored afterwards


def test_deepspeeds_own_types_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                "exp_avg": torch.ones(3)}, path)
    state = safe_torch_load(path)
    assert state["zero_stage"] is ZeroStageEnum.weights
    assert state["loss_scaler"].cur_scale == 1.0
    assert torch.equal(state["exp_avg"], torch.ones(3))


def crafted_checkpoint(root: Path, marker: Path) -> Path:
    """A step directory that looks complete, whose DeepSpeed files carry the payload."""
    base = root / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    step = root / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        craft(step / name, marker)
    (step / "grpo_state.json").write_text(json.dumps({"step": 1, "model_path": str(base)}))
    (root / "checkpoints" / "latest").write_text("step_000001")
    return step


def test_export_refuses_a_crafted_checkpoint_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path / "run", marker)
    code = export_main([str(tmp_path / "run"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "refused to load" in err and "io.open" in err and "_states.pt" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


TINY = ["--deepspeed.num_gpus=1", "--train.prompts_per_step=2", "--rollout.group_size=2",
        "--train.micro_batch_size=4", "--rollout.max_new_tokens=4", "--task.eval_size=8",
        "--train.eval_every=0", "--warmup.max_steps=2", "--warmup.eval_every=2",
        "--warmup.batch_size=8", "--output.log_samples_every=0", "--output.quiet=true",
        "--checkpoint.save_every=1"]


def grpo_ds(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "grpo_ds.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.multirank
def test_real_checkpoint_round_trips_and_a_crafted_one_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    done = grpo_ds("train", f"--output.run_dir={run}", "--train.steps=1", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    step = run / "checkpoints" / "step_000001"
    assert (step / "grpo_rank_000.json").is_file() and not list(step.glob("grpo_rank_*.pt"))
    # The real files pass the allow-list: export and resume read them.
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    resumed = grpo_ds("train", f"--output.run_dir={run}", "--train.steps=2", "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    # Now a crafted model-states file in the checkpoint `latest` names.
    marker = tmp_path / "pwned"
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    craft(latest / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    refused = grpo_ds("train", f"--output.run_dir={run}", "--train.steps=3", "--resume", *TINY)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "refused to load" in out and "io.open" in out and "model_states.pt" in out
    shutil.rmtree(tmp_path / "hf")
    assert export_main([str(run), str(tmp_path / "hf")]) == 2
    assert not marker.exists()
