"""``scopestream train NETWORK``: one sub-command per network family, each in its own module.

The parser of each family is added by ``module.function(subparsers)``; the module is imported only
when ``train`` is on the command line (the CLI's lazy commands), and the family's training code
(torch, ...) only when its handler runs.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from collections.abc import Iterable
from typing import Any

from scopestream.daemon._errors import InputError

__all__ = ["TRAIN_NETWORKS", "add_train_command", "check_at_least", "command_line", "progress_bar", "require_train_extra"]

TRAIN_NETWORKS: tuple[tuple[str, str], ...] = (
    ("scopestream.models.motion.cli", "add_motion_parser"),
    ("scopestream.models.diffusion.cli", "add_diffusion_parser"),
    ("scopestream.models.localize.cli", "add_localize_parser"),
)
"""(module, function): ``module.function(subparsers)`` adds one ``train`` sub-command."""


def add_train_command(subparsers: Any) -> None:
    """Add ``train`` and one sub-command per network family to an argparse sub-parser collection."""
    p = subparsers.add_parser("train", help="train a network on simulated data")
    sub = p.add_subparsers(dest="network", metavar="NETWORK")
    for module, function in TRAIN_NETWORKS:
        getattr(importlib.import_module(module), function)(sub)
    p.set_defaults(func=lambda args: _no_network(p))


def _no_network(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# -- what every family's sub-command shares ----------------------------------------------------


def check_at_least(values: Iterable[tuple[str, int, int]]) -> None:
    """InputError naming the first ``(option, value, smallest)`` whose value is below its smallest."""
    for name, value, low in values:
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")


def require_train_extra(modules: Iterable[str] = ("matplotlib", "onnx", "torch", "tqdm")) -> None:
    """InputError naming the missing module when the ``train`` extra is not installed."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f"`scopestream train` needs the train extra ({name} is missing): pip install 'scopestream[train]'") from None


def command_line(fallback: str) -> str:
    """The command as typed (for the model card), or ``fallback`` when not run from the CLI."""
    if sys.argv[1:2] == ["train"]:
        return "scopestream " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return fallback


def progress_bar(progress: bool, **kw: Any) -> Any:
    """A tqdm bar (``progress`` False: a silent one that still counts)."""
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, **kw)
