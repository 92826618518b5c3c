"""argparse value types shared by the CLI modules: a bad value is one usage line, never a traceback."""

from __future__ import annotations

import argparse


def _bounded_int(text: str, low: int, why: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} {why}")
    return value


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, "must be at least 1")


def nonnegative_int(text: str) -> int:
    return _bounded_int(text, 0, "cannot be negative")
