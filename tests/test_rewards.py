"""Reward functions other than math_answer, their loading from specs, and compute_rewards."""

import math
import textwrap

import pytest
import torch

from grpo_ds.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    RewardSpecError,
    check_reward_columns,
    compute_rewards,
    format_reward,
    load_reward_function,
    math_answer,
    overlong_penalty,
)

# ---------------------------------------------------------------------------------------------
# format_reward


def test_format_reward_default_think_answer():
    reward = format_reward()
    completions = [
        "<think>48/2 = 24\n48 + 24 = 72</think>\n<answer>72</answer>",  # lines inside: DOTALL
        "  <think>a</think><answer>b</answer>\n",  # surrounding whitespace is fine
        "<answer>72</answer>",  # no think block
        "<think>a</think><answer>b</answer> trailing words",  # must match the WHOLE completion
        "<answer>b</answer><think>a</think>",  # wrong order
    ]
    assert reward(prompts=["p"] * 5, completions=completions, answer=["x"] * 5) == [
        1.0, 1.0, 0.0, 0.0, 0.0]


def test_format_reward_custom_pattern():
    reward = format_reward(r".*#### -?\d+")
    assert reward(prompts=["p", "p"], completions=["so\n#### 72", "so 72"]) == [1.0, 0.0]
    assert reward.pattern == r".*#### -?\d+"


# ---------------------------------------------------------------------------------------------
# overlong_penalty: L_max = 10, L_cache = 4, so lengths <= 6 are free and
# R(L) = (6 - L) / 4 for 6 < L <= 10:  L=7 -> -0.25, L=8 -> -0.5, L=10 -> -1.0;  L=11 -> -1.


def test_overlong_penalty_hand_worked():
    penalty = overlong_penalty(max_completion_tokens=10, cache_tokens=4)
    lengths = [0, 6, 7, 8, 10, 11, 50]
    completion_ids = [[5] * n for n in lengths]
    rewards = penalty(prompts=["p"] * 7, completions=["c"] * 7, completion_ids=completion_ids,
                      answer=["a"] * 7)
    assert rewards == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


def test_overlong_penalty_needs_completion_ids_and_valid_sizes():
    penalty = overlong_penalty(10, 4)
    with pytest.raises(ValueError, match="completion_ids"):
        penalty(prompts=["p"], completions=["c"])
    with pytest.raises(ValueError, match="cache_tokens=0"):
        overlong_penalty(10, 0)
    with pytest.raises(ValueError, match="cache_tokens=11"):
        overlong_penalty(10, 11)


def test_overlong_penalty_accepts_tensors_of_ids():
    penalty = overlong_penalty(4, 2)
    # free up to 2 tokens; L=3 -> (2 - 3) / 2 = -0.5
    ids = [torch.ones(2), torch.ones(3)]
    assert penalty(prompts=["p", "p"], completions=["c", "c"], completion_ids=ids) == [
        0.0,
        -0.5,
    ]


# ---------------------------------------------------------------------------------------------
# load_reward_function


def test_load_builtins():
    builtin = load_reward_function("math_answer")
    assert builtin.__wrapped__ is math_answer  # made to read conversational completions too
    assert load_reward_function(" format ") is BUILTIN_REWARDS["format"]
    text = "<think>a</think><answer>1</answer>"
    assert load_reward_function("format")(prompts=["p"], completions=[text]) == [1.0]
    # TRL's conversational form: each completion is a list with one assistant message.
    chats = [[{"role": "assistant", "content": "so #### 2"}], [{"role": "assistant", "content": text}]]
    assert builtin(prompts=["p", "p"], completions=chats, answer=["2", "2"]) == [1.0, 0.0]
    assert load_reward_function("format")(prompts=["p", "p"], completions=chats) == [0.0, 1.0]


def test_load_by_import_path(tmp_path, monkeypatch):
    assert load_reward_function("grpo_ds.rewards.math_answer:math_answer") is math_answer
    # A dotted attribute path works too.
    _write(tmp_path / "grpo_ds_test_scorers.py", """
        class Scorer:
            @staticmethod
            def length(completions, **kwargs):
                return [float(len(c)) for c in completions]
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_reward_function("grpo_ds_test_scorers:Scorer.length")
    assert loaded(prompts=["p"], completions=["abc"]) == [3.0]
    # dict.get takes its key positionally: it cannot be called by keyword, so it is refused.
    with pytest.raises(RewardSpecError, match="parameter 'key' is positional-only"):
        load_reward_function("grpo_ds.rewards:BUILTIN_REWARDS.get")


def _write(path, source):
    path.write_text(textwrap.dedent(source))
    return path


def test_load_by_file_path(tmp_path):
    file = _write(
        tmp_path / "my_rewards.py",
        """
        from grpo_ds.rewards import format_reward

        def length_reward(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]

        strict = format_reward(r"\\d+")
        NOT_CALLABLE = 3
        """,
    )
    length_reward = load_reward_function(f"{file}:length_reward")
    assert length_reward(prompts=["p", "p"], completions=["ab", "abcd"]) == [2.0, 4.0]
    strict = load_reward_function(f"{file}:strict")
    assert strict(prompts=["p", "p"], completions=["12", "a1"]) == [1.0, 0.0]
    # The same file loads once: the same function object comes back.
    assert load_reward_function(f"{file}:length_reward") is length_reward


def test_load_by_relative_file_path(tmp_path, monkeypatch):
    _write(
        tmp_path / "rel.py",
        "def r(prompts, completions, **kw):\n    return [1.0] * len(completions)\n",
    )
    monkeypatch.chdir(tmp_path)
    assert load_reward_function("./rel.py:r")(prompts=["p"], completions=["c"]) == [1.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_builtin", "not a built-in reward (format, math_answer)"),
        ("grpo_ds_no_such_module:fn", "module 'grpo_ds_no_such_module' not found"),
        ("grpo_ds.rewards.math_answer:no_such_fn", "has no attribute 'no_such_fn'"),
        (
            "grpo_ds.rewards.format:THINK_ANSWER_PATTERN",
            "'THINK_ANSWER_PATTERN' is a str, not callable",
        ),
        ("grpo_ds.rewards:", "both the module/file and the function name are needed"),
    ],
)
def test_load_errors_name_spec_and_problem(spec, message):
    with pytest.raises(RewardSpecError) as info:
        load_reward_function(spec)
    assert repr(spec) in str(info.value)
    assert message in str(info.value)


def test_load_error_lists_available_callables():
    with pytest.raises(RewardSpecError, match=r"callables defined there: .*math_answer"):
        load_reward_function("grpo_ds.rewards.math_answer:math_answr")


def test_file_errors(tmp_path):
    missing = tmp_path / "missing.py"
    with pytest.raises(RewardSpecError, match=f"file not found: {missing}"):
        load_reward_function(f"{missing}:fn")
    broken = _write(tmp_path / "broken.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(
        RewardSpecError, match="broken.py raised RuntimeError: boom at import"
    ) as info:
        load_reward_function(f"{broken}:fn")
    assert isinstance(info.value.__cause__, RuntimeError)
    needs_dep = _write(tmp_path / "needs_dep.py", "import grpo_ds_not_installed_dep\n")
    with pytest.raises(RewardSpecError, match="No module named 'grpo_ds_not_installed_dep'"):
        load_reward_function(f"{needs_dep}:fn")
    no_args = _write(tmp_path / "no_args.py", "def fn():\n    return []\n")
    with pytest.raises(RewardSpecError, match=r"cannot be called by keyword as TRL calls"):
        load_reward_function(f"{no_args}:fn")
    positional = _write(tmp_path / "positional.py",
                        "def fn(prompts, completions, /, **kwargs):\n    return []\n")
    with pytest.raises(RewardSpecError, match="'prompts', 'completions' is positional-only"):
        load_reward_function(f"{positional}:fn")


def test_import_error_inside_an_existing_module(tmp_path, monkeypatch):
    _write(tmp_path / "grpo_ds_test_pkg_dep.py", "import grpo_ds_not_installed_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        RewardSpecError, match="imports 'grpo_ds_not_installed_dep', which is not installed"
    ):
        load_reward_function("grpo_ds_test_pkg_dep:fn")


def test_check_reward_columns():
    check_reward_columns(math_answer, "math_answer", ["answer", "question", "completion_ids"])
    with pytest.raises(RewardSpecError) as info:
        check_reward_columns(math_answer, "math_answer", ["question", "solution"], "train.jsonl")
    assert ("reward 'math_answer' ('math_answer') needs column 'answer', which train.jsonl does "
            "not have; the columns there are: question, solution") in str(info.value)

    def no_kwargs(prompts, completions, completion_ids, trainer_state, answer):
        return [0.0] * len(completions)

    check_reward_columns(no_kwargs, "strict", ["answer"])
    with pytest.raises(RewardSpecError, match="does not accept the keyword 'question'; add"):
        check_reward_columns(no_kwargs, "strict", ["answer", "question"])


# ---------------------------------------------------------------------------------------------
# compute_rewards

PROMPTS = ["p0", "p0", "p1", "p1"]
COMPLETIONS = ["#### 1", "#### 2", "#### 3", "#### 4"]
COLUMNS = {"answer": ["1", "1", "3", "5"], "completion_ids": [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]}


def test_compute_rewards_hand_worked():
    def by_length(prompts, completions, completion_ids, **kwargs):
        return [None if len(ids) == 4 else len(ids) for ids in completion_ids]

    def flags(prompts, completions, **kwargs):
        return [True, False, True, True]

    rewards, stats = compute_rewards(
        [math_answer, by_length, flags], ["math", "length", "flags"], PROMPTS, COMPLETIONS, COLUMNS
    )
    assert rewards.dtype == torch.float32 and rewards.shape == (4, 3)
    # math: answers 1,1,3,5 vs 1,2,3,4 -> [1, 0, 1, 0]; length: [1, 2, 3, None]; flags: bools.
    expected = torch.tensor(
        [[1, 1, 1], [0, 2, 0], [1, 3, 1], [0, math.nan, 1]], dtype=torch.float32
    )
    torch.testing.assert_close(rewards, expected, equal_nan=True)
    # math mean 2/4 = 0.5, population std sqrt(4 * 0.25 / 4) = 0.5
    # length over the 3 non-None [1, 2, 3]: mean 2, std sqrt((1 + 0 + 1) / 3) = 0.8165
    # flags [1, 0, 1, 1]: mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 4) = sqrt(0.1875) = 0.4330
    assert stats["rewards/math/mean"] == 0.5 and stats["rewards/math/std"] == 0.5
    assert stats["rewards/length/mean"] == 2.0
    assert stats["rewards/length/std"] == pytest.approx(math.sqrt(2 / 3))
    assert stats["rewards/flags/mean"] == 0.75
    assert stats["rewards/flags/std"] == pytest.approx(math.sqrt(0.1875))
    assert stats["rewards/math/errors"] == 0.0


def test_all_none_leaves_mean_and_std_out():
    rewards, stats = compute_rewards(
        [lambda completions, **kw: [None] * len(completions)],
        ["na"],
        PROMPTS,
        COMPLETIONS,
        COLUMNS,
    )
    assert torch.isnan(rewards).all()
    assert "rewards/na/mean" not in stats and stats["rewards/na/errors"] == 0.0


def test_tensor_and_tuple_results_are_accepted():
    rewards, _ = compute_rewards(
        [lambda completions, **kw: torch.tensor([1.0, 2.0, 3.0, 4.0]), lambda completions, **kw: (0, 0, 0, 1)],
        ["tensor", "tuple"],
        PROMPTS,
        COMPLETIONS,
        COLUMNS,
    )
    assert rewards[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0] and rewards[:, 1].tolist() == [0, 0, 0, 1]


def test_wrong_length_names_function_and_lengths():
    with pytest.raises(RewardError, match="reward function 'short' returned 3 values, expected 4"):
        compute_rewards([lambda completions, **kw: [1.0] * 3], ["short"], PROMPTS, COMPLETIONS, COLUMNS)


@pytest.mark.parametrize("bad", ["1.0", float("nan"), float("inf"), [1.0], 1 + 2j])
def test_non_number_names_function_sample_and_value(bad):
    def reward(prompts, completions, **kwargs):
        return [1.0, 0.0, bad, 1.0]

    with pytest.raises(RewardError) as info:
        compute_rewards([reward], ["bad_values"], PROMPTS, COMPLETIONS, COLUMNS)
    message = str(info.value)
    assert "'bad_values'" in message and "for sample 2" in message and repr(bad) in message


def test_non_list_result():
    with pytest.raises(RewardError, match="'scalar' returned float, expected a list of 4 floats"):
        compute_rewards([lambda completions, **kw: 1.0], ["scalar"], PROMPTS, COMPLETIONS, COLUMNS)


def _fails_on_three(prompts, completions, **kwargs):
    if any("3" in c for c in completions):
        raise ZeroDivisionError("cannot score three")
    return [1.0] * len(completions)


def test_raising_function_with_raise_names_function_and_sample():
    long_prompts = PROMPTS[:2] + ["x" * 1000, "p1"]
    with pytest.raises(RewardError) as info:
        compute_rewards([_fails_on_three], ["fragile"], long_prompts, COMPLETIONS, COLUMNS)
    message = str(info.value)
    assert "reward function 'fragile' raised ZeroDivisionError: cannot score three" in message
    assert "on sample 2" in message and "completion='#### 3'" in message
    assert "xxx..." in message and len(message) < 600  # the 1000-char prompt is truncated
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_raising_function_with_skip_gives_none_and_counts():
    rewards, stats = compute_rewards(
        [_fails_on_three, math_answer],
        ["fragile", "math"],
        PROMPTS,
        COMPLETIONS,
        COLUMNS,
        on_error="skip",
    )
    assert (
        rewards[:, 0].tolist()[:2] == [1.0, 1.0]
        and math.isnan(rewards[2, 0])
        and rewards[3, 0] == 1.0
    )
    assert stats["rewards/fragile/errors"] == 1.0 and stats["rewards/fragile/mean"] == 1.0
    assert rewards[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]  # other functions are unaffected


def test_function_that_only_fails_on_batches():
    def batch_of_one_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise ValueError("batches unsupported")
        return [0.5]

    with pytest.raises(
        RewardError, match="on the batch of 4 completions, but not on any single one"
    ):
        compute_rewards([batch_of_one_only], ["solo"], PROMPTS, COMPLETIONS, COLUMNS)
    rewards, stats = compute_rewards(
        [batch_of_one_only], ["solo"], PROMPTS, COMPLETIONS, COLUMNS, on_error="skip"
    )
    assert rewards[:, 0].tolist() == [0.5] * 4 and stats["rewards/solo/errors"] == 0.0


def test_columns_are_passed_per_sample_when_locating_a_failure():
    seen = []

    def record(prompts, completions, answer, **kwargs):
        seen.append((list(completions), list(answer)))
        if len(completions) > 1:
            raise RuntimeError("force the per-sample path")
        return [1.0]

    compute_rewards([record], ["rec"], PROMPTS, COMPLETIONS, COLUMNS, on_error="skip")
    assert seen[1:] == [
        (["#### 1"], ["1"]),
        (["#### 2"], ["1"]),
        (["#### 3"], ["3"]),
        (["#### 4"], ["5"]),
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"columns": {"answer": ["1"]}},
            "column 'answer' has 1 entries but there are 4 completions",
        ),
        ({"prompts": ["p"]}, "got 1 prompts but 4 completions"),
        ({"names": ["a", "b"]}, "got 1 reward functions but 2 names"),
        ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
        ({"columns": {"completions": COMPLETIONS}}, "column 'completions' clashes"),
    ],
)
def test_bad_inputs(kwargs, message):
    arguments = {
        "funcs": [math_answer],
        "names": ["math"],
        "prompts": PROMPTS,
        "completions": COMPLETIONS,
        "columns": COLUMNS,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        compute_rewards(**arguments)


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="reward names must be unique"):
        compute_rewards([math_answer, math_answer], ["m", "m"], PROMPTS, COMPLETIONS, COLUMNS)
