"""`FailedReward`: a reward of 0.0 that also says "this sample could not be scored".

A grader that times out on a sample (sympy on adversarial input) must neither stall the step
nor pretend the sample was graded. It returns `FailedReward()` for that sample: everywhere a
number is read it is 0.0, and `compute_rewards` counts it in `rewards/{name}/errors`, beside the
samples whose reward function raised.
"""

from __future__ import annotations


class FailedReward(float):
    """0.0 (or `value`), marked as a failure; `reason` says what went wrong."""

    def __new__(cls, value: float = 0.0, reason: str = ""):
        reward = super().__new__(cls, value)
        reward.reason = reason
        return reward

    def __repr__(self) -> str:
        return f"FailedReward({float(self)!r}, {self.reason!r})"
