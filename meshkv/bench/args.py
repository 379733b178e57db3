"""Argument types for the ``meshkv bench`` commands: a bad value stops the command at parse
time with argparse's usage line and a message naming the flag (``argument --rounds:
expected a positive integer, got '0'``), not a ZeroDivisionError minutes into a run."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable


def _int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return n

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < x < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def int_range(text: str) -> tuple[int, int]:
    """``LOW-HIGH`` (or one number ``N`` for ``N-N``), 0 < LOW <= HIGH."""
    low, _, high = text.partition("-")
    try:
        a, b = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, got {text!r}") from None
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return a, b


def csv_of(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated, non-empty subset of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return items

    return parse


def model_arg(text: str) -> str:
    """A model directory (with its ``config.json``), or a hub id (``org/name``) that the
    engine resolves; a path that is no model directory is refused here."""
    if os.path.isabs(text) or text.startswith(".") or os.path.exists(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise argparse.ArgumentTypeError(f"{text} is not a model directory (no config.json)")
    elif not text:
        raise argparse.ArgumentTypeError("expected a model directory or hub id, got ''")
    return text
