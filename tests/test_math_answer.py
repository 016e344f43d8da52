"""math_answer: answer extraction, number normalisation, and every GSM8K reference solution.

Math-Verify's side (LaTeX, sets, timeouts, the worker pool) is tested in test_math_verify.py.
The GSM8K tests run on the shipped 64-row sample (always) and on the full 7473-row train file
when the repository sits next to /work/shared (../shared/data/gsm8k/train.jsonl); otherwise that
case is skipped with the reason.
"""

import json
from fractions import Fraction
from pathlib import Path

import pytest

from grpo_ds.rewards import (
    answers_match,
    extract_final_answer,
    math_answer,
    normalize_number,
    reference_answer,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "gsm8k_sample.jsonl"
FULL_TRAIN = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


# ---------------------------------------------------------------------------------------------
# GSM8K reference solutions


def _gsm8k_file(which: str) -> Path:
    if which == "sample":
        return SAMPLE
    if not FULL_TRAIN.is_file():
        pytest.skip(f"full GSM8K train file not found at {FULL_TRAIN} (only the sample is tested)")
    return FULL_TRAIN


def _perturbed(value: str) -> tuple[str, str]:
    """(N + 1, N with its first digit d replaced by (d + 1) mod 10), both different numbers."""
    plus_one = str(normalize_number(value) + 1)
    index = next(i for i, ch in enumerate(value) if ch.isdigit())
    return plus_one, value[:index] + str((int(value[index]) + 1) % 10) + value[index + 1 :]


@pytest.mark.parametrize("which", ["sample", "full"])
def test_every_gsm8k_reference_scores_itself_and_not_a_perturbed_answer(which):
    rows = [json.loads(line) for line in _gsm8k_file(which).open(encoding="utf-8")]
    assert len(rows) == (64 if which == "sample" else 7473)
    references = [row["answer"] for row in rows]
    values = [reference_answer(ref) for ref in references]
    # The sample includes answers with thousands separators ("1,200"): check it really does.
    assert any("," in v for v in values)

    assert math_answer(completions=references, answer=references) == [1.0] * len(rows)
    stated = [f"The answer is {v}" for v in values]
    assert math_answer(completions=stated, answer=references) == [1.0] * len(rows)

    plus_one, other_digit = zip(*(_perturbed(v) for v in values))
    solutions = [ref.rsplit("####", 1)[0] for ref in references]
    wrong_by_one = [f"{s}#### {p}" for s, p in zip(solutions, plus_one)]
    wrong_digit = [f"{s}#### {d}" for s, d in zip(solutions, other_digit)]
    assert all(normalize_number(d) != normalize_number(v) for d, v in zip(other_digit, values))
    assert math_answer(completions=wrong_by_one, answer=references) == [0.0] * len(rows)
    assert math_answer(completions=wrong_digit, answer=references) == [0.0] * len(rows)


def test_perturbation_helper_changes_the_value():
    # 72 -> 73 and 82; 1,200 -> 1201 and 2,200; -3 -> -2 and -4; 9 -> 10 and 0
    assert _perturbed("72") == ("73", "82")
    assert _perturbed("1,200") == ("1201", "2,200")
    assert _perturbed("-3") == ("-2", "-4")
    assert _perturbed("9") == ("10", "0")


# ---------------------------------------------------------------------------------------------
# extraction: each written form


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234\n", "1,234"),
        # The first "####" counts: what follows is a base model running on into a new question.
        (
            "... = 72 clips.\n#### 72\n\nQuestion: Tom has 5 pens...\nAnswer: 5*2 = 10\n#### 10",
            "72",
        ),
        ("#### 72 clips", "72"),
        ("so the total is \\boxed{42}.", "42"),
        ("$\\boxed{\\frac{3}{4}}$", "\\frac{3}{4}"),  # nested braces
        ("\\boxed{1} and then \\boxed{2}", "2"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{2x}", "2x"),  # algebra is kept whole for symbolic comparison
        ("\\boxed{5 m}", "5"),  # a unit after a space is not
        ("\\boxed{x+1}", "x+1"),
        ("The answer is 42.", "42"),
        ("The answer is 5.\n\nQuestion: what is 2*3?\nAnswer: The answer is 6.", "5"),
        ("the answer is: **$12**", "$12"),
        ("The answer is 72 clips, since 48 + 24 = 72.", "72"),
        ("The answer is 72 (48 + 24)", "72"),
        ("The answer is x+1", "x+1"),
        ("Final answer: 50%", "50%"),
        ("answer: -5", "-5"),
        ("**Answer:** 42", "42"),
        ("answer = 3", "3"),
        ("Q: how many?\nA: 42", "42"),
        ("A: Natalia sold 48/2 = 24 clips.\nSo she sold 72", "72"),  # "A:" opening a solution
        ("<think>maybe 5</think><answer>The answer is 7</answer>", "7"),
        ("I have 3 apples and 5 pears", "5"),  # last number
        ("10-5", "5"),  # a minus between terms is not a sign
        ("x = -3.50", "-3.50"),
        ("The total is -$5.", "-$5"),
        ("ratio 3/4", "3/4"),
        ("3,4,5", "5"),
        ("#### \u22127", "\u22127"),
        ("no numbers here", None),
        ("", None),
        ("The answer is probably large", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_marker_priority():
    # "####" beats \boxed, which beats "the answer is", which beats the last number.
    assert extract_final_answer("The answer is 1. \\boxed{2} #### 3 and 4") == "3"
    assert extract_final_answer("The answer is 1. \\boxed{2} and 4") == "2"
    assert extract_final_answer("The answer is 1, not 4") == "1"


# ---------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", Fraction(42)),
        (" 42 ", Fraction(42)),
        ("1,234", Fraction(1234)),
        ("1,234,567.89", Fraction(123456789, 100)),
        ("1 234", Fraction(1234)),
        ("$5", Fraction(5)),
        ("-$5", Fraction(-5)),
        ("$-5", Fraction(-5)),
        ("\u20ac5", Fraction(5)),
        ("5 \u20ac", Fraction(5)),
        ("\\$12", Fraction(12)),
        ("$12$", Fraction(12)),  # LaTeX math delimiters, not currency
        ("50%", Fraction(50)),  # a percent sign is dropped: GSM8K wants the bare number
        ("50\\%", Fraction(50)),
        ("5.00", Fraction(5)),
        ("5.0", Fraction(5)),
        ("12.", Fraction(12)),
        ("+7", Fraction(7)),
        ("- 5", Fraction(-5)),
        ("\u22123", Fraction(-3)),  # unicode minus
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("3 / 4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{-3}{4}", Fraction(-3, 4)),
        ("**42**", Fraction(42)),
        ("1/0", None),
        ("abc", None),
        ("1,23", None),  # not a thousands grouping
        ("1.2.3", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "predicted, reference, equal",
    [
        ("0.75", "3/4", True),
        ("$1,234.00", "1234", True),
        ("72", "72.0", True),
        ("-5", "\u22125", True),
        ("50%", "50", True),
        ("73", "72", False),
        ("0.1", "1/10", True),  # exact: no float rounding
        (None, "72", False),
    ],
)
def test_answers_match_numbers(predicted, reference, equal):
    assert answers_match(predicted, reference) is equal


def test_reference_answer_takes_text_after_the_last_hashes():
    assert reference_answer("48/2 = 24\n#### 72") == "72"
    assert reference_answer("a #### 1 b #### 2 ") == "2"
    assert reference_answer(" 72 ") == "72"
    assert reference_answer(72) == "72"  # a numeric column


def test_math_answer_scores_and_checks_lengths():
    completions = ["#### 72", "The answer is 7", "\\boxed{0.5}", "nothing"]
    answers = ["blah\n#### 72", "8", "1/2", "3"]
    # TRL's keyword call: prompts and unknown columns arrive as keywords too.
    rewards = math_answer(prompts=["p"] * 4, completions=completions, answer=answers,
                          extra_column=[1, 2, 3, 4])
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="4 completions but 3 answers"):
        math_answer(completions=completions, answer=answers[:3])


def test_conversational_completions_are_read_from_their_last_message():
    completions = [[{"role": "assistant", "content": "So $\\boxed{\\frac13}$."}],
                   [{"role": "assistant", "content": "The answer is 4."}]]
    assert math_answer(completions=completions, answer=["\\frac{1}{3}", "5"]) == [1.0, 0.0]


def test_answers_match_beyond_numbers():
    assert answers_match("\\sqrt{4}", "2")
    assert answers_match("2(x+1)", "2x+2")
    assert answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert not answers_match("x+1", "x+2")
    assert not answers_match("x", "y")
    assert not answers_match("__import__('os').system('true')", "0")  # never evaluated
