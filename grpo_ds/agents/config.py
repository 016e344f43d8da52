"""The `multiturn` section of the config: environment, tools, call format, turn and token limits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MultiTurnConfig:
    environment: str | None = None
    """`pkg.module:factory` or `path/file.py:factory`: called with no arguments once per
    episode, returns an environment (grpo_ds/agents/environment.py). Unset with no `tools`:
    single-turn rollouts."""
    tools: list[str] = field(default_factory=list)
    """Tools as plain functions (`pkg.module:fn`, type hints and docstring), run by the built-in
    tool environment; their schemas go to the chat template (`tools=`) of chat prompts."""
    call_format: str = "json"
    """Body of a tool call between the markers: `json` ({"name": .., "arguments": {..}}) or
    `python` (name(literal, key=literal))."""
    call_start: str = "<tool_call>"
    """Text that opens a tool call in the model's output."""
    call_end: str = "</tool_call>"
    """Text that closes a tool call; a model turn stops there and the tools run."""
    result_template: str = "<tool_response>{result}</tool_response>"
    """How a tool's result is written back as the observation (`{result}`, `{name}`). For a
    chat model, include the template's turn markers, e.g. Qwen's
    `<|im_end|>\\n<|im_start|>user\\n<tool_response>{result}</tool_response><|im_end|>\\n<|im_start|>assistant\\n`."""
    max_turns: int = 4
    """Most model turns per episode (1 = single-turn)."""
    max_total_tokens: int = 512
    """Most completion tokens per episode, the model's and the observations' together."""
    tool_timeout: float = 5.0
    """Seconds a tool may run before its observation says it timed out."""
    kv_cache: str = "auto"
    """Between turns: `extend` keeps each episode's KV cache and prefills only the new tokens;
    `reencode` re-prefills the whole episode every turn (same tokens); `auto` extends, and
    re-encodes with a log line saying why where the backend or model cannot (sliding-window
    layers, more episodes than one generation pass holds)."""


CALL_FORMATS = ("json", "python")
KV_CACHE_MODES = ("auto", "extend", "reencode")


def validate_multiturn(m: MultiTurnConfig, error) -> None:
    """Raise `error(message)` naming the first bad `multiturn.*` field."""
    if m.call_format not in CALL_FORMATS:
        raise error(f"multiturn.call_format={m.call_format!r}: must be one of {CALL_FORMATS}")
    if m.kv_cache not in KV_CACHE_MODES:
        raise error(f"multiturn.kv_cache={m.kv_cache!r}: must be one of {KV_CACHE_MODES}")
    for name in ("max_turns", "max_total_tokens"):
        if getattr(m, name) < 1:
            raise error(f"multiturn.{name}={getattr(m, name)}: must be >= 1")
    if not m.tool_timeout > 0:
        raise error(f"multiturn.tool_timeout={m.tool_timeout}: must be > 0")
    if not m.call_start or not m.call_end:
        raise error("multiturn.call_start / call_end: must be non-empty")
    if "{result}" not in m.result_template:
        raise error(f"multiturn.result_template={m.result_template!r}: must contain {{result}}")
    if m.environment and m.tools:
        raise error("multiturn.environment and multiturn.tools: give one (an environment runs "
                    "its own tools)")
