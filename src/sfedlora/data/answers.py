"""GSM8K answers as text: the final number a reference or a generated answer gives.

A reference answer ends in ``#### <number>``; a generated answer is read the same way (the
number after its first ``####``, else its last number). Pure text, so data loading uses it
without pulling in model code.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

import numpy as np

ANSWER_MARK = "####"

# A number as GSM8K writes it: optional sign and dollar sign in either order ("-$5", "$-5"),
# thousands separators only in groups of three (so "1,2,3" is three numbers, not 123), an
# optional decimal part. A minus directly after a digit or letter is subtraction ("5-3"), not a sign.
_NUMBER = re.compile(r"(?<![\w.])(-)?\$?(-)?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def normalise_number(sign: bool, digits: str) -> str | None:
    """Canonical text of a number: no separators, no trailing zeros ("1,000.50" → "1000.5")."""
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    if sign:
        value = -value
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _numbers(text: str) -> list[str]:
    return [
        n
        for m in _NUMBER.finditer(text)
        if (n := normalise_number(bool(m.group(1) or m.group(2)), m.group(3)))
    ]


def final_number(text: str) -> str | None:
    """The answer a text gives: the first number after its first ``####``, else its last number.

    None when there is no number at all. Commas, ``$`` and trailing zeros are normalised away,
    so "$1,234.50" and "1234.5" are the same answer.
    """
    head, mark, tail = text.partition(ANSWER_MARK)
    if mark:
        after = _numbers(tail)
        if after:
            return after[0]
    found = _numbers(head if mark else text)
    return found[-1] if found else None


def exact_match(predictions: list[str], references: list[str | None]) -> float:
    """Share of predictions whose final number equals the reference's."""
    hits = [ref is not None and final_number(p) == ref for p, ref in zip(predictions, references)]
    return float(np.mean(hits)) if hits else 0.0
