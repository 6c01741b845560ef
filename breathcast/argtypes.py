"""argparse value types shared by the command-line modules: a bad value becomes argparse's one-line error.

Example:
    >>> positive_float("2.5"), non_negative_float("0"), int_at_least(1)("3")
    (2.5, 0.0, 3)
"""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["int_at_least", "positive_float", "non_negative_float", "phase_item"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A parser of integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """A float > 0."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A float >= 0."""
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def phase_item(text: str) -> tuple[str, float]:
    """``SERIES=PERCENT`` (a 4DCT series and its breathing phase, "%" optional) as (series, percent).

    Example:
        >>> phase_item("Gated, 50%=50"), phase_item("phase_03=30%")
        (('Gated, 50%', 50.0), ('phase_03', 30.0))
    """
    key, _, value = text.rpartition("=")
    try:
        percent = float(value.strip().rstrip("%"))
    except ValueError:
        key = ""
    if not key:
        raise argparse.ArgumentTypeError(f"expected SERIES=PERCENT (SeriesDescription, SeriesInstanceUID or folder name), got {text!r}")
    return key, percent
