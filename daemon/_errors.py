"""Errors that the command line turns into exit status 2 with a one-paragraph message.

Both live in this small module (no third-party imports) so that the command line can catch them
without importing the configuration models, pydantic or numpy first.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input file, argument or frame is not usable; the message names it and says why."""


class ConfigError(ValueError):
    """A configuration file or value is not acceptable; the message names the key and the value."""
