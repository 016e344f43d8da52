"""math_answer beyond plain numbers: Math-Verify grading, its agreement bar, timeouts, the pool.

tests/data/math_grading_cases.jsonl holds MATH-style grading cases (reference, completion, the
right verdict, kind, source): the test cases of Math-Verify's own suite (tests/test_all.py,
test_numina_cases.py, test_open_thoughts.py, test_boxed.py, test_yujianll.py), MATH's
math_equivalence_test.py with the second answer boxed in a sentence, and cases written here.
"Math-Verify itself" is its documented use, `verify(parse(gold), parse(prediction))` with LaTeX
and expression extraction (boxed first), the gold put in `$...$` when it has no delimiters
(Math-Verify reads LaTeX only inside them), and letter extraction for multiple choice.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_ds.rewards import FailedReward, compute_rewards, make_math_answer, math_answer
from grpo_ds.rewards.grading_pool import GradingPool, TaskFailed

CASES = Path(__file__).resolve().parent / "data" / "math_grading_cases.jsonl"
KINDS = {"number", "fraction", "frac13", "latex", "set", "tuple", "interval", "equation", "text",
         "unit", "multiple_choice"}


def _math_verify_itself(reference: str, completion: str, kind: str) -> bool:
    from math_verify import (
        ExprExtractionConfig,
        LatexExtractionConfig,
        StringExtractionConfig,
        parse,
        verify,
    )

    if kind == "multiple_choice":
        letters = [StringExtractionConfig(strings=("A", "B", "C", "D", "E"))]
        return bool(verify(parse(reference, letters), parse(completion, letters)))
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    if not re.search(r"\$|\\\(|\\\[|\\boxed", reference):
        reference = f"${reference}$"
    return bool(verify(parse(reference, configs), parse(completion, configs)))


def test_agrees_with_math_verify_on_the_held_out_cases(capsys):
    cases = [json.loads(line) for line in CASES.open(encoding="utf-8")]
    assert len(cases) >= 300 and {c["kind"] for c in cases} == KINDS
    ours = math_answer(completions=[c["completion"] for c in cases],
                       answer=[c["reference"] for c in cases])
    theirs = [_math_verify_itself(c["reference"], c["completion"], c["kind"]) for c in cases]
    agree = [float(o) == float(t) for o, t in zip(ours, theirs)]
    agreement = sum(agree) / len(cases)
    right = sum(float(o) == float(c["expected"]) for o, c in zip(ours, cases)) / len(cases)
    right_theirs = sum(t == c["expected"] for t, c in zip(theirs, cases)) / len(cases)
    with capsys.disabled():
        print(f"\nmath_answer agrees with Math-Verify on {sum(agree)}/{len(cases)} = "
              f"{agreement:.3f}; right on {right:.3f} (Math-Verify itself: {right_theirs:.3f})")
    differing = [(c["source"], c["reference"][:50], c["completion"][-60:])
                 for c, a in zip(cases, agree) if not a]
    assert agreement >= 0.95, differing
    assert right >= 0.95


# One case of our own per answer kind, right and wrong, graded in one batch through the pool.
KIND_CASES = [
    ("number", "72", "48 + 24 = 72, so the answer is 72 clips.", 1.0),
    ("number", "1,234", "The total is \\boxed{1234.00} dollars.", 1.0),
    ("number", "72", "She sold \\boxed{73} clips.", 0.0),
    ("fraction", "\\frac{3}{4}", "The ratio is $\\boxed{0.75}$.", 1.0),
    ("fraction", "3/4", "The ratio is $\\boxed{\\frac{4}{3}}$.", 0.0),
    ("frac13", "\\frac{1}{3}", "\\frac13", 1.0),
    ("frac13", "\\frac13", "So $p = \\dfrac{1}{3}$.", 1.0),
    ("latex", "\\sqrt{8}", "The answer is 2\\sqrt{2}.", 1.0),
    ("latex", "2(x+1)", "So $f(x) = \\boxed{2x+2}$.", 1.0),
    ("latex", "x^2-1", "So the product is $\\boxed{(x-1)^2}$.", 0.0),
    ("set", "\\{1,2,3\\}", "The roots are $\\boxed{\\{3,1,2\\}}$.", 1.0),
    ("set", "\\{1,2,3\\}", "The roots are $\\boxed{\\{1,2\\}}$.", 0.0),
    ("tuple", "$(6,31,-1)$", "Then $(p,q,r) = \\boxed{(6,31,-1)}.$", 1.0),
    ("tuple", "(6,31,-1)", "Then $(p,q,r) = \\boxed{(31,6,-1)}.$", 0.0),
    ("interval", "[0,1)", "So $x \\in \\boxed{[0,1)}$.", 1.0),
    ("interval", "[0,1)", "So $x \\in \\boxed{(0,1)}$.", 0.0),
    ("equation", "y = 2x + 1", "The line is $\\boxed{y=2x+1}$.", 1.0),
    ("equation", "x = 5", "We get $\\boxed{x=4}$.", 0.0),
    ("text", "\\text{Evelyn}", "Therefore $\\boxed{\\text{Evelyn}}$ is our answer.", 1.0),
    ("text", "Evelyn", "Therefore $\\boxed{\\text{Carla}}$ is our answer.", 0.0),
    ("unit", "15\\mbox{ cm}^2", "The area is $\\boxed{15\\text{ cm}^2}$.", 1.0),
    ("unit", "90^\\circ", "The angle is $\\boxed{45^\\circ}$.", 0.0),
    ("multiple_choice", "\\text{(C)}", "Checking each option, the answer is (C).", 1.0),
    ("multiple_choice", "C", "So the correct option is $\\boxed{\\text{(B)}}$.", 0.0),
    # A MATH solution as the reference: its last box is the answer.
    ("latex", "so $\\frac{1}{2}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.", "It is $0.75$.", 1.0),
]


def test_each_answer_kind():
    assert {kind for kind, *_ in KIND_CASES} == KINDS
    rewards = math_answer(completions=[c for _, _, c, _ in KIND_CASES],
                          answer=[r for _, r, _, _ in KIND_CASES])
    wrong = [case for case, reward in zip(KIND_CASES, rewards) if reward != case[3]]
    assert not wrong


def test_a_grader_timeout_scores_zero_and_counts_as_an_error():
    grader = make_math_answer(workers=1, timeout_s=1.0)
    try:
        # sympy evaluates 9^(9^(9^9)) in C, where no signal reaches: only a kill ends it.
        completions = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{2}}", "#### 5"]
        start = time.monotonic()
        rewards, stats = compute_rewards([_either_convention(grader)], ["math"], ["p"] * 3,
                                         completions, {"answer": ["1", "0.5", "5"]},
                                         on_error="raise")
        elapsed = time.monotonic() - start
    finally:
        grader.pool.close()
    assert rewards[:, 0].tolist() == [0.0, 1.0, 1.0]
    assert stats["rewards/math/errors"] == 1.0
    assert stats["rewards/math/mean"] == pytest.approx(2 / 3)
    assert elapsed < 30  # 1 s of timeout, plus a worker start or two on a busy machine


def _either_convention(grader):
    """`grader` callable as fn(prompts, completions, **columns) or by keyword (TRL's call)."""
    def graded(prompts, completions, answer, **kwargs):
        return grader(completions=completions, answer=answer)

    return graded


def test_failed_reward_is_zero_and_marked():
    failed = FailedReward(0.0, "timed out")
    assert failed == 0.0 and float(failed) == 0.0 and failed.reason == "timed out"


def test_pool_reports_crashes_and_exceptions_and_keeps_its_workers():
    pool = GradingPool("math:sqrt", workers=2, timeout_s=10.0)
    try:
        assert pool.map([[4.0], ["x"], [9.0]])[::2] == [2.0, 3.0]
        pids = [w.process.pid for w in pool._workers]
        failed = pool.map([["x"]])[0]
        assert isinstance(failed, TaskFailed) and "TypeError" in failed.reason
        assert [w.process.pid for w in pool._workers] == pids  # reused across calls
    finally:
        pool.close()
    crashing = GradingPool("os:_exit", workers=1, timeout_s=10.0)
    try:
        result = crashing.map([[3]])[0]
        assert isinstance(result, TaskFailed) and "exited with code 3" in result.reason
    finally:
        crashing.close()


def test_workers_die_with_the_process_that_started_them():
    script = (
        "from grpo_ds.rewards.grading_pool import GradingPool\n"
        "pool = GradingPool('time:sleep', workers=2, timeout_s=600)\n"
        "pool.map([[0]])\n"
        "print(*[w.process.pid for w in pool._workers], flush=True)\n"
        "pool.map([[600], [600]])\n"  # both workers busy in a C-level sleep
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rank = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        pids = [int(p) for p in rank.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        time.sleep(0.5)  # let both start sleeping
        rank.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the kernel can help
        rank.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        rank.kill()


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_grading_bench_runs_and_grades_its_workload(capsys):
    from grpo_ds.tools.bench.grading import main

    assert main(["--samples", "20", "--chars", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["numbers_graded_as_expected"] == result["latex_graded_as_expected"] == 20
    assert result["numbers_s_per_1000"] > 0 and result["latex_s_per_1000"] > 0
