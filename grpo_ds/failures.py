"""Stopping a multi-rank run cleanly: preemption signals, NaN/inf steps, and a rank that fails.

Preemption. The first SIGTERM or SIGINT only sets a flag. The loop finishes the step it is in; then
all ranks agree (one all-reduce of the flag per step, because a signal may reach only some ranks),
save a checkpoint together, and exit with PREEMPTED_EXIT_CODE = 143 = 128 + SIGTERM: the code a
shell reports for "terminated by SIGTERM", which schedulers treat as a restartable stop rather
than a bug (Kubeflow's `restartPolicy: ExitCode` retries exit codes >= 128 and fails 1-127; a
SLURM or shell requeue wrapper can test for 143). A repeated signal arriving within GRACE_SECONDS
counts as the same request: DeepSpeed's launcher, when it is signalled itself, SIGTERMs every rank
again right away. A later signal exits at once (the process dies by that signal).

Non-finite steps. ZeRO-3 already discards an optimizer step whose global gradient norm is NaN/inf
(stage3.py `step` -> `is_invalid_grad_norm`): it zeroes the gradients, leaves weights, Adam moments
and the LR schedule untouched, and counts `engine.skipped_steps` - on every rank, since the norm is
all-reduced. A non-finite loss does not always make a non-finite gradient (a NaN under a zero mask
does not), so `nan_gradient_loss` turns it into one. Non-finite logits met while sampling (weights
gone non-finite) make NaN advantages (`broken_sampling_rows`), so that step is skipped the same
way. The loop counts skipped steps and aborts after `checkpoint.max_bad_steps` in a row, keeping
the last checkpoint.

A failing rank. Its traceback is printed once, rank-prefixed, by the first rank to fail (claimed
through the job's rendezvous store) and kept in `<run_dir>/failure.txt`; ranks that fail after it
(usually "Connection closed by peer" inside a collective) print one line. Each then leaves with
os._exit, so no rank lingers in teardown; DeepSpeed's launcher sees a non-zero exit and stops the
others (SIGTERM, then SIGKILL after 30 s), so the job ends within a bounded time.

Test-only faults (GRPO_DS_FAULT) live apart, in faults.py and hooks.py.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

PREEMPTED_EXIT_CODE = 143
GRACE_SECONDS = 2.0


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient."""


class StopRequest:
    """The preemption flag: set by SIGTERM/SIGINT, read once per step by the loop."""

    def __init__(self, rank: int):
        self.rank = rank
        self.requested = False
        self.first_at = 0.0

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self.first_at = True, now
            print(f"[rank{self.rank}]: {signal.Signals(signum).name}: finishing this step, saving "
                  f"a checkpoint, then exiting with {PREEMPTED_EXIT_CODE} (signal again to exit "
                  "at once)", file=sys.stderr, flush=True)
        elif now - self.first_at > GRACE_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def agree(stop: bool, bad: bool, device) -> tuple[bool, bool]:
    """(any rank asked to stop, any rank saw a bad step): one all-reduce, so all ranks act alike."""
    import deepspeed.comm as dist

    flags = torch.tensor([float(stop), float(bad)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item())


def nan_gradient_loss(loss: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """`loss` if it is finite, else a loss whose gradient is NaN for every parameter the forward
    used, so that ZeRO-3's invalid-norm check discards the step on every rank."""
    if torch.isfinite(loss).all():
        return loss
    return logprobs.sum() * float("nan")


def broken_sampling_rows(sampled_logprobs: torch.Tensor, completion_mask: torch.Tensor) -> int:
    """The number of rows [B*G] whose sampled log-probs [B*G, Tc] are NaN on real tokens: the
    sampler met non-finite logits there (rollout/sampling.py), so their tokens are not the
    policy's. If any, the step must not train: the loop makes the advantages NaN, which gives a
    NaN loss that ZeRO-3 skips on every rank and counts like any NaN loss
    (checkpoint.max_bad_steps)."""
    return int((sampled_logprobs.isnan() & completion_mask.bool()).any(-1).sum())


def count_bad_step(state, bad: bool, loss: float) -> int:
    """Count a step ZeRO-3 skipped (all ranks agree on `bad`); returns the total so far."""
    if not bad and not math.isfinite(loss):
        raise NonFiniteError(
            "the loss was NaN/inf and the optimizer still applied the step: only ZeRO stage 3 "
            "discards non-finite steps; use a stage-3 DeepSpeed preset")
    state.bad_steps_in_a_row = state.bad_steps_in_a_row + 1 if bad else 0
    state.nan_skipped_steps += int(bad)
    return state.nan_skipped_steps


def check_bad_steps(state, max_bad: int, last_checkpoint) -> None:
    """Abort after `max_bad` skipped steps in a row, pointing at the checkpoint to go back to."""
    if state.bad_steps_in_a_row < max_bad:
        return
    first = state.step - state.bad_steps_in_a_row + 1
    kept = (f"the last checkpoint, {last_checkpoint}, is from before them"
            if last_checkpoint else "no checkpoint was saved before them")
    raise NonFiniteError(
        f"steps {first}..{state.step} all had a NaN/inf loss or gradient and were skipped "
        f"(checkpoint.max_bad_steps={max_bad}): stopping. The weights were not updated by those "
        f"steps; {kept}. Look at the rewards and advantages of these steps, lower train.lr, or "
        "resume with another train.seed.")


# ---------------------------------------------------------------------------------------------
# a rank that fails


def first_to_fail(rank: int) -> bool:
    """True for the first rank of the job to call this (a counter in the rendezvous store)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except (ImportError, RuntimeError, ValueError):  # no process group yet: nobody to ask
        return True
    try:
        return without_stderr(lambda: store.add("grpo_ds/failed_ranks", 1)) == 1
    except Exception:  # noqa: BLE001
        # The store lives in rank 0's process; it is gone only once rank 0 has exited, and
        # rank 0 exits early only after failing (and claiming) first.
        return rank == 0


def without_stderr(fn):
    """fn() with file descriptor 2 silenced: torch's store client prints a C++ stack trace there
    before raising when the store (in rank 0's process) is gone, which would bury the real error."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        return fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def report_failure(err: BaseException, rank: int, run_dir: str | Path) -> None:
    """Print the error once for the job: the first rank in full, the others one line."""
    summary = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if first_to_fail(rank):
        text = "".join(traceback.format_exception(err))
        sys.stderr.write("".join(f"[rank{rank}]: {line}\n" for line in text.splitlines()))
        where = Path(run_dir) / "failure.txt"
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text(f"rank {rank} failed:\n{text}")
        except OSError:
            where = None
        sys.stderr.write(f"grpo-ds: rank {rank} failed: {summary[:500]}"
                         + (f" (traceback above and in {where})\n" if where else "\n"))
    else:
        sys.stderr.write(f"grpo-ds: rank {rank} stopped too ({summary[:120]}); another rank "
                         "failed first and its error is printed in full\n")
    sys.stderr.flush()


def run_rank(body, rank: int, run_dir: str | Path) -> int:
    """Run `body()` and return its exit code; on an exception, report it once and exit at once."""
    try:
        return body()
    except BaseException as err:  # KeyboardInterrupt too
        if isinstance(err, SystemExit):
            raise
        report_failure(err, rank, run_dir)
        sys.stdout.flush()
        # os._exit: interpreter teardown may wait on a collective or a writer thread forever.
        os._exit(130 if isinstance(err, KeyboardInterrupt) else 1)


def rank_processes(launcher_pid: int) -> list:
    """The training ranks under a local `deepspeed` launcher (psutil comes with DeepSpeed)."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for child in children:
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        # `python -m grpo_ds.train`: the launcher itself has `--module ... grpo_ds.train`.
        if any(a == "-m" and b == "grpo_ds.train" for a, b in itertools.pairwise(args)):
            ranks.append(child)
    return ranks
