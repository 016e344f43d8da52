"""Grade one completion against one reference with Hugging Face's Math-Verify.

Math-Verify (`parse` + `verify`, the grader TRL and open-r1 use) turns LaTeX, boxed answers,
sets, tuples, intervals, equations, `\\text{}` answers and units into sympy objects and compares
them. It finds an answer only where it is marked: inside `$...$`, `\\(...\\)`, `\\[...\\]` or
`\\boxed{}`, after "final answer is", or as a plain number or arithmetic. A bare `\\frac13` or
`2\\sqrt{2}` with no delimiters parses to nothing, so this module hands it candidate texts, tried
in order until one parses:

- the reference: a GSM8K solution's text after its last `####`; a solution or string that has
  `\\boxed{}` or math delimiters as it is; any other value wrapped in `$...$` (and a plain word
  such as `Evelyn` as `$\\text{Evelyn}$`, so it does not become the product E*v*e*l*y*n);
- the completion, in `extract_final_answer`'s order: inside the last `<answer>` tags, the text
  after the first `####`; the text as it is when it has a `\\boxed{}` (Math-Verify reads every
  box: `\\boxed{1}, \\boxed{2}`); the line after "the answer is" (wrapped when it carries no
  delimiters); a bare one-line answer wrapped; then the whole text for Math-Verify's own search.

A reference that is one letter A-E (`C`, `(C)`, `\\text{(C)}`) is multiple choice: the
completion's letter is read from its box, its "answer is" line or Math-Verify's letter search.

Math-Verify's own timeouts use SIGALRM (main thread only) and cannot stop a C-level sympy
computation; grading_pool.py enforces the real per-sample timeout by killing the worker, so the
workers call `verify_answer(..., timeout_s=None)`. math_verify is imported on first use: it costs
about a second, and the launcher imports this package without grading anything.
"""

from __future__ import annotations

import re

from grpo_ds.rewards.answer_extraction import _ANSWER_TAG_RE, _last_boxed, stated_line

CHOICES = ("A", "B", "C", "D", "E")
_DELIMITED_RE = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
_WORDS_RE = re.compile(r"^[A-Za-z][A-Za-z' -]*[A-Za-z]$")  # "Evelyn", "no solution"
_PROSE_TAIL_RE = re.compile(r"\s(?:because|since|as|so|which)\b|\.(?:\s|$)", re.IGNORECASE)
_PROSE_WORD_RE = re.compile(r"[A-Za-z]{3,}")  # "sqrt" aside, answers use 1-2 letter names
_LATEX_COMMAND_RE = re.compile(r"sqrt|pi")
_NUMERAL_RE = re.compile(r"^[-+]?\d[\d.,]*(?: \d{3})*%?$")  # one number: 1 000, 1000,99
_CHOICE_WRAPPERS_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_PARENTHESISED_CHOICE_RE = re.compile(r"\(([A-E])\)")


def gold_candidates(reference) -> list[str]:
    """Texts for Math-Verify to parse as the reference, best first."""
    text = str(reference).strip()
    if "####" in text:
        return _bare_candidates(text.rsplit("####", 1)[1].strip())
    if _DELIMITED_RE.search(text):
        return [text]
    return _bare_candidates(text)


def prediction_candidates(completion: str) -> list[str]:
    """Texts for Math-Verify to parse as the completion's answer, best first."""
    tags = _ANSWER_TAG_RE.findall(completion)
    region = tags[-1] if tags and tags[-1].strip() else completion
    candidates: list[str] = []
    if "####" in region:
        candidates += _bare_candidates(region.split("####", 2)[1].split("\n", 1)[0].strip())
    if _last_boxed(region) is not None:
        candidates.append(region)  # Math-Verify reads every box: "\boxed{1} and \boxed{2}"
    line = stated_line(region)
    if line is not None:
        line = line.strip()
        if not _DELIMITED_RE.search(line):
            line = _PROSE_TAIL_RE.split(line, maxsplit=1)[0]
        candidates += _bare_candidates(line.strip().strip("*").rstrip(".").strip())
    if "\n" not in region.strip() and not _DELIMITED_RE.search(region):
        candidates += _bare_candidates(region.strip().rstrip("."))  # a bare answer: "\frac13"
    candidates.append(region)
    return list(dict.fromkeys(c for c in candidates if c.strip()))  # in order, once each


def _bare_candidates(value: str) -> list[str]:
    """An undelimited value as Math-Verify can read it: `$value$`, then the value as it is.

    Prose ("I have 3 apples": a word of 3+ letters, no LaTeX command) is left as it is for
    Math-Verify's own search: wrapped in `$...$` it would parse as a product of letters.
    """
    if not value or _DELIMITED_RE.search(value):
        return [value]
    if _WORDS_RE.match(value) and len(value) > 1:
        return [f"$\\text{{{value}}}$"]
    if "\\" not in value and _PROSE_WORD_RE.search(_LATEX_COMMAND_RE.sub("", value)):
        return [value]
    if _NUMERAL_RE.match(value):  # "1 000", "1000,99": Math-Verify's number reader knows these
        return [value, f"${value}$"]
    return [f"${value}$", value]


def choice_letter(text: str) -> str | None:
    """The letter of a multiple-choice answer written as `C`, `(C)`, `$\\text{(C)}$`, else None."""
    text = str(text).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    boxed = _last_boxed(text)
    if boxed is not None:
        text = boxed
    text = _CHOICE_WRAPPERS_RE.sub(r"\1", text.replace("$", "")).strip().rstrip(".").strip()
    text = text.strip("*").strip()
    if len(text) == 3 and text[0] == "(" and text[2] == ")":
        text = text[1]
    return text if text in CHOICES else None


def _predicted_choice(completion: str, timeout_s: int | None) -> str | None:
    """The letter a completion chose: its box, its "answer is" line, else Math-Verify's search."""
    from math_verify import StringExtractionConfig, parse

    tags = _ANSWER_TAG_RE.findall(completion)
    region = tags[-1] if tags and tags[-1].strip() else completion
    boxed = _last_boxed(region)
    if boxed is not None:
        return choice_letter(boxed)
    line = stated_line(region)
    if line is not None:
        first_word = (line.split() or [""])[0].rstrip(".,;:")
        if choice_letter(first_word):
            return choice_letter(first_word)
    # Math-Verify's letter patterns want a bare letter: "(C)", "$\text{C}$" -> "C".
    unwrapped = _CHOICE_WRAPPERS_RE.sub(r"\1", region).replace("$", " ")
    unwrapped = _PARENTHESISED_CHOICE_RE.sub(r" \1 ", unwrapped)
    found = parse(unwrapped, [StringExtractionConfig(strings=CHOICES)], parsing_timeout=timeout_s)
    return str(found[0]).upper() if found else None


def _first_parse(candidates: list[str], timeout_s: int | None) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    for text in candidates:
        parsed = parse(text, configs, parsing_timeout=timeout_s)
        if parsed:
            return parsed
    return []


def verify_answer(completion: str, reference, timeout_s: int | None = 5) -> bool:
    """Whether the completion's final answer equals the reference, by Math-Verify.

    timeout_s is Math-Verify's own SIGALRM limit per parse and comparison (main thread only);
    None disables it, for callers that enforce a timeout from outside (the grading workers).
    """
    from math_verify import verify

    letter = choice_letter(reference)
    if letter is not None:
        return _predicted_choice(completion, timeout_s) == letter
    gold = _first_parse(gold_candidates(reference), timeout_s)
    if not gold:
        return False
    predicted = _first_parse(prediction_candidates(completion), timeout_s)
    return bool(predicted) and bool(verify(gold, predicted, timeout_seconds=timeout_s))
