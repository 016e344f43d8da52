"""Where a written answer is and what number it is: the regex half of `math_answer`.

1. `extract_final_answer(text)` finds the answer a person or a model wrote, trying these forms in
   order (the first form present wins):
     `<answer>...</answer>` tags (the rest of the search runs inside the last pair),
     `#### 42` (GSM8K),  `\\boxed{42}` (nested braces allowed),
     `The answer is 42` / `Final answer: 42` / `answer = 42`,  a line `A: 42`,
     and otherwise the last number in the text.
   For `####` and "the answer is" the FIRST occurrence counts: a base model prompted with
   "Question: ...\\nAnswer:" often runs on into a made-up next question and answers that too
   (lm-evaluation-harness's GSM8K filters also take the first match). For `\\boxed{}` the last
   one counts, as in MATH graders.
2. `normalize_number(text)` turns a written number into an exact `fractions.Fraction`, or None:
   thousands separators (`1,234`, `1 234`), currency (`$5`, `-$5`, `€5`, `£`, `¥`), a percent sign
   (`50%` is 50: GSM8K asks "what percent" and expects the bare number), `5.00`, `+7`, `−3`
   (unicode minus), `.5`, simple fractions (`3/4`, `\\frac{3}{4}`), LaTeX wrappers (`$...$`,
   `\\text{...}` units) and surrounding spaces.
3. `reference_answer(reference)`: the text after a GSM8K solution's last `####`, else the content
   of the last `\\boxed{}`, else all of it.

Everything here is pure and fast (regexes and fractions); grpo_ds/rewards/math_answer.py
compares two plain numbers with these alone and hands every other answer to Math-Verify.
"""

from __future__ import annotations

import re
from fractions import Fraction

# One written number, found anywhere in text. A leading sign counts only when it is not glued to
# a previous term, so in "10-5" the number is 5, not -5.
_NUMBER_PATTERN = r"""
    (?<![\w.])
    (?: [-+\u2212] \s? )?  (?: [$€£¥] \s? )?  [-\u2212]?
    (?:
        \\[dt]?frac\{ \s* \d+ (?:\.\d+)? \s* \} \{ \s* \d+ (?:\.\d+)? \s* \}
      | (?: \d{1,3} (?: ,\d{3} )+ (?![\d]) | \d+ ) (?: \.\d+ )? (?: \s? / \s? \d+ (?:\.\d+)? )?
      | \.\d+
    )
    (?: \s? \\?% )?
"""
_NUMBER_RE = re.compile(_NUMBER_PATTERN, re.VERBOSE)

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS_RE = re.compile(r"\banswer\b\**[ \t]*(?:is\b[ \t]*:?|:|=)\**", re.IGNORECASE)
_CLAUSE_END_RE = re.compile(r"[.;,!?](?=\s|$)|\s(?:because|since|as|so|which)\b", re.IGNORECASE)
# A one-letter variable glued to a digit or next to an operator: "2x", "x+1", "y = 3".
_ALGEBRA_RE = re.compile(
    r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])(?=\s*[-+*/^=)]|\d)"  # x+1, x2
    r"|(?<=[-+*/^=(])\s*[A-Za-z](?![A-Za-z])"  # 1+x, (x
    r"|(?<=\d)[A-Za-z](?![A-Za-z])"  # 2x (but not "5 m", a unit)
)
_A_COLON_RE = re.compile(r"^[ \t]*A[ \t]*:[ \t]*([^\n]*)", re.MULTILINE)

# Layout that carries no value: LaTeX spacing, \text{...} units, \left/\right, degree signs.
_LATEX_NOISE_RE = re.compile(
    r"\\(?:text|mathrm|textbf|mbox)\s*\{[^{}]*\}|\\[,;:! ]|\\(?:left|right)\b|\^\s*\{?\\circ\}?"
)


def extract_final_answer(text: str) -> str | None:
    """The final answer written in `text` (a string: "42", "$1,234", "3/4", "x+1"), or None."""
    return final_answer(text)[0]


def final_answer(text: str) -> tuple[str | None, str]:
    """(the final answer or None, the form it was found in: "####", "boxed", "stated", "A:",
    "last number", or "" when there is none). The last number is a guess; the others are marked."""
    if not text:
        return None, ""
    tags = _ANSWER_TAG_RE.findall(text)
    if tags and tags[-1].strip():
        text = tags[-1]
    if "####" in text:
        return _answer_in_segment(text.split("####", 2)[1].split("\n", 1)[0], prose=False), "####"
    boxed = _last_boxed(text)
    if boxed is not None:
        return _answer_in_segment(boxed, prose=False), "boxed"
    line = stated_line(text)
    if line is not None:
        answer = _answer_in_segment(line, prose=True)
        if answer is not None:
            return answer, "stated"
    for line in reversed(_A_COLON_RE.findall(text)):
        # "A:" also opens a whole worked solution in few-shot prompts; only "A: 42" is an answer.
        first = _NUMBER_RE.match(line.strip())
        if first:
            return first.group(0).strip(), "A:"
    numbers = _NUMBER_RE.findall(text)
    return (numbers[-1].strip(), "last number") if numbers else (None, "")


def stated_line(text: str) -> str | None:
    """The rest of the line after the first "the answer is" / "answer:" marker, or None.

    "Final Answer: The final answer is $28$." has two markers on one line: the last one counts.
    """
    stated = _ANSWER_IS_RE.search(text)
    if not stated:
        return None
    line = text[stated.end() :].split("\n", 1)[0]
    again = _ANSWER_IS_RE.search(line)
    if again and len(line[: again.start()]) <= 30 and not re.search(r"\d", line[: again.start()]):
        line = line[again.end() :]  # a second marker right after the first, not "5, not 6"
    return line


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, with nested braces (`\\boxed{\\frac{1}{2}}`)."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for pos in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start:pos]
    return text[start:]  # unclosed: the model ran out of tokens; take what is there


def _answer_in_segment(segment: str, *, prose: bool) -> str | None:
    """The answer inside the text after a marker: "72 clips." -> "72", "x+1" -> "x+1".

    After "the answer is" prose may follow ("72, since 48 + 24 = 72"), so only the first clause
    is read. An answer that looks like algebra is kept whole (Math-Verify compares it); otherwise
    the first number is the answer and the rest is units or explanation.
    """
    cleaned = _strip_wrappers(segment)
    if prose:
        cleaned = _strip_wrappers(_CLAUSE_END_RE.split(cleaned, maxsplit=1)[0])
    if not cleaned:
        return None
    if normalize_number(cleaned) is not None:
        return cleaned
    first = _NUMBER_RE.search(cleaned)
    if _looks_like_expression(cleaned, first, prose=prose):
        return cleaned
    return first.group(0).strip() if first else None


def _looks_like_expression(text: str, first: re.Match | None, *, prose: bool) -> bool:
    """ "x+1", "2x", "2\\sqrt{2}" are algebra; "72 clips", "3 and 4", "5 m" are number and words."""
    if re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", "", text)):
        return False  # words (LaTeX commands aside): prose around a number
    if first is None or "\\" in text or _ALGEBRA_RE.search(text):
        return True
    if prose:
        return False  # "72 (48 + 24)": the working shown after the answer
    rest = text[: first.start()] + text[first.end() :]
    return bool(re.search(r"[\d+\-*/^=]", rest))  # "#### 5 - 3": not one number, keep it whole


def _strip_wrappers(text: str) -> str:
    """Remove markup around a value: spaces, **bold**, $...$ / \\(...\\), a final period."""
    text = _LATEX_NOISE_RE.sub("", text).strip()
    text = text.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")  # 14{,}916
    for _ in range(3):  # wrappers nest, e.g. **$42$**.
        before = text
        text = text.strip().rstrip(".;,!").strip()
        text = re.sub(r"^\*\*(.*)\*\*$", r"\1", text)
        text = re.sub(r"^\\\((.*)\\\)$", r"\1", text)
        text = re.sub(r"^\\\[(.*)\\\]$", r"\1", text)
        if len(text) > 1 and text.startswith("$") and text.endswith("$"):
            text = text.strip("$")
        if text == before:
            break
    return text.strip()


_PLAIN_NUMBER_RE = re.compile(
    r"""^(?: \d{1,3} (?: ,\d{3} )+ | \d{1,3} (?: [ \u202f\u00a0]\d{3} )+ | \d+ )? (?: \.\d+ )?$""",
    re.VERBOSE,
)
_FRACTION_RE = re.compile(r"^(.+?)\s*/\s*(.+)$")
_LATEX_FRAC_RE = re.compile(r"^\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")


def normalize_number(text: str | None) -> Fraction | None:
    """The exact value of a written number ("$1,234.00" -> Fraction(1234)), or None."""
    if text is None:
        return None
    body = _strip_wrappers(text)
    negative = False
    # Sign and currency come in either order: "-$5", "$-5", "- 5", "+7".
    while body and body[0] in "-+\u2212$€£¥ ":
        if body[0] in "-\u2212":
            negative = not negative
        body = body[1:]
    body = body.strip()
    body = body.rstrip("$€£¥ ")  # "5 €"
    if body.endswith("%"):
        body = body[:-1].rstrip()
    value = _unsigned_value(body)
    if value is None:
        return None
    return -value if negative else value


def _unsigned_value(body: str) -> Fraction | None:
    """Value of "1,234.5", "3/4" or "\\frac{3}{4}" (no sign, no currency), or None."""
    frac = _LATEX_FRAC_RE.match(body) or _FRACTION_RE.match(body)
    if frac:
        numerator, denominator = (_part_value(part.strip()) for part in frac.groups())
        if numerator is None or not denominator:  # also refuses a zero denominator
            return None
        return numerator / denominator
    return _decimal_value(body)


def _part_value(part: str) -> Fraction | None:
    """Numerator or denominator of a fraction: a decimal with an optional minus ("-3" in -3/4)."""
    if part[:1] in ("-", "\u2212"):
        value = _decimal_value(part[1:].strip())
        return None if value is None else -value
    return _decimal_value(part)


def _decimal_value(body: str) -> Fraction | None:
    if not body or body == "." or not _PLAIN_NUMBER_RE.match(body):
        return None
    return Fraction(re.sub(r"[, \u202f\u00a0]", "", body))


def reference_answer(reference: str) -> str:
    """A reference's value: the text after a GSM8K solution's last `####`, else the content of a
    MATH solution's last `\\boxed{}`, else all of it."""
    reference = str(reference)
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(reference)
    return (reference if boxed is None else boxed).strip()
