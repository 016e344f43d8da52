"""Outcome reward for math problems: 1.0 when a completion's final answer equals the reference.

`math_answer(completions=..., answer=..., **kwargs)` is called as TRL calls reward functions (by
keyword; `prompts` and other columns land in **kwargs). `answer` is the reference column: a value
(`72`, `\\frac{1}{3}`, `(6,31,-1)`, `\\text{Evelyn}`, `C`), or a full solution ending in
`#### N` (GSM8K) or containing `\\boxed{...}` (MATH). Each sample is graded in two tiers:

1. When the completion's final answer (`extract_final_answer`) and the reference's value are both
   plain numbers, they are compared exactly as fractions, here, in microseconds: 1,234 =
   1234.00 = $1,234; 3/4 = 0.75; 50% = 50 (GSM8K's "what percent" wants the bare number). This
   is how GSM8K was always graded, so its rewards are unchanged.
2. Anything else (LaTeX, sets, tuples, intervals, equations, `\\text{}` answers, units, multiple
   choice) goes to Hugging Face's Math-Verify (math_verify_grading.py), run in a small pool of
   worker processes (grading_pool.py) so that long outputs are graded in parallel, off the
   rank's own thread, each sample under a hard timeout.

A sample whose grading times out (or crashes its worker) scores `FailedReward()`: 0.0 in the
reward, and one error in `rewards/math_answer/errors`. The pool (2 workers, 5 s per sample) starts
on the first sample that needs it and is reused for the rest of the run; `make_math_answer` builds
a reward with other settings, for a user's own `file.py:function` spec.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from grpo_ds.rewards.answer_extraction import (  # noqa: F401 (extract_final_answer: re-exported)
    extract_final_answer,
    final_answer,
    normalize_number,
    reference_answer,
)
from grpo_ds.rewards.failure import FailedReward
from grpo_ds.rewards.grading_pool import GradingPool, TaskFailed

logger = logging.getLogger(__name__)

_LATEX_RE = re.compile(r"\\[A-Za-z(\[]")  # \frac, \(, \[
# Decimal commas (0,111  2,74  1000,99), 4-digit groups, spaced thousands (1 000).
_AMBIGUOUS_NUMBER_RE = re.compile(
    r"(?<![\d,.])0,\d|\d,\d{1,2}(?![\d])|\d{4,},\d|\d,\d{4,}"
    r"|(?<![\d,.])\d{1,3}(?: \d{3})+(?![\d,.])"
)
_VERIFY_TARGET = "grpo_ds.rewards.math_verify_grading:verify_answer"
_SHOWN_CHARS = 120


def _completion_text(completion) -> str:
    """A completion as text: TRL's conversational form is a list of messages, the last one ours."""
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def numbers_match(completion: str, reference) -> bool | None:
    """Tier 1: True/False when both final answers are plain numbers, None to ask Math-Verify.

    Math-Verify decides instead when the completion's number is only its last one and the text
    is LaTeX (`$\\frac{1+\\sqrt{5}}{2}$` ends in 2, but its answer is not 2), or when a number
    could be read two ways (`0,111`, `2,74`, `1 000`: decimal commas, spaced thousands).
    """
    answer, form = final_answer(completion)
    if form == "last number" and _LATEX_RE.search(completion):
        return None
    value = reference_answer(reference)
    if _AMBIGUOUS_NUMBER_RE.search(value) or _AMBIGUOUS_NUMBER_RE.search(completion[-200:]):
        return None
    predicted, expected = normalize_number(answer), normalize_number(value)
    if predicted is None or expected is None:
        return None
    return predicted == expected


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether an answer string equals the reference: as numbers, else by Math-Verify.

    Runs in this process under Math-Verify's own SIGALRM timeouts (main thread only); the reward
    uses the worker pool instead.
    """
    if predicted is None:
        return False
    predicted_value, reference_value = normalize_number(predicted), normalize_number(reference)
    if predicted_value is not None and reference_value is not None:
        return predicted_value == reference_value
    from grpo_ds.rewards.math_verify_grading import verify_answer

    return verify_answer(predicted, reference)


def make_math_answer(workers: int = 2, timeout_s: float = 5.0) -> Callable[..., list[float]]:
    """A `math_answer` reward with its own pool: `workers` processes, `timeout_s` per sample."""
    pool = GradingPool(_VERIFY_TARGET, workers=workers, timeout_s=timeout_s)

    def math_answer(completions: list, answer: list, **kwargs) -> list[float]:
        """1.0 per completion whose final answer equals its reference (`answer` column), else 0.0;
        FailedReward (0.0, counted as an error) where grading timed out."""
        if len(answer) != len(completions):
            raise ValueError(
                f"math_answer: got {len(completions)} completions but {len(answer)} answers"
            )
        texts = [_completion_text(c) for c in completions]
        rewards: list[float] = []
        to_verify: list[int] = []
        for i, (text, reference) in enumerate(zip(texts, answer)):
            matched = numbers_match(text, reference)
            rewards.append(0.0 if matched is None else float(matched))
            if matched is None:
                to_verify.append(i)
        if to_verify:
            # A null timeout: Math-Verify's SIGALRM is off in the workers; the pool kills instead.
            verdicts = pool.map([[texts[i], str(answer[i]), None] for i in to_verify])
            for i, verdict in zip(to_verify, verdicts):
                rewards[i] = _reward(verdict, texts[i])
        return rewards

    math_answer.__qualname__ = "math_answer"  # how logs and errors name it
    math_answer.pool = pool  # for the benchmark and tests; the same pool serves every call
    return math_answer


def _reward(verdict, text: str) -> float:
    if isinstance(verdict, TaskFailed):
        logger.warning("math_answer: grading failed (%s), scored 0 and counted as an error: %r",
                       verdict.reason, text[:_SHOWN_CHARS])
        return FailedReward(0.0, verdict.reason)
    return 1.0 if verdict else 0.0


math_answer = make_math_answer()
