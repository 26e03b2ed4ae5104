"""The input discipline every nemojax command shares: flags are range-checked while parsing, everything
else that can be checked is checked before work starts, and bad input ends as `error: MESSAGE` (naming
the file, line, field or tensor) with exit status 2 and no traceback."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from nemojax.config import INT32_MAX
from nemojax.errors import NemojaxError, NemojaxWarning

BAD_INPUT = 2


def report_errors(run: Callable[[], int]) -> int:
    """`run()`'s status, or BAD_INPUT after printing a nemojax error's message; nemojax warnings are
    printed as `warning: MESSAGE`."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning(warnings.showwarning)
        try:
            return run()
        except NemojaxError as e:
            print(f"error: {e}", file=sys.stderr)
            return BAD_INPUT


def _show_warning(default: Callable) -> Callable:
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, NemojaxWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def int_in(low: int, high: int = INT32_MAX) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (argparse names the flag when it is not)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value

    parse.__name__ = "number"
    return parse
