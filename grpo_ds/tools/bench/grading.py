"""Benchmark: `math_answer`'s grading time per 1,000 samples.

    grpo-ds bench grading [--samples 1000] [--workers 2] [--chars 2000] [--json]

Two workloads of `--samples` completions each, about `--chars` characters long (worked LaTeX
steps, then the answer), graded by the built-in reward's own path:
  numbers   GSM8K-style: `#### N` / "The answer is N" against a number (tier 1, in-process)
  latex     MATH-style: boxed fractions, radicals, sets, tuples, intervals, equations, `\\text{}`
            and multiple choice, against LaTeX references, half of them wrong (Math-Verify, in
            the worker pool)
The pool is started and warmed before timing; its start time is reported on its own. The
figures are wall seconds per 1,000 samples on this machine, with `--workers` processes.
"""

from __future__ import annotations

import argparse
import json
import time

from grpo_ds.rewards.math_answer import make_math_answer

# (reference, right answer, wrong answer), written as MATH writes them.
_ANSWERS = [
    ("\\frac{3}{4}", "\\frac34", "\\frac{4}{3}"),
    ("2\\sqrt{2}", "\\sqrt{8}", "\\sqrt{6}"),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", "\\{1, 2\\}"),
    ("(6,31,-1)", "(6, 31, -1)", "(6, -1, 31)"),
    ("[0, 1)", "[0,1)", "[0,1]"),
    ("(-\\infty, -2) \\cup (2, \\infty)", "(-\\infty,-2)\\cup(2,\\infty)", "(-2,2)"),
    ("y = 2x + 1", "y=2x+1", "y=2x-1"),
    ("\\text{Evelyn}", "\\text{Evelyn}", "\\text{Carla}"),
    ("90^\\circ", "90", "45^\\circ"),
    ("\\text{(C)}", "C", "B"),
]
_STEP = ("We have $a_{n+1} = \\frac{a_n + 2}{3}$, so $3a_{n+1} - a_n = 2$ and "
         "$\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}$. ")


def _workloads(samples: int, chars: int) -> dict[str, tuple[list[str], list[str]]]:
    working = (_STEP * (chars // len(_STEP) + 1))[:chars]
    numbers = ([], [])
    latex = ([], [])
    for i in range(samples):
        value = 17 * i + 3
        answer = value if i % 2 == 0 else value + 1
        numbers[0].append(f"{working}\nSo the total is {answer}.\n#### {answer}")
        numbers[1].append(f"Some working.\n#### {value}")
        reference, right, wrong = _ANSWERS[i % len(_ANSWERS)]
        boxed = right if i % 2 == 0 else wrong
        latex[0].append(f"{working}\nTherefore the answer is $\\boxed{{{boxed}}}$.")
        latex[1].append(reference)
    return {"numbers": numbers, "latex": latex}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="completions per workload")
    parser.add_argument("--workers", type=int, default=2, help="grading processes (default 2)")
    parser.add_argument("--chars", type=int, default=2000, help="length of each completion")
    parser.add_argument("--json", action="store_true", help="print one JSON object on one line")
    args = parser.parse_args(argv)

    grade = make_math_answer(workers=args.workers)
    start = time.perf_counter()
    grade(completions=["$\\boxed{\\frac12}$"] * args.workers, answer=["0.5"] * args.workers)
    result = {"workers": args.workers, "samples": args.samples, "chars": args.chars,
              "pool_start_s": round(time.perf_counter() - start, 3)}
    for name, (completions, references) in _workloads(args.samples, args.chars).items():
        start = time.perf_counter()
        rewards = grade(completions=completions, answer=references)
        seconds = time.perf_counter() - start
        expected = [1.0 if i % 2 == 0 else 0.0 for i in range(args.samples)]
        result[f"{name}_s_per_1000"] = round(seconds * 1000 / args.samples, 3)
        result[f"{name}_graded_as_expected"] = sum(r == e for r, e in zip(rewards, expected))
    grade.pool.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"math_answer grading, {args.samples} samples of ~{args.chars} chars, "
              f"{args.workers} worker processes (pool start {result['pool_start_s']} s):")
        for name in ("numbers", "latex"):
            print(f"  {name:8s} {result[f'{name}_s_per_1000']:8.3f} s per 1,000 samples "
                  f"({result[f'{name}_graded_as_expected']}/{args.samples} graded as expected)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
