"""``scopestream simulate``: write a simulated movie (multi-page TIFF) and its ground truth (CSV).

The daemon's command line adds this subcommand with :func:`add_simulate_command`. Only the
standard library is imported at the top (declaring the parser must stay cheap); the simulators are
imported when the command runs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from scopestream.daemon._errors import InputError

__all__ = ["MAX_FRAMES", "add_simulate_command", "check_arguments", "movie_bytes", "run_simulate"]

MAX_FRAMES = 10_000_000
"""Most frames one ``simulate`` writes (a sanity bound; free disk space is checked as well)."""
MAX_PARTICLES = 100_000
_TRUTH_BYTES_PER_ROW = 120  # a CSV row of the truth table, generously


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
    from scopestream.daemon._config import load_config
    from scopestream.sim_camera._simulate import simulate_to_files

    out = Path(args.out)
    truth_path = Path(args.truth)
    check_arguments(args.frames, args.size, args.particles, args.seed, out, truth_path)
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


def movie_bytes(n_frames: int, size_px: int) -> int:
    """Bytes of a uint16 movie of ``n_frames`` square frames of ``size_px`` (pixels only)."""
    return n_frames * size_px * size_px * 2


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"  # pragma: no cover


def check_arguments(n_frames: int, size_px: int, n_particles: int, seed: int, out: Path, truth: Path) -> None:
    """Refuse arguments before anything is allocated or written.

    Raises
    ------
    InputError
        Naming the argument: a count out of range, a missing output folder, or outputs larger
        than the free space on their disk.
    """
    if not 1 <= n_frames <= MAX_FRAMES:
        raise InputError(f"--frames must be between 1 and {MAX_FRAMES}, got {n_frames}")
    if not 4 <= size_px <= 8192:
        raise InputError(f"--size must be between 4 and 8192 px, got {size_px}")
    if not 0 <= n_particles <= MAX_PARTICLES:
        raise InputError(f"--particles must be between 0 and {MAX_PARTICLES}, got {n_particles}")
    if not 0 <= seed < 2**63:
        raise InputError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    for path, option in ((out, "--out"), (truth, "--truth")):
        if not path.parent.exists():
            raise InputError(f"{option}: folder {str(path.parent)!r} does not exist")
    # The truth table has a row per particle (inside the field and in its margin) per frame.
    needs = {out.parent.resolve(): movie_bytes(n_frames, size_px)}
    truth_bytes = n_frames * max(n_particles, 1) * 2 * _TRUTH_BYTES_PER_ROW
    needs[truth.parent.resolve()] = needs.get(truth.parent.resolve(), 0) + truth_bytes
    for folder, size in needs.items():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise InputError(
                f"{n_frames} frames of {size_px}×{size_px} px and their truth need about "
                f"{_human_bytes(size)} in {str(folder)!r}, which has {_human_bytes(free)} free; "
                "ask for fewer frames or a smaller --size"
            )
