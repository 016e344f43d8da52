"""Call every reward function on one batch of completions and check what comes back.

    rewards_per_func [N, F] float32, N = B*G completions, F = reward functions;
    NaN where a function returned None ("not applicable to this sample").

Each function is called once on the whole batch BY KEYWORD, as TRL's GRPOTrainer calls it:
`fn(prompts=..., completions=..., completion_ids=..., <every dataset column>=..., trainer_state=...)`.
`columns` maps a dataset column (or `completion_ids`) to a list aligned with `completions`;
`shared` holds arguments that are the same for the whole batch (`trainer_state`). An `async def`
function (or one that returns an awaitable) is awaited; several are awaited together, as TRL
does, so their latency overlaps. Whatever a function returns is validated: one entry per
completion, each a real number, a bool (True -> 1.0) or None. NaN and inf are refused because
NaN already means None here.

When a function raises on the batch, it is called again one sample at a time to find the sample
that fails (so side effects in a reward function can run twice). With on_error="raise" the error
names the function and that sample; with on_error="skip" failing samples get None and are
counted in `rewards/{name}/errors`. A function may also report a sample it could not score (a
grader timeout) by returning `FailedReward()` for it: that counts as its value (0.0) and as an
error, whatever on_error says.

Weighting, summing and group normalisation happen in grpo_ds/advantages.py, not here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from grpo_ds.rewards.failure import FailedReward

logger = logging.getLogger(__name__)

_SHOWN_CHARS = 200
# Keyword arguments the trainer itself passes; a dataset column of one of these names would clash.
RESERVED_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state")


class RewardError(RuntimeError):
    """A reward function that raised or returned something other than one number per completion."""


def compute_rewards(
    funcs: Sequence[Callable],
    names: Sequence[str],
    prompts: Sequence,
    completions: Sequence,
    columns: dict[str, Sequence],
    *,
    on_error: str = "raise",
    shared: dict | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """rewards_per_func [N, F] (NaN for None) and stats: rewards/{name}/{mean,std,errors}.

    mean and std (population, over the non-None rewards) are left out when every entry is None.
    """
    shared = shared or {}
    _check_inputs(funcs, names, prompts, completions, columns, on_error, shared)
    num_completions = len(completions)
    rewards_per_func = torch.full((num_completions, len(funcs)), math.nan, dtype=torch.float32)
    stats: dict[str, float] = {}
    outcomes = _call_all(funcs, _batch_kwargs(prompts, completions, columns, shared))
    for j, (function, name, outcome) in enumerate(zip(funcs, names, outcomes)):
        if isinstance(outcome, _Raised):
            values, num_errors = _call_per_sample(function, name, prompts, completions, columns,
                                                  shared, on_error, outcome.error)
        else:
            values, num_errors = _validated(outcome, name, num_completions, first_index=0), 0
        rewards_per_func[:, j] = torch.tensor(
            [math.nan if v is None else v for v in values], dtype=torch.float32
        )
        num_errors += sum(isinstance(v, FailedReward) for v in values)
        stats[f"rewards/{name}/errors"] = float(num_errors)
        present = [v for v in values if v is not None]
        if present:
            mean = sum(present) / len(present)
            stats[f"rewards/{name}/mean"] = mean
            stats[f"rewards/{name}/std"] = math.sqrt(
                sum((v - mean) ** 2 for v in present) / len(present)
            )
    return rewards_per_func, stats


def call_reward(function: Callable, **kwargs):
    """`function(**kwargs)`, awaited when it is async: for calls outside `compute_rewards`."""
    result = function(**kwargs)
    return asyncio.run(_awaited(result)) if inspect.isawaitable(result) else result


def trainer_state(global_step: int, max_steps: int, *, epoch: float | None = None,
                  train_batch_size: int | None = None, is_world_process_zero: bool = True):
    """A `transformers.TrainerState`, the object TRL passes as `trainer_state`.

    global_step counts the GRPO steps already completed (0 while the first step is scored, as in
    TRL), so a curriculum reward can read `trainer_state.global_step / trainer_state.max_steps`.
    """
    from transformers import TrainerState  # only where rewards are scored: a slow import

    return TrainerState(global_step=global_step, max_steps=max_steps, epoch=epoch,
                        train_batch_size=train_batch_size,
                        is_local_process_zero=is_world_process_zero,
                        is_world_process_zero=is_world_process_zero)


def _check_inputs(funcs, names, prompts, completions, columns, on_error, shared) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if len(funcs) != len(names):
        raise ValueError(f"got {len(funcs)} reward functions but {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique (they key the stats), got {list(names)}")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    for column, values in columns.items():
        if column in ("prompts", "completions") or column in shared:
            raise ValueError(
                f"column {column!r} clashes with the reward function argument of that name"
            )
        if len(values) != len(completions):
            raise ValueError(
                f"column {column!r} has {len(values)} entries but there are {len(completions)} "
                "completions (repeat each prompt's columns once per completion)"
            )


class _Raised:
    """What a call raised, kept so the failing sample can be looked for afterwards."""

    def __init__(self, error: Exception):
        self.error = error


def _batch_kwargs(prompts, completions, columns, shared) -> dict:
    return {"prompts": list(prompts), "completions": list(completions),
            **{k: list(v) for k, v in columns.items()}, **shared}


def _call_all(funcs, kwargs: dict) -> list:
    """Each function's result on the batch, or _Raised; async ones are awaited together."""
    outcomes, pending = [], {}
    for j, function in enumerate(funcs):
        try:
            # Fresh lists per function: one that edits its arguments cannot change the next's.
            result = function(**{k: list(v) if isinstance(v, list) else v
                                 for k, v in kwargs.items()})
        except Exception as error:  # noqa: BLE001 (any failure: locate the sample later)
            result = _Raised(error)
        if inspect.isawaitable(result):
            pending[j] = result
        outcomes.append(result)
    if pending:
        for j, result in zip(pending, asyncio.run(_gathered(list(pending.values())))):
            outcomes[j] = result
    return outcomes


async def _awaited(awaitable):
    return await awaitable


async def _gathered(awaitables: list) -> list:
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # KeyboardInterrupt, SystemExit: not a reward failure
    return [_Raised(r) if isinstance(r, Exception) else r for r in results]


def _call_per_sample(function, name, prompts, completions, columns, shared, on_error,
                     batch_error):
    """Find the samples a function fails on by calling it on each one alone."""
    values: list[float | None] = []
    num_errors = 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            raw = call_reward(function, prompts=[prompt], completions=[completion],
                              **{k: [v[i]] for k, v in columns.items()}, **shared)
        except Exception as error:
            if on_error == "raise":
                raise RewardError(
                    f"reward function {name!r} raised {type(error).__name__}: {error} "
                    f"on sample {i}: prompt={_shown(prompt)}, completion={_shown(completion)}"
                ) from error
            values.append(None)
            num_errors += 1
            continue
        values.extend(_validated(raw, name, 1, first_index=i))
    if num_errors == 0:
        # Every sample passes alone: the function breaks on batches (or is flaky).
        message = (
            f"reward function {name!r} raised {type(batch_error).__name__}: {batch_error} "
            f"on the batch of {len(completions)} completions, but not on any single one"
        )
        if on_error == "raise":
            raise RewardError(message) from batch_error
        logger.warning("%s; using the per-sample rewards", message)
    return values, num_errors


def _validated(raw, name: str, expected: int, *, first_index: int) -> list[float | None]:
    """`raw` as a list of floats or None, or a RewardError naming the function and the sample."""
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):  # torch tensor, numpy array
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise RewardError(
            f"reward function {name!r} returned {type(raw).__name__}, expected a list of "
            f"{expected} floats (one per completion)"
        )
    if len(raw) != expected:
        raise RewardError(
            f"reward function {name!r} returned {len(raw)} values, expected {expected} "
            "(one per completion)"
        )
    values: list[float | None] = []
    for offset, value in enumerate(raw):
        if value is None:
            values.append(None)
            continue
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(
                f"reward function {name!r} returned {_shown(value)} ({type(value).__name__}) "
                f"for sample {first_index + offset}; expected a finite float, a bool or None"
            )
        # bool is an Integral, so True -> 1.0; a FailedReward stays marked, to be counted.
        values.append(value if isinstance(value, FailedReward) else float(value))
    return values


def _shown(value, limit: int = _SHOWN_CHARS) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
