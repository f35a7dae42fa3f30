"""Errors the command line turns into one clear line.

Library code raises these instead of printing; `cli.py` prints the message on stderr and
exits with the error's code: 2 for bad input or usage, 1 for a failure while working.
"""

from __future__ import annotations


class XrayganError(Exception):
    """Base class: the message is the whole one-line explanation for the user."""

    exit_code = 1


class InputError(XrayganError):
    """Bad input: a missing folder, wrong layout, unreadable file, wrong checkpoint kind."""

    exit_code = 2


class TrainingError(XrayganError):
    """Work started but could not go on (for example a NaN loss)."""

    exit_code = 1


class WriteError(XrayganError):
    """An output could not be written (disk full, no permission, read-only folder); the
    previous version of the file, if any, is kept."""

    exit_code = 1


class Interrupted(XrayganError):
    """Ctrl-C: the message says what was kept and how to continue."""

    exit_code = 130


def require(ok: bool, message: str) -> None:
    """Raise InputError(message) unless `ok`: the one-line form of option checks."""
    if not ok:
        raise InputError(message)


def check_int(option: str, value: int, minimum: int = 1) -> None:
    require(value >= minimum, f"{option} {value}: must be at least {minimum}")


def check_float(option: str, value: float, low: float | None = 0.0, high: float | None = None,
                low_open: bool = True, high_open: bool = False) -> None:
    """A finite number within (low, high] by default; say which end is open."""
    import math

    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'above' if low_open else 'at least'} {low:g}" if low is not None else f"at most {high:g}")
        raise InputError(f"{option} {value}: must be a finite number {where}")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    require(value in choices, f"{option} {value!r}: must be one of {', '.join(choices)}")
