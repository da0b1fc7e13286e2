"""``scopestream simulate``: write a simulated movie (multi-page TIFF) and its ground truth (CSV).

The daemon's command line adds this subcommand with :func:`add_simulate_command`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from scopestream.daemon._config import load_config
from scopestream.daemon._errors import InputError

__all__ = ["add_simulate_command", "run_simulate"]


def add_simulate_command(subparsers: Any) -> None:
    """Add the ``simulate`` subcommand to an argparse ``subparsers`` object.

    The parser's ``func`` is :func:`run_simulate`, which returns the exit status.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="write a simulated movie and its exact ground truth",
        description=(
            "Simulate a widefield or scanning two-photon camera looking at moving, blinking "
            "particles; write the movie as a multi-page uint16 TIFF and the ground truth as CSV "
            "(frame, particle, x, y, state, D_um2_per_s, photons, z, visible, t_ms, speed_um_per_s). "
            "Scene parameters are the 'simulation' section of the configuration."
        ),
    )
    parser.add_argument("kind", choices=("widefield", "scanning"), help="which camera to simulate")
    parser.add_argument("--frames", type=int, required=True, metavar="N", help="number of frames")
    parser.add_argument("--size", type=int, default=64, metavar="PX", help="frame height and width, px (default 64)")
    parser.add_argument(
        "--particles", type=int, default=10, metavar="N",
        help="particles in the field of view at the start (default 10)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--out", required=True, metavar="MOVIE.tif", help="output movie (multi-page TIFF)")
    parser.add_argument("--truth", required=True, metavar="TRUTH.csv", help="output ground truth (CSV)")
    parser.add_argument("--config", metavar="FILE", help="configuration file (YAML or TOML)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override a configuration key, e.g. --set simulation.D_um2_per_s=0.5 (repeatable)",
    )
    parser.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``scopestream simulate`` with parsed arguments; return the exit status (0).

    Raises
    ------
    ConfigError
        Invalid configuration (names the key).
    InputError
        Invalid arguments or unwritable outputs.
    """
    from scopestream.sim_camera._simulate import simulate_to_files

    if args.frames < 1:
        raise InputError(f"--frames must be at least 1, got {args.frames}")
    if not 4 <= args.size <= 8192:
        raise InputError(f"--size must be between 4 and 8192 px, got {args.size}")
    if args.particles < 0:
        raise InputError(f"--particles must not be negative, got {args.particles}")
    if args.seed < 0:
        raise InputError(f"--seed must not be negative, got {args.seed}")
    out = Path(args.out)
    truth_path = Path(args.truth)
    for path, option in ((out, "--out"), (truth_path, "--truth")):
        if not path.parent.exists():
            raise InputError(f"{option}: folder {str(path.parent)!r} does not exist")
    config = load_config(args.config, args.overrides)
    metadata = {"axes": "TYX", "pixel_size_nm": config.optics.pixel_size_nm, "kind": args.kind, "seed": args.seed}
    try:
        # Frames and truth go to disk as they are simulated.
        simulate_to_files(
            config, args.kind, args.frames, out, truth_path, size_px=args.size, n_particles=args.particles,
            seed=args.seed, metadata=metadata,
        )
    except OSError as exc:
        raise InputError(f"cannot write output: {exc}") from None
    return 0
