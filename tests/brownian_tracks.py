"""Blurred Brownian tracks with localization noise (exact truth for diffusion tests; not part
of the package).

Each frame interval is divided into ``substeps`` Gaussian steps; the camera reports the mean
position over the exposure (the first ``exposure_fraction`` of the interval, uniform
illumination), plus Gaussian localization noise of SD ``sigma_loc_px`` per axis.
"""

from __future__ import annotations

import numpy as np


def blurred_brownian(
    rng: np.random.Generator, *, n_tracks: int, n_frames: int, d_px2_per_frame: float,
    exposure_fraction: float, sigma_loc_px: float, substeps: int = 40,
) -> np.ndarray:
    """Measured positions, shape (n_tracks, n_frames, 2), px."""
    sub_sd = np.sqrt(2.0 * d_px2_per_frame / substeps)
    steps = rng.normal(0.0, sub_sd, (n_tracks, n_frames * substeps, 2))
    path = np.cumsum(steps, axis=1).reshape(n_tracks, n_frames, substeps, 2)
    n_exp = max(1, int(round(exposure_fraction * substeps)))
    # Mean over the sub-step positions inside the exposure (midpoint rule).
    measured = path[:, :, :n_exp, :].mean(axis=2)
    return measured + rng.normal(0.0, sigma_loc_px, measured.shape)


def as_table(positions: np.ndarray, first_particle: int = 0) -> dict[str, np.ndarray]:
    """Tracks as a table: frame, particle, x, y."""
    n_tracks, n_frames, _ = positions.shape
    return {
        "frame": np.tile(np.arange(n_frames), n_tracks),
        "particle": np.repeat(np.arange(n_tracks) + first_particle, n_frames),
        "x": positions[:, :, 0].ravel(),
        "y": positions[:, :, 1].ravel(),
    }
