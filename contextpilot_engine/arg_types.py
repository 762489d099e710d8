"""Command-line value types that check their range, so a bad value is argparse's one-line error.

Every ``contextpilot`` subcommand and script uses these instead of a bare
``int`` or ``float``: a value the program would only reject later (with a
traceback, or after an engine has started) is refused while parsing, naming
the flag.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

__all__ = ["int_at_least", "positive_float", "non_negative_float", "port", "share", "existing_file", "int_list"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An int >= ``minimum`` (underscores allowed: ``100_000``)."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int>={minimum}"
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def share(text: str) -> float:
    """A fraction in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text}")
    return value


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def int_list(minimum: int) -> Callable[[str], list[int]]:
    """A comma list of ints >= ``minimum``."""
    one = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
        return values

    return parse
