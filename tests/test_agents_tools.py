"""Tools as plain functions: schema, the two call formats, malformed calls, errors, timeouts."""

import time

import pytest

from grpo_ds.agents.environment import ToolEnvironment
from grpo_ds.agents.tools import CallFormat, ToolCall, run_tool, tool_schema


def calc(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise RuntimeError("disk on fire")


def slow(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke"


TOOLS = {"calc": calc, "broken": broken, "slow": slow}


def test_schema_comes_from_type_hints_and_docstring():
    fn = tool_schema(calc)["function"]
    assert fn["name"] == "calc" and fn["description"] == "Multiply two integers."
    assert fn["parameters"]["properties"]["a"] == {"type": "integer",
                                                   "description": "The first factor."}
    assert fn["parameters"]["required"] == ["a", "b"]


def test_schema_renders_into_a_chat_template():
    from tests.tiny_models import text_tokenizer

    tok = text_tokenizer()
    tok.chat_template = ("{% for t in tools %}TOOL {{ t.function.name }}: "
                         "{{ t.function.description }}\n{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[calc],
                                   tokenize=False)
    assert text == "TOOL calc: Multiply two integers.\nhi"


def test_json_and_python_calls_parse():
    j = CallFormat("<tool_call>", "</tool_call>", "json")
    calls = j.find_calls('x <tool_call>{"name": "calc", "arguments": {"a": 3, "b": 4}}</tool_call>'
                         ' y <tool_call>{"name": "calc", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}'
                         '</tool_call>')
    assert calls == [ToolCall("calc", kwargs={"a": 3, "b": 4}),
                     ToolCall("calc", kwargs={"a": 1, "b": 2})]
    p = CallFormat("<call>", "</call>", "python")
    assert p.find_calls("<call>calc(12,b=34)</call>") == [ToolCall("calc", (12,), {"b": 34})]
    assert p.find_calls("no call here") == []


@pytest.mark.parametrize("text, fragment", [
    ("<call>calc(12,34)", "not closed"),
    ("<call>calc 12 34</call>", "not of the form"),
    ("<call>calc(__import__('os').getcwd())</call>", "not literals"),
    ("<call>calc(1+)</call>", "not literals"),
])
def test_malformed_python_calls_are_error_calls(text, fragment):
    (call,) = CallFormat("<call>", "</call>", "python").find_calls(text)
    assert call.error and fragment in call.error
    observation, ok = run_tool(call, TOOLS, 1.0)
    assert not ok and observation.startswith("error:")


@pytest.mark.parametrize("body, fragment", [
    ("{not json", "not valid JSON"), ('{"arguments": {}}', '"name"'),
    ('{"name": "calc", "arguments": [1, 2]}', "must be an object")])
def test_malformed_json_calls_are_error_calls(body, fragment):
    (call,) = CallFormat(body="json").find_calls(f"<tool_call>{body}</tool_call>")
    assert fragment in call.error


def test_unknown_tool_wrong_arguments_exception_and_timeout_are_observations():
    assert run_tool(ToolCall("calc", (6, 7)), TOOLS, 1.0) == ("42", True)
    text, ok = run_tool(ToolCall("nope"), TOOLS, 1.0)
    assert not ok and "unknown tool 'nope'" in text and "calc" in text
    text, ok = run_tool(ToolCall("calc", (1,)), TOOLS, 1.0)
    assert not ok and "TypeError" in text
    assert run_tool(ToolCall("broken", (1,)), TOOLS, 1.0) == (
        "error: RuntimeError: disk on fire", False)
    start = time.perf_counter()
    text, ok = run_tool(ToolCall("slow", (5.0,)), TOOLS, 0.2)
    assert not ok and "timed out after 0.2 s" in text
    assert time.perf_counter() - start < 2.0


def test_tool_environment_runs_calls_and_ends_without_one():
    env = ToolEnvironment([calc, broken], CallFormat("<call>", "</call>", "python"),
                          "<result>{result}</result>", timeout=1.0)
    reply = env.step([{"role": "assistant", "content": "<call>calc(3,4)</call>"}], None)
    assert reply.observation == "<result>12</result>" and not reply.done
    assert (reply.tool_calls, reply.tool_failures) == (1, 0)
    reply = env.step([{"role": "assistant", "content": "<call>broken(1)</call><call>calc(2</call>"}],
                     None)
    assert (reply.tool_calls, reply.tool_failures) == (2, 2)
    assert reply.observation.count("<result>error:") == 2
    assert env.step([{"role": "assistant", "content": "12"}], None).done


def test_duplicate_tool_names_are_refused():
    with pytest.raises(ValueError, match="unique"):
        ToolEnvironment([calc, calc], CallFormat())


def test_config_tools_reach_the_chat_template_of_dataset_prompts():
    from grpo_ds.data import format_prompts
    from tests.tiny_models import text_tokenizer

    tok = text_tokenizer()
    tok.chat_template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    rows = [{"prompt": [{"role": "user", "content": "6*7?"}]}]
    assert format_prompts(rows, tokenizer=tok, tools=[calc]) == ["[calc]6*7?"]
    assert format_prompts(rows, tokenizer=tok) == ["6*7?"]
