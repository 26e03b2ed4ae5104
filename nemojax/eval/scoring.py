"""Exact-match scoring of needle answers and recall tables."""

from __future__ import annotations

import re
from collections.abc import Sequence

_FIRST_NUMBER = re.compile(r"\d+")


def answer_number(text: str) -> str | None:
    """The first run of digits in a generated answer (None when it has none)."""
    match = _FIRST_NUMBER.search(text)
    return match.group() if match else None


def is_correct(text: str, value: str) -> bool:
    """Exact match: the answer's first number is the needle's value (not a prefix or extension of it)."""
    return answer_number(text) == value


def recall(outcomes: Sequence[bool]) -> float:
    """Fraction of correct answers (0.0 for none)."""
    return sum(outcomes) / len(outcomes) if outcomes else 0.0
