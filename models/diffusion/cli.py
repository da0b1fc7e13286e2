"""``scopestream train diffusion --out DIR``: train the image-stack diffusion network on simulated data.

Renders a training set and a held-out test set (disjoint seeds: ``seed`` and ``10**9 + seed``) with
the widefield simulator (point emitters, D log-uniform over three decades, continuous exposure
R = 1/6 and stroboscopic R = 0), trains the ``stack_cnn`` network (mean and log-variance of ln D,
Gaussian NLL), writes a report (``report.md``, ``metrics.json``, PNG figures) and the model folder
``DIR/model`` (ONNX + torch weights + ``card.json`` + ``MODEL_CARD.md``). Copy that folder to
``models/weights/diffusion/`` to ship it. Needs the ``train`` extra (torch, tqdm, matplotlib, onnx).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scopestream.daemon._errors import InputError
from scopestream.models.cli import check_at_least, command_line, require_train_extra


def add_diffusion_parser(sub: Any) -> None:
    """Add ``diffusion`` to the ``train`` command's sub-parser collection."""
    m = sub.add_parser("diffusion", help="image-stack network for log D (seed 002)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--out", required=True, type=Path, help="output folder (report, checkpoints, model folder)")
    m.add_argument("--seed", type=int, default=0, help="seed of the training data and the training (test set: 10**9 + seed)")
    m.add_argument("--train-mosaics", type=int, default=100, help="simulated mosaics for training, 256 stacks each (default 100)")
    m.add_argument("--test-mosaics", type=int, default=32, help="simulated mosaics for the test set (default 32)")
    m.add_argument("--epochs", type=int, default=18, help="training epochs (default 18)")
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    m.add_argument("--channels", type=int, default=16, help="feature maps of the per-frame encoder (default 16)")
    m.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_train_diffusion)


def _cmd_train_diffusion(args: argparse.Namespace) -> int:
    check_at_least((("--train-mosaics", args.train_mosaics, 1), ("--test-mosaics", args.test_mosaics, 1),
                             ("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 2),
                             ("--threads", args.threads, 1), ("--channels", args.channels, 2)))
    if not args.lr > 0:
        raise InputError(f"--lr must be positive, got {args.lr}")
    require_train_extra()
    from scopestream.models.diffusion._train import TrainSettings, train_diffusion

    command = command_line(f"scopestream train diffusion --out {args.out} --seed {args.seed}")
    settings = TrainSettings(
        out=args.out, seed=args.seed, train_mosaics=args.train_mosaics, test_mosaics=args.test_mosaics,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, channels=args.channels,
        threads=args.threads, progress=not args.no_progress, command=command,
    )
    train_diffusion(settings)
    return 0
