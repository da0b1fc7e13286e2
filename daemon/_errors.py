"""Errors that the command line turns into exit status 2 with a one-paragraph message."""

from __future__ import annotations


class InputError(ValueError):
    """An input file, argument or frame is not usable; the message names it and says why."""
