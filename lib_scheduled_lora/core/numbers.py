"""The one number grammar: every number a user types (schedules, XYZ values, ``FILE:W`` strengths,
command-line options) is read here.

A plain decimal with optional sign and exponent. Deliberately narrower than Python's ``float()``:
no ``nan``/``inf``, no underscores (``1_0``), no non-ASCII digits, and nothing that overflows
(``1e999``), so that every host, the JavaScript editor and the command line read the same text the
same way and no non-finite value can reach a model. Standard library only.
"""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
NON_FINITE_WORDS = frozenset({"nan", "inf", "infinity"})
_DIGITS = re.compile(r"[+-]?[0-9]+", re.ASCII)

NOT_A_NUMBER = "is not a number"
NOT_FINITE = "is not a finite number"
NOT_WHOLE = "is not a whole number"


class NumberSyntaxError(ValueError):
    """``text`` is not a number of the grammar; ``problem`` completes "'<text>' ..."."""

    def __init__(self, text: str, problem: str):
        self.text, self.problem = text, problem
        super().__init__(f"{text!r} {problem}")


def read_number(text: str) -> float:
    """The finite value of ``text`` (surrounding ASCII whitespace allowed); raises NumberSyntaxError."""
    stripped = text.strip(" \t\n\r\f\v")
    if NUMBER.fullmatch(stripped):
        value = float(stripped)
        if math.isfinite(value):
            return value
        raise NumberSyntaxError(stripped, NOT_FINITE)  # e.g. 1e999: a valid decimal that overflows
    if stripped.lower().lstrip("+-") in NON_FINITE_WORDS:
        raise NumberSyntaxError(stripped, NOT_FINITE)
    raise NumberSyntaxError(stripped, NOT_A_NUMBER)


def read_integer(text: str) -> int:
    """The whole number ``text`` reads as in the same grammar (``20``, ``+3``, ``1e3``); exact for
    plain digits of any length. Raises NumberSyntaxError for non-numbers, non-finite values and
    fractions (``2.5``)."""
    stripped = text.strip(" \t\n\r\f\v")
    if _DIGITS.fullmatch(stripped):
        return int(stripped)  # exact: a seed such as 2**64 - 1 must not pass through a float
    value = read_number(stripped)
    if not value.is_integer():
        raise NumberSyntaxError(stripped, NOT_WHOLE)
    if abs(value) >= 2**53:  # beyond this a float no longer holds every integer
        raise NumberSyntaxError(stripped, "is too large to be exact; write its digits")
    return int(value)


def looks_like_a_number(text: str) -> bool:
    """True when ``text`` was meant as a number (valid, or non-finite like ``nan``/``1e999``)."""
    try:
        read_number(text)
    except NumberSyntaxError as exc:
        return exc.problem == NOT_FINITE
    return True


def format_number(x: float) -> str:
    """Shortest text that reads back as exactly ``x``, without a trailing ``.0`` (1.0 -> "1").

    -0.0 prints as "0": they compare equal, and "-0" would only confuse.
    """
    if x == 0:
        return "0"
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text
