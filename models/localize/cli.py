"""``scopestream train localize --camera scanning|widefield --out DIR``: the localization network.

Simulates a training set, a validation set and a held-out test set from disjoint seeds with the
chosen simulated camera, trains the heat-map / offset / uncertainty network (``locnet``), writes a
report (``report.md``, ``metrics.json``, curves, calibration and example figures) and the model folder
``DIR/model`` (ONNX + torch weights + ``card.json`` + ``MODEL_CARD.md``). Copy that folder to
``models/weights/localize_<camera>/`` to ship it. Needs the ``train`` extra (torch, tqdm, matplotlib, onnx).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scopestream.daemon._errors import InputError
from scopestream.models.cli import check_at_least, command_line, require_train_extra


def add_localize_parser(sub: Any) -> None:
    """Add ``localize`` to the ``train`` command's sub-parser collection."""
    m = sub.add_parser("localize", help="localization network (heat map + offsets + uncertainty)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--camera", required=True, choices=("scanning", "widefield"), help="simulated camera to train for")
    m.add_argument("--out", required=True, type=Path, help="output folder (report, figures, model folder)")
    m.add_argument("--seed", type=int, default=0, help="seed of the training data and the training (validation: 5*10**8 + seed, test: 10**9 + seed)")
    m.add_argument("--train-frames", type=int, default=16000, help="simulated training frames (default 16000)")
    m.add_argument("--test-frames", type=int, default=2000, help="simulated test frames (default 2000)")
    m.add_argument("--size", type=int, default=32, dest="size_px", help="training frame side, px, a multiple of 4 (default 32)")
    m.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    m.add_argument("--channels", type=int, default=10, help="feature maps at full resolution (default 10)")
    m.add_argument("--no-full-skip", action="store_true", help="no full-resolution skip into the head (the smaller 41k network)")
    m.add_argument("--nms-cells", type=int, default=None,
                   help="decoding neighbourhood, cells (odd; default 5 for scanning: blurred spots, 3 for widefield: dense spots)")
    m.add_argument("--dense-offsets", action=argparse.BooleanOptionalAction, default=None,
                   help="train offsets at the 3 x 3 cells around each particle and decode by pooling them "
                   "(default on for scanning: blurred spots spread over several cells; off for widefield)")
    m.add_argument("--heavy-blur-fraction", type=float, default=None,
                   help="fraction of training scenes with D drawn from [1.5, 10] um^2/s (scanning; default 0.5 for "
                   "scanning, 0 for widefield); validation and test sets keep the recorded ranges")
    m.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_train_localize)


def _cmd_train_localize(args: argparse.Namespace) -> int:
    check_at_least((("--train-frames", args.train_frames, 64), ("--test-frames", args.test_frames, 1),
                             ("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                             ("--channels", args.channels, 1), ("--threads", args.threads, 1), ("--size", args.size_px, 16)))
    nms = args.nms_cells if args.nms_cells is not None else (5 if args.camera == "scanning" else 3)
    if nms < 1 or nms % 2 == 0:
        raise InputError(f"--nms-cells must be a positive odd number, got {nms}")
    dense = args.dense_offsets if args.dense_offsets is not None else args.camera == "scanning"
    blur = args.heavy_blur_fraction if args.heavy_blur_fraction is not None else (0.5 if args.camera == "scanning" else 0.0)
    if not 0.0 <= blur <= 1.0:
        raise InputError(f"--heavy-blur-fraction must be within [0, 1], got {blur}")
    if args.size_px % 4:
        raise InputError(f"--size must be a multiple of 4 (the network's input multiple), got {args.size_px}")
    require_train_extra()
    from scopestream.models.localize._train import TrainSettings, train_localize

    command = command_line(f"scopestream train localize --camera {args.camera} --out {args.out} --seed {args.seed}")
    settings = TrainSettings(
        camera=args.camera, out=args.out, seed=args.seed, train_frames=args.train_frames, test_frames=args.test_frames,
        size_px=args.size_px, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, channels=args.channels,
        threads=args.threads, progress=not args.no_progress, command=command, full_skip=not args.no_full_skip,
        nms_cells=nms, dense_offsets=dense, pool_decoding=dense, heavy_blur_fraction=blur,
    )
    train_localize(settings)
    return 0
