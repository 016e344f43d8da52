"""Call every reward function on one batch of completions and check what comes back.

    rewards_per_func [N, F] float32, N = B*G completions, F = reward functions;
    NaN where a function returned None ("not applicable to this sample").

Each function is called once on the whole batch as `fn(prompts, completions, **columns)`, the
TRL calling convention: `columns` maps a dataset column (or a trainer field such as
`completion_ids`) to a list aligned with `completions`. Whatever it returns is validated: one
entry per completion, each a real number, a bool (True -> 1.0) or None. NaN and inf are refused
because NaN already means None here.

When a function raises on the batch, it is called again one sample at a time to find the sample
that fails (so side effects in a reward function can run twice). With on_error="raise" the error
names the function and that sample; with on_error="skip" failing samples get None and are
counted in `rewards/{name}/errors`. A function may also report a sample it could not score (a
grader timeout) by returning `FailedReward()` for it: that counts as its value (0.0) and as an
error, whatever on_error says.

Weighting, summing and group normalisation happen in grpo_ds/advantages.py, not here.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from grpo_ds.rewards.failure import FailedReward

logger = logging.getLogger(__name__)

_SHOWN_CHARS = 200


class RewardError(RuntimeError):
    """A reward function that raised or returned something other than one number per completion."""


def compute_rewards(
    funcs: Sequence[Callable],
    names: Sequence[str],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, Sequence],
    *,
    on_error: str = "raise",
) -> tuple[torch.Tensor, dict[str, float]]:
    """rewards_per_func [N, F] (NaN for None) and stats: rewards/{name}/{mean,std,errors}.

    mean and std (population, over the non-None rewards) are left out when every entry is None.
    """
    _check_inputs(funcs, names, prompts, completions, columns, on_error)
    num_completions = len(completions)
    rewards_per_func = torch.full((num_completions, len(funcs)), math.nan, dtype=torch.float32)
    stats: dict[str, float] = {}
    for j, (function, name) in enumerate(zip(funcs, names)):
        values, num_errors = _call_reward(function, name, prompts, completions, columns, on_error)
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


def _check_inputs(funcs, names, prompts, completions, columns, on_error) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if len(funcs) != len(names):
        raise ValueError(f"got {len(funcs)} reward functions but {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique (they key the stats), got {list(names)}")
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    for column, values in columns.items():
        if column in ("prompts", "completions"):
            raise ValueError(
                f"column {column!r} clashes with the reward function argument of that name"
            )
        if len(values) != len(completions):
            raise ValueError(
                f"column {column!r} has {len(values)} entries but there are {len(completions)} "
                "completions (repeat each prompt's columns once per completion)"
            )


def _call_reward(function, name, prompts, completions, columns, on_error):
    """(one float or None per completion, number of samples whose call raised)."""
    try:
        raw = function(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
    except Exception as batch_error:  # noqa: BLE001 (any failure: locate the sample)
        return _call_per_sample(
            function, name, prompts, completions, columns, on_error, batch_error
        )
    return _validated(raw, name, len(completions), first_index=0), 0


def _call_per_sample(function, name, prompts, completions, columns, on_error, batch_error):
    """Find the samples a function fails on by calling it on each one alone."""
    values: list[float | None] = []
    num_errors = 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        try:
            raw = function([prompt], [completion], **{k: [v[i]] for k, v in columns.items()})
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
