"""GSM8K: final-number extraction (last \\boxed{} first, else the last number) and numeric scoring."""
from __future__ import annotations

import re
from fractions import Fraction

from tflow.data import last_boxed

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_number(text: str) -> Fraction | None:
    s = text.replace("$", "").replace(",", "").replace("\\!", "").strip().rstrip(".")
    m = re.fullmatch(r"\\(?:d|t)?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str | None:
    """The predicted final answer as a string, or None when the output has no number."""
    boxed = last_boxed(text)
    if boxed is not None:
        nums = _NUMBER.findall(boxed.replace("\\,", ""))
        if _to_number(boxed) is not None:
            return boxed.strip()
        if nums:
            return nums[-1]
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def is_correct(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    a, b = _to_number(pred), _to_number(gold)
    return a is not None and b is not None and a == b
