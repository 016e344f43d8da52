"""Numbers a config field cannot work with, refused before launch by one generic check.

Driven by the fields' types, not by a list of cases: every float (a list's floats too) must be
finite, and every int must lie in [0, MAX_INT] (no int field has a meaning below 0, and larger
values overflow int32/int64 somewhere downstream: seeds, tensor sizes, socket ports). BOUNDS
narrows fields whose valid range is tighter. An unset optional (None) is not checked. Without
this, `--train.lr=inf` passed validation and crashed the rollout later with an IndexError, and
`--deepspeed.master_port=70000` raised a raw OverflowError.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class Bound:
    """low <= value <= high (low < value when low_open)."""

    low: float = 0
    high: float = MAX_INT
    low_open: bool = False

    def holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {_show(self.low)}"
        return f"in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}]"


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


POSITIVE = Bound(0, math.inf, low_open=True)
AT_LEAST_ONE = Bound(1)

# Tighter than the type's default; fields checked with their own message in config.validate
# (top_p, carry_drop, beta, ...) are not repeated here.
BOUNDS = {
    "deepspeed.num_gpus": AT_LEAST_ONE,
    "deepspeed.master_port": Bound(1, 65535),
    "model.hidden_size": AT_LEAST_ONE,
    "model.num_layers": AT_LEAST_ONE,
    "model.num_heads": AT_LEAST_ONE,
    "task.eval_size": AT_LEAST_ONE,
    "task.seed": Bound(0, 2**32 - 1),
    "train.seed": Bound(0, 2**32 - 1),
    "warmup.lr": POSITIVE,
    "warmup.zero_stage": Bound(0, 3),
    "data.max_prompt_length": AT_LEAST_ONE,
    "rollout.memory_budget_gb": POSITIVE,
    "rollout.logprob_tolerance": Bound(0, math.inf),
    "train.weight_decay": Bound(0, math.inf),
    "train.grad_clip": Bound(0, math.inf),
}


def _numbers(dotted: str, value):
    """(name, number) pairs in a field's value: itself, or each item of a list."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(f"{dotted}[{i}]", item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield dotted, value


def bound_problem(dotted: str, name: str, value) -> str | None:
    """Why `value` (of field `dotted`, shown as `name`) cannot work, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name}={value!r}: must be a finite number"
    bound = BOUNDS.get(dotted, Bound() if isinstance(value, int) else None)
    if bound is not None and not bound.holds(value):
        return f"{name}={value!r}: must be {bound}"
    return None


def bounds_problem(cfg) -> str | None:
    """Why the first numeric field value outside what can work cannot work, or None (config.py
    raises it as a ConfigError; this module imports nothing of config's, so no cycle)."""
    for section in dataclasses.fields(cfg):
        group = getattr(cfg, section.name)
        for field in dataclasses.fields(group):
            dotted = f"{section.name}.{field.name}"
            for name, value in _numbers(dotted, getattr(group, field.name)):
                problem = bound_problem(dotted, name, value)
                if problem:
                    return problem
    return None
