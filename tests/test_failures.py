"""Failure handling without ranks: fault specs, NaN-step bookkeeping, the signal handler, and the
one-time error report (the multi-rank behaviour is in test_checkpoint_multirank.py)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from grpo_ds.checkpoint import RunState
from grpo_ds.failures import (
    NonFiniteError,
    check_bad_steps,
    count_bad_step,
    nan_gradient_loss,
    report_failure,
)
from grpo_ds.faults import fault


def test_fault_spec(monkeypatch):
    monkeypatch.setenv("GRPO_DS_FAULT", "raise@2:1, nan@2-3")
    assert fault("raise", 2, 1) and not fault("raise", 2, 0) and not fault("raise", 3, 1)
    assert fault("nan", 2, 0) and fault("nan", 3, 1) and not fault("nan", 4, 0)
    monkeypatch.delenv("GRPO_DS_FAULT")
    assert not fault("raise", 2, 1)


def test_a_nan_loss_without_a_nan_gradient_is_made_to_have_one():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    logprobs = weight * torch.tensor([3.0, 4.0])
    # A NaN term that carries no gradient: the loss is NaN, the gradient is finite (3, 4).
    loss = logprobs.sum() + float("nan")
    loss.backward(retain_graph=True)
    assert torch.isfinite(weight.grad).all()
    weight.grad = None
    nan_gradient_loss(loss, logprobs).backward()
    assert torch.isnan(weight.grad).all()  # ZeRO-3's invalid-norm check now skips the step
    finite = logprobs.sum()
    assert nan_gradient_loss(finite, logprobs) is finite


def test_bad_steps_are_counted_in_total_and_in_a_row():
    state = RunState()
    for step, bad in enumerate([True, True, False, True], start=1):
        state.step = step
        total = count_bad_step(state, bad, float("nan") if bad else 0.5)
    assert (total, state.bad_steps_in_a_row) == (3, 1)
    check_bad_steps(state, max_bad=2, last_checkpoint=None)  # 1 in a row < 2: carry on
    state.step, _ = 5, count_bad_step(state, True, float("nan"))
    with pytest.raises(NonFiniteError, match=r"steps 4\.\.5 .* last checkpoint, /x/step_000003"):
        check_bad_steps(state, max_bad=2, last_checkpoint="/x/step_000003")


def test_a_nan_loss_the_optimizer_applied_is_an_error():
    with pytest.raises(NonFiniteError, match="only ZeRO stage 3"):
        count_bad_step(RunState(), bad=False, loss=float("inf"))


def test_failure_report_prints_the_traceback_once_and_keeps_it(tmp_path, capsys):
    try:
        raise ValueError("bad reward")
    except ValueError as err:
        report_failure(err, 1, tmp_path)  # no process group: this rank counts as the first
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "[rank1]: ValueError: bad reward" in err
    assert "grpo-ds: rank 1 failed: ValueError: bad reward" in err
    assert "ValueError: bad reward" in (tmp_path / "failure.txt").read_text()


SIGNALS = """
import os, signal, sys, time
import grpo_ds.failures as f
stop = f.StopRequest(rank=0).install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # within the grace period: the same request
print("requested", stop.requested, flush=True)
time.sleep(f.GRACE_SECONDS + 0.5)
if sys.argv[1] == "twice":
    os.kill(os.getpid(), signal.SIGINT)  # a real second signal: exit at once
    time.sleep(5)
print("alive", flush=True)
"""


@pytest.mark.parametrize("mode", ["once", "twice"])
def test_first_signal_requests_a_stop_a_later_one_exits_at_once(mode):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SIGNALS), mode],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "requested True" in result.stdout
    assert "finishing this step, saving a checkpoint" in result.stderr
    if mode == "once":
        assert result.returncode == 0 and "alive" in result.stdout
    else:
        assert result.returncode == -2 and "alive" not in result.stdout  # killed by SIGINT


def test_rows_sampled_from_non_finite_logits_are_counted():
    from grpo_ds.failures import broken_sampling_rows

    nan = float("nan")
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    healthy = torch.tensor([[-1.0, -2.0, nan], [-1.0, -1.0, -1.0]])
    assert broken_sampling_rows(healthy, mask) == 0  # a NaN past the end of a completion is padding
    broken = torch.tensor([[-1.0, nan, -1.0], [-1.0, -1.0, nan]])
    assert broken_sampling_rows(broken, mask) == 2
