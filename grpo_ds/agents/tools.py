"""Tools as plain Python functions: their schema, tool calls parsed from text, timed execution.

A tool is a function with type hints and a Google-style docstring, as in TRL's `tools=[...]`:

    def calc(a: int, b: int) -> int:
        '''Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        '''
        return a * b

`tool_schema(fn)` is the JSON schema chat templates render (transformers' `get_json_schema`,
the function TRL hands `apply_chat_template(tools=...)` too). The model calls a tool by writing
`start BODY end` (CallFormat), BODY in one of two declared formats:
  - "json":   {"name": "calc", "arguments": {"a": 12, "b": 34}}    (Hermes / Qwen <tool_call>)
  - "python": calc(12, 34) or calc(a=12, b=34)                   (literals only, never evaluated
              as code: ast.literal_eval of each argument)
A call that does not parse, names no known tool or has arguments the function refuses is a
`ToolCall` with `error` set; `run_tool` turns it, an exception in the tool and a timeout into an
error text that becomes the observation. Nothing here raises on model output.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

CALL_BODY_FORMATS = ("json", "python")


def tool_schema(fn: Callable) -> dict:
    """The function's JSON schema for the chat template (raises on a missing hint/docstring)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


@dataclass(frozen=True)
class ToolCall:
    """One call found in the model's text; `error` is set when it cannot be run."""

    name: str | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class CallFormat:
    """How tool calls look in the model's output: `start BODY end`, BODY as `body`."""

    start: str = "<tool_call>"
    end: str = "</tool_call>"
    body: str = "json"

    def __post_init__(self):
        if self.body not in CALL_BODY_FORMATS:
            raise ValueError(f"call body format must be one of {CALL_BODY_FORMATS}, "
                             f"got {self.body!r}")
        if not self.start or not self.end:
            raise ValueError("call start and end markers must be non-empty")

    def find_calls(self, text: str) -> list[ToolCall]:
        """Every call in `text`, in order; an unterminated last call is an error call."""
        calls, pos = [], 0
        while (begin := text.find(self.start, pos)) >= 0:
            inner = begin + len(self.start)
            stop = text.find(self.end, inner)
            if stop < 0:
                calls.append(ToolCall(None, error=f"tool call not closed with {self.end!r}"))
                break
            body = text[inner:stop].strip()
            calls.append(parse_json_call(body) if self.body == "json" else parse_python_call(body))
            pos = stop + len(self.end)
        return calls


def parse_json_call(body: str) -> ToolCall:
    """{"name": ..., "arguments": {...}} -> ToolCall (error call on anything else)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall(None, error=f"tool call is not valid JSON ({exc.msg})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall(None, error='tool call needs a "name" string')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some templates put the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], error='tool call "arguments" must be an object')
    return ToolCall(data["name"], kwargs=arguments)


_PYTHON_CALL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\((.*)\)$", re.DOTALL)


def parse_python_call(body: str) -> ToolCall:
    """name(literal, ..., key=literal) -> ToolCall. Arguments are literals, never evaluated code."""
    match = _PYTHON_CALL.match(body)
    if not match:
        return ToolCall(None, error=f"tool call {body[:60]!r} is not of the form name(args)")
    name = match.group(1)
    try:
        node = ast.parse(f"f({match.group(2)})", mode="eval").body
        args = tuple(ast.literal_eval(a) for a in node.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError, TypeError) as exc:
        return ToolCall(name, error=f"arguments of {name} are not literals ({exc})")
    if any(k is None for k in kwargs):
        return ToolCall(name, error="**kwargs are not allowed in a tool call")
    return ToolCall(name, args, kwargs)


def run_tool(call: ToolCall, tools: dict[str, Callable], timeout: float) -> tuple[str, bool]:
    """(observation text, ok). A bad call, an unknown tool, wrong arguments, an exception or a
    run past `timeout` seconds is an error text, never a raise.

    The tool runs in a daemon thread: Python cannot kill a thread, so a tool that never returns
    keeps its thread (and what it holds) until the process ends; the episode goes on without it.
    """
    if call.error:
        return f"error: {call.error}", False
    if call.name not in tools:
        return f"error: unknown tool {call.name!r} (tools: {', '.join(sorted(tools))})", False
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = tools[call.name](*call.args, **call.kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is an observation
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=target, daemon=True, name=f"tool-{call.name}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"error: {call.name} timed out after {timeout:g} s", False
    if "error" in outcome:
        return f"error: {outcome['error']}", False
    return str(outcome.get("value")), True
