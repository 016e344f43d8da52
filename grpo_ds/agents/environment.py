"""The environment protocol of multi-turn rollouts, and the tool environment built on it.

After every model turn the rollout calls

    reply = env.step(messages, row)

with the conversation so far (`messages`: {"role": "user", "content": prompt text}, then
alternating {"role": "assistant", "content": the model's turn} and {"role": "tool", ...} for
each earlier observation) and the dataset row the episode came from (None where there is none,
e.g. evaluation of bare prompts). The reply says:
  - `observation`: text to insert as the next environment turn (tokenised, masked out of the
    loss), or None;
  - `done`: the episode ends here (an episode also ends when the model writes EOS, at
    `max_turns` model turns, or when the token budget runs out; the rollout decides those);
  - `reward`: a final reward, or None to leave rewards to the reward functions. The last
    reply's reward reaches reward functions as the `env_reward` column
    (see `grpo_ds.agents.rewards:env_reward`);
  - `tool_calls` / `tool_failures`: counts for the metrics.

An environment object serves every episode of a rank (it gets the row each time); one that
keeps state per episode is made by a factory (`multiturn.environment=pkg.mod:factory`, like
TRL's `environment_factory`), called once per episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from grpo_ds.agents.tools import CallFormat, run_tool


@dataclass(frozen=True)
class EnvReply:
    observation: str | None = None
    done: bool = False
    reward: float | None = None
    tool_calls: int = 0
    tool_failures: int = 0


@runtime_checkable
class Environment(Protocol):
    def step(self, messages: list[dict], row: dict | None) -> EnvReply: ...


class ToolEnvironment:
    """Runs the tool calls of the model's last turn; done when that turn has none.

    tools: plain functions (tools.py), called by their `__name__`.
    call_format: how calls look in the model's text.
    result_template: how one tool's result is written back, `{result}` and `{name}` filled in
        (several calls in one turn: their results joined, in order).
    timeout: seconds a tool may run.
    """

    def __init__(self, tools: Sequence[Callable], call_format: CallFormat,
                 result_template: str = "<tool_response>{result}</tool_response>",
                 timeout: float = 5.0):
        names = [t.__name__ for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.tools = dict(zip(names, tools))
        self.call_format, self.result_template, self.timeout = call_format, result_template, timeout

    def step(self, messages: list[dict], row: dict | None) -> EnvReply:
        calls = self.call_format.find_calls(messages[-1]["content"])
        if not calls:
            return EnvReply(done=True)
        results, failures = [], 0
        for call in calls:
            text, ok = run_tool(call, self.tools, self.timeout)
            failures += not ok
            results.append(self.result_template.format(result=text, name=call.name or "?"))
        return EnvReply(observation="".join(results), tool_calls=len(calls),
                        tool_failures=failures)


def as_environment(obj) -> Environment:
    """An Environment, or a clear error naming what was given."""
    if not isinstance(obj, Environment):
        raise TypeError(f"{obj!r} is not an environment: it needs a step(messages, row) method "
                        "returning an EnvReply")
    return obj
