"""Reward functions over what a multi-turn rollout reports."""

from __future__ import annotations


def env_reward(completions, env_reward, **kwargs) -> list[float | None]:
    """The environment's final reward of each episode (None where it left the reward open)."""
    return [None if r is None else float(r) for r in env_reward]
