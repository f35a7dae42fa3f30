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
