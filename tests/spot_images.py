"""Ground-truth spot images for localization tests and benchmarks (not part of the package).

A spot is an exact pixel-integrated Gaussian (erf differences) on a flat or given background;
counts are Poisson. That *is* the model the localizer assumes, so the Cramér-Rao bound applies.
Pixel convention: the centre of pixel (row 0, col 0) is (0.0, 0.0); x = column, y = row.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf


def pixel_fractions(centre: np.ndarray, sigma_px: float, n_px: int) -> np.ndarray:
    """Fraction of a 1-D Gaussian in each of ``n_px`` pixels, shape (len(centre), n_px)."""
    edges = np.arange(n_px + 1, dtype=np.float64) - 0.5
    e = erf((edges[None, :] - np.asarray(centre, float)[:, None]) / (np.sqrt(2.0) * sigma_px))
    return 0.5 * (e[:, 1:] - e[:, :-1])


def render_spots(
    shape: tuple[int, int], x_px: np.ndarray, y_px: np.ndarray, photons: np.ndarray | float,
    sigma_px: float, background: np.ndarray | float,
) -> np.ndarray:
    """Expected photons per pixel for spots at (x, y) on a background (scalar or image)."""
    h, w = shape
    x_px = np.asarray(x_px, float)
    y_px = np.asarray(y_px, float)
    photons = np.broadcast_to(np.asarray(photons, float), x_px.shape)
    img = np.zeros(shape) + background
    if x_px.size:
        ex = pixel_fractions(x_px, sigma_px, w) * photons[:, None]
        ey = pixel_fractions(y_px, sigma_px, h)
        img += ey.T @ ex
    return img


def random_positions(
    rng: np.random.Generator, n: int, shape: tuple[int, int], margin_px: float, min_dist_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """n positions inside the margin, at least ``min_dist_px`` apart (rejection sampling)."""
    xs: list[float] = []
    ys: list[float] = []
    h, w = shape
    while len(xs) < n:
        cand = rng.uniform([margin_px, margin_px], [w - 1 - margin_px, h - 1 - margin_px], size=(4 * n, 2))
        for cx, cy in cand:
            if len(xs) == n:
                break
            if not xs or np.min(np.hypot(np.array(xs) - cx, np.array(ys) - cy)) >= min_dist_px:
                xs.append(cx)
                ys.append(cy)
    return np.array(xs), np.array(ys)


def to_adu(
    rng: np.random.Generator, expected_photons: np.ndarray, *, offset_adu: float = 100.0,
    gain_e_per_adu: float = 0.5, read_noise_e: float = 0.0, saturation_adu: int = 65535,
) -> np.ndarray:
    """Poisson photon counts (+ Gaussian read noise) converted to uint16 ADU."""
    electrons = rng.poisson(expected_photons).astype(np.float64)
    if read_noise_e > 0:
        electrons += rng.normal(0.0, read_noise_e, electrons.shape)
    adu = np.round(electrons / gain_e_per_adu + offset_adu)
    return np.clip(adu, 0, saturation_adu).astype(np.uint16)
