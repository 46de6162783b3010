"""What the offline commands share at their edge: argument types that refuse bad values before any work
starts, and the errors a command reports as `error: ...` (exit status 2) instead of a traceback."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from offline.data import DataError
from ranker.errors import RankerError

# What a user can cause and fix: bad data or files, a release that is not one, a refused policy.
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, RankerError, OSError)


def count(minimum: int) -> Callable[[str], int]:
    """An integer ≥ minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {value}")
        return value

    return parse


def fraction(text: str) -> float:
    """A number in 0..1."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in 0..1, got {text!r}")
    return value


def fractions(text: str) -> tuple[float, ...]:
    """Comma-separated numbers in 0..1."""
    return tuple(fraction(part) for part in text.split(","))


def positive(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def stream_id(text: str) -> str:
    """A Redis stream id, "<milliseconds>-<sequence>" (a position in the shared catalog log)."""
    ms, dash, seq = text.partition("-")
    if not (ms.isdigit() and dash and seq.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a stream id like 1700000000000-0, got {text!r}")
    return f"{int(ms)}-{int(seq)}"


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return path


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
