"""``scopestream train NETWORK``: one sub-command per network family, each in its own module.

The parser of each family is added by ``module.function(subparsers)``; the module is imported only
when ``train`` is on the command line (the CLI's lazy commands), and the family's training code
(torch, ...) only when its handler runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["TRAIN_NETWORKS", "add_train_command"]

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
