"""Optional symbolic equality of two answers through sympy ("\\sqrt{4}" == "2", "2(x+1)" == "2x+2").

sympy is NOT a dependency of grpo-ds. When it cannot be imported, `symbolic_equal` returns False,
so answers that are not plain numbers score 0 and everything else works unchanged.

Completions are untrusted text and sympy's parser runs Python `eval`, so only short strings are
parsed, made of digits, arithmetic, single-letter variables, `sqrt` and `pi`, with exponents
limited to at most two small literal powers (`9^9^9` would never finish).
"""

from __future__ import annotations

import random
import re

_MAX_CHARS = 64
_ALLOWED_CHARS_RE = re.compile(r"^[0-9A-Za-z+\-*/().\s]*$")
_ALLOWED_WORDS = {"sqrt", "pi"}
_MAX_POWERS = 2
# An exponent is a small literal or one letter, never followed by another power (no towers).
_SMALL_POWER_RE = re.compile(
    r"\*\*\s*(?:\d{1,2}(?![\d.])|[A-Za-z](?![A-Za-z(])|\(\s*-?\d{1,2}\s*(?:/\s*\d{1,2}\s*)?\))"
    r"(?!\s*\*\*)"
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_SQRT_RE = re.compile(r"\\sqrt\s*\{([^{}]*)\}")


def _to_sympy_text(latex: str) -> str:
    """Rewrite the LaTeX that answers use into sympy's input syntax: \\frac{a}{b} -> ((a)/(b))."""
    text = latex.replace("\\left", "").replace("\\right", "")
    for _ in range(3):  # nested \frac{\frac{..}{..}}{..}, innermost first
        text = _LATEX_FRAC_RE.sub(r"((\1)/(\2))", text)
        text = _LATEX_SQRT_RE.sub(r"sqrt(\1)", text)
    for latex_op, python_op in (("\\pi", "pi"), ("\\cdot", "*"), ("\\times", "*"), ("^", "**")):
        text = text.replace(latex_op, python_op)
    return text.replace("{", "(").replace("}", ")").strip()


def _is_safe(text: str) -> bool:
    """Whether `text` is short, plain arithmetic that sympy can parse without risk or blow-up."""
    if not text or len(text) > _MAX_CHARS or not _ALLOWED_CHARS_RE.match(text):
        return False
    if any(len(w) > 1 and w not in _ALLOWED_WORDS for w in re.findall(r"[A-Za-z]+", text)):
        return False
    powers = text.count("**")
    return powers <= _MAX_POWERS and powers == len(_SMALL_POWER_RE.findall(text))


def _parse(answer: str):
    """A sympy expression for `answer`, or None when it is unsafe or does not parse."""
    import sympy
    from sympy.parsing import sympy_parser as sp

    text = _to_sympy_text(answer)
    if not _is_safe(text):
        return None
    transformations = sp.standard_transformations + (
        sp.implicit_multiplication_application,
        sp.rationalize,  # 0.5 -> 1/2, so that 0.5 == 1/2 exactly
    )
    names = {n: getattr(sympy, n) for n in ("Integer", "Float", "Rational", "Symbol", "sqrt", "pi")}
    try:
        return sp.parse_expr(
            text, local_dict={}, global_dict=names, transformations=transformations
        )
    except Exception:  # noqa: BLE001 (a parse failure means "not comparable", never a crash)
        return None


def symbolic_equal(predicted: str, reference: str) -> bool:
    """True when sympy is importable and both answers take the same value at a few points.

    Evaluating at random points (40 significant digits, relative tolerance 1e-25) instead of
    `sympy.simplify(a - b) == 0` keeps the cost bounded: simplify can expand (x+y+z+1)^99.
    """
    try:
        import sympy
    except ImportError:
        return False
    predicted_expr, reference_expr = _parse(predicted), _parse(reference)
    if predicted_expr is None or reference_expr is None:
        return False
    symbols = sorted(predicted_expr.free_symbols | reference_expr.free_symbols, key=str)
    if predicted_expr.free_symbols != reference_expr.free_symbols:
        return False
    rng = random.Random(0)  # fixed points: the same answer always gets the same reward
    try:
        for _ in range(3 if symbols else 1):
            point = {s: sympy.Rational(rng.randint(1, 97), rng.randint(1, 13)) for s in symbols}
            a, b = (sympy.N(e.xreplace(point), 40) for e in (predicted_expr, reference_expr))
            if not (a.is_finite and b.is_finite):  # 1/0 is zoo, and zoo - 1 compares as equal
                return False
            if not bool(sympy.Abs(a - b) <= sympy.Float("1e-25", 40) * (1 + sympy.Abs(a))):
                return False
        return True
    except Exception:  # noqa: BLE001 (complex or undefined values: not comparable, not equal)
        return False
