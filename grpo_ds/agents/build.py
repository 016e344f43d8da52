"""Wiring: the config's environment and tools, and the MultiTurnRollout around a backend."""

from __future__ import annotations

from grpo_ds.agents.environment import ToolEnvironment
from grpo_ds.agents.rollout import MultiTurnRollout
from grpo_ds.agents.tools import CallFormat

MULTITURN_COLUMNS = ("env_reward", "tool_calls", "turns")  # MultiTurnRollout's output columns


def multiturn_enabled(cfg) -> bool:
    m = cfg.multiturn
    return bool(m.environment or m.tools) or cfg.task.name == "tool_arithmetic"


def load_callable(spec: str):
    """`pkg.module:name` or `path/file.py:name` -> the callable, resolved (and its errors
    worded) as reward specs are, without the reward-signature check."""
    from grpo_ds.rewards.loading import (
        RewardSpecError,
        _module_from_file,
        _module_from_import,
        _resolve_attribute,
    )

    target, _, attribute = spec.strip().rpartition(":")
    if not target or not attribute:
        raise RewardSpecError(f"{spec!r}: expected 'package.module:name' or 'file.py:name'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _module_from_file(spec, target) if is_file else _module_from_import(spec, target)
    return _resolve_attribute(spec, module, attribute)


def environment_factory(cfg):
    """() -> Environment for the config: the task's own, the user's factory, or the tools'."""
    m = cfg.multiturn
    if cfg.task.name == "tool_arithmetic" and not (m.environment or m.tools):
        from grpo_ds.tasks.tool_arithmetic import calc

        tools = [calc]
    elif m.environment:
        return load_callable(m.environment)
    else:
        tools = [load_callable(spec) for spec in m.tools]
    fmt = CallFormat(m.call_start, m.call_end, m.call_format)
    env = ToolEnvironment(tools, fmt, m.result_template, m.tool_timeout)
    return lambda: env


def build_multiturn(cfg, backend, tokenizer, device=None):
    """`backend` wrapped in a MultiTurnRollout when the config asks for one, else as it is.
    device: the policy's device (the per-turn all-reduce's tensor lives there)."""
    if not multiturn_enabled(cfg):
        return backend
    m = cfg.multiturn
    return MultiTurnRollout(backend, environment_factory(cfg), tokenizer, m.call_end,
                            m.max_turns, m.max_total_tokens, device=device,
                            kv_cache=m.kv_cache)
