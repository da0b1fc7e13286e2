"""``scopestream train motion --out DIR``: train the motion-state networks on simulated data.

Simulates (or reads from ``--cache``) a training set and a held-out test set from disjoint seeds,
trains SRAN (MUSICAL images), a features-only MLP and the fused model, writes a report
(``report.md``, ``metrics.json``, loss/accuracy curves and confusion matrices as PNG) and exports the
shipped model (``--ship``, default ``fused``) as a model folder ``DIR/model`` (ONNX + torch weights +
``card.json`` + ``MODEL_CARD.md``). Copy that folder to ``models/weights/motion/`` to ship it.
Needs the ``train`` extra (torch, tqdm, matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scopestream.daemon._errors import InputError
from scopestream.models.cli import check_at_least, command_line, require_train_extra


def add_motion_parser(sub: Any) -> None:
    """Add ``motion`` to the ``train`` command's sub-parser collection."""
    m = sub.add_parser("motion", help="motion-state networks (Stat/RanW/RCir/Circ/Flow)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--out", required=True, type=Path, help="output folder (report, checkpoints, model folder)")
    m.add_argument("--seed", type=int, default=0, help="seed of the training data and the training (test set: 10**9 + seed)")
    m.add_argument("--samples-per-class", type=int, default=120, dest="movies_per_state",
                   help="simulated movies per state for training; each gives one K=200 and four K=50 windows (default 120)")
    m.add_argument("--test-samples-per-class", type=int, default=40, dest="test_movies_per_state",
                   help="simulated test movies per state (default 40)")
    m.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    m.add_argument("--k-frames", type=int, nargs=2, default=(200, 50), metavar=("K_LONG", "K_SHORT"),
                   help="window lengths: each movie has K_LONG frames, cut into one K_LONG window and K_LONG/K_SHORT shorter ones (default 200 50)")
    m.add_argument("--models", nargs="+", default=["sran", "track_mlp", "fused"], help="models to train and compare")
    m.add_argument("--ship", default="fused", help="model exported as the model folder (default fused)")
    m.add_argument("--channels", type=int, default=8, help="feature maps of the image branch (default 8)")
    m.add_argument("--subpixels", type=int, default=4, help="MUSICAL sub-pixels per pixel of the image input (default 4)")
    m.add_argument("--cache", type=Path, default=None, help="folder caching simulated sets (outside the repository)")
    m.add_argument("--workers", type=int, default=1, help="processes simulating data (default 1)")
    m.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_train_motion)


def _cmd_train_motion(args: argparse.Namespace) -> int:
    check_at_least((("--samples-per-class", args.movies_per_state, 1), ("--test-samples-per-class", args.test_movies_per_state, 1),
                             ("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 1),
                             ("--threads", args.threads, 1), ("--channels", args.channels, 1), ("--subpixels", args.subpixels, 1)))
    k_long, k_short = args.k_frames
    if not (10 <= k_short <= k_long) or k_long % k_short:
        raise InputError(f"--k-frames needs 10 <= K_SHORT <= K_LONG with K_LONG a multiple of K_SHORT, got {k_long} {k_short}")
    from scopestream.models._registry import list_models

    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        raise InputError(f"unknown model(s) {unknown}; models are {list_models()}")
    if args.ship not in args.models:
        raise InputError(f"--ship {args.ship!r} is not among --models {args.models}")
    require_train_extra()
    from scopestream.models.motion._inputs import InputSpec
    from scopestream.models.motion._train import TrainSettings, train_motion

    command = command_line(f"scopestream train motion --out {args.out} --seed {args.seed} --samples-per-class {args.movies_per_state}")
    settings = TrainSettings(
        out=args.out, seed=args.seed, movies_per_state=args.movies_per_state,
        test_movies_per_state=args.test_movies_per_state, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, k_frames=(k_long, k_short), models=tuple(args.models), ship=args.ship, channels=args.channels,
        cache_dir=args.cache, workers=args.workers, threads=args.threads, progress=not args.no_progress,
        command=command, spec=InputSpec(subpixels=args.subpixels),
    )
    train_motion(settings)
    return 0
