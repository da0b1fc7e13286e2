"""``scopestream musical INPUT --out OUT.tif``: MUSICAL of a recorded stack.

The whole stack is divided by its global maximum (as the published implementations do), then
either one image of all frames is computed, or, with ``--window-frames``, one image per sliding
window (same normalization and threshold for every window). The output is a float32 TIFF with one
page per window; its ImageDescription holds the parameters and each window's frame range as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from scopestream.daemon._errors import InputError


def _threshold(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (log10) or 'auto', got {text!r}") from None


def add_musical_command(subparsers: Any) -> None:
    """Add the ``musical`` sub-command to an argparse sub-parser collection.

    Parameters
    ----------
    subparsers
        What ``ArgumentParser.add_subparsers()`` returned.
    """
    p = subparsers.add_parser(
        "musical",
        help="MUSICAL super-resolution image(s) of a recorded stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", type=Path, help="multi-page TIFF / OME-TIFF stack (frames, rows, columns)")
    p.add_argument("--out", required=True, type=Path, help="output float32 TIFF (one page per window)")
    p.add_argument("--wavelength-nm", type=float, default=510.0, help="emission wavelength, nm (default 510)")
    p.add_argument("--na", type=float, default=1.49, help="numerical aperture (default 1.49)")
    p.add_argument("--pixel-size-nm", type=float, default=65.0, help="sample-plane pixel size, nm (default 65)")
    p.add_argument("--subpixels", type=int, default=20, help="sub-pixels per pixel along each axis (default 20)")
    p.add_argument("--threshold", type=_threshold, default=-1.0,
                   help="log10 singular-value threshold, or 'auto' (shoulder of the first window's spectrum); default -1")
    p.add_argument("--alpha", type=float, default=4.0, help="indicator exponent (default 4)")
    p.add_argument("--window-frames", type=int, default=None, help="frames per window (default: all frames, one image)")
    p.add_argument("--slide-frames", type=int, default=None, help="frames between window starts (default: --window-frames)")
    p.add_argument("--backend", choices=("numpy", "torch"), default="numpy", help="kernel backend (default numpy)")
    p.add_argument("--device", default="cpu", help="torch device for --backend torch (default cpu)")
    p.add_argument("--edge", choices=("full_windows", "partial_windows"), default="full_windows",
                   help="border rule: windows wholly inside the image (MusiJ; default), or also those cut "
                        "at the edge (the MATLAB-derived ports; no crop)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run the ``musical`` command; returns the exit status. Bad input raises InputError."""
    import numpy as np
    import tifffile

    from scopestream.plugins.musical import musical_windows

    path: Path = args.input
    check_arguments(args)
    if not path.is_file():
        raise InputError(f"no such file: {str(path)!r}")
    try:
        stack = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        raise InputError(f"{str(path)!r} is not a readable TIFF: {exc}") from None
    stack = np.asarray(stack)
    if stack.ndim > 3:
        squeezed = np.squeeze(stack)
        if squeezed.ndim != 3:
            raise InputError(f"{str(path)!r}: expected a stack of 2-D grey frames, got shape {stack.shape}")
        stack = squeezed
    if stack.ndim == 3:
        check_output_size(stack.shape, args)
    try:
        results = musical_windows(
            stack,
            window_frames=args.window_frames,
            slide_frames=args.slide_frames,
            wavelength_nm=args.wavelength_nm,
            na=args.na,
            pixel_size_nm=args.pixel_size_nm,
            subpixels=args.subpixels,
            threshold=args.threshold,
            alpha=args.alpha,
            backend=args.backend,
            device=args.device,
            edge=args.edge,
        )
    except ValueError as exc:
        raise InputError(f"{str(path)!r}: {exc}") from None
    if not results:
        raise InputError(f"{str(path)!r}: no complete window")
    images = np.stack([r.image.astype(np.float32) for r in results])
    first = results[0]
    description = {
        "software": "scopestream musical",
        "wavelength_nm": args.wavelength_nm,
        "na": args.na,
        "pixel_size_nm": args.pixel_size_nm,
        "subpixels": first.subpixels,
        "image_pixel_nm": args.pixel_size_nm / first.subpixels,
        "window_px": first.window_px,
        "threshold_log10": first.threshold_log10,
        "alpha": args.alpha,
        "edge": args.edge,
        "scale": first.scale,
        "frame_ranges": [[r.frame_start, r.frame_end] for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(args.out, images if len(results) > 1 else images[0],
                     description=json.dumps(description), metadata=None, photometric="minisblack")
    print(f"wrote {len(results)} MUSICAL image(s) of {images.shape[1]}×{images.shape[2]} px to {args.out}")
    return 0


# Bounds of the arguments (the stage's settings use the same ones).
_BOUNDS: dict[str, tuple[float, float, str]] = {
    "wavelength_nm": (100.0, 20_000.0, "--wavelength-nm"),
    "na": (0.0, 1.7, "--na"),
    "pixel_size_nm": (0.0, 100_000.0, "--pixel-size-nm"),
    "alpha": (0.0, 16.0, "--alpha"),
}


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before the stack is read; raises InputError naming the option."""
    for name, (low, high, option) in _BOUNDS.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and low < value <= high):
            raise InputError(f"{option} must be a finite number in ({low:g}, {high:g}], got {value}")
    if not 1 <= args.subpixels <= 64:
        raise InputError(f"--subpixels must be between 1 and 64, got {args.subpixels}")
    if isinstance(args.threshold, float) and not math.isfinite(args.threshold):
        raise InputError(f"--threshold must be a finite number (log10) or 'auto', got {args.threshold}")
    for option, value in (("--window-frames", args.window_frames), ("--slide-frames", args.slide_frames)):
        if value is not None and not 1 <= value <= 1_000_000:
            raise InputError(f"{option} must be between 1 and 1000000, got {value}")
    if args.backend != "torch":
        if args.device != "cpu":
            raise InputError(f"--device {args.device!r} applies to --backend torch only (the numpy backend runs on the CPU)")
        return
    try:
        import torch
    except ImportError:
        raise InputError("--backend torch needs PyTorch: `pip install torch` (a CPU build is enough)") from None
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--device {args.device!r} is not a usable torch device: {first_line}") from None


def _available_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_output_size(shape: tuple[int, ...], args: argparse.Namespace) -> None:
    """Refuse a run whose images would not fit in memory (each window's image is
    ``subpixels`` times the stack's size along each axis, in float64 while it is computed)."""
    n_frames, height, width = shape
    window = args.window_frames or n_frames
    slide = args.slide_frames or window
    n_windows = max(1, (n_frames - window) // slide + 1) if n_frames >= window else 1
    image_bytes = height * width * args.subpixels**2 * (8 + 4)  # float64 canvas + float32 output
    needed = n_windows * image_bytes
    available = _available_memory_bytes()
    if available is not None and needed > available:
        raise InputError(
            f"{n_windows} MUSICAL image(s) of {height * args.subpixels}×{width * args.subpixels} px "
            f"(--subpixels {args.subpixels}) need about {needed / 2**30:.1f} GiB of memory, "
            f"{available / 2**30:.1f} GiB is available; use fewer --subpixels or a longer --slide-frames"
        )
