"""Training and test stacks for the diffusion network, rendered by the widefield simulator.

One simulator renders a mosaic: ``grid × grid`` point emitters (single fluorophores, always on),
one per ``cell_px`` cell, each placed at its cell's centre with its own D drawn log-uniformly in
``D_px2_per_frame`` (three decades by default) and its own photon count (log-uniform). Each group
of ``frames`` frames gives one sample per particle: the ``region_px`` square centred (rounded, as
the live cutter does) on the mean of its true positions over the window. After a group the
emitters are put back at their cell centres with fresh D and photons. A sample whose particle came
so far that its window (or its path) reaches a neighbour's cell or was replaced
by the scene (left the field) is dropped.

Blur: ``blur = 1/6`` is continuous exposure (exposure = frame interval, 16 positions sampled in
each exposure: R = (1 - 1/16²)/6, which we call 1/6); ``blur = 0`` is stroboscopic (one instant per
exposure). Both use the default optics (100 nm pixels, Gaussian PSF σ = 0.21 λ/NA), the default
sCMOS camera and a background drawn per mosaic.

Determinism: a set is a pure function of ``(seed, n_mosaics)``: mosaic ``i`` uses
``SeedSequence(seed, spawn_key=(i,))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scopestream.daemon._config import build_config
from scopestream.models.diffusion._inputs import StackSpec

__all__ = ["BLURS", "DataSettings", "StackSet", "render_mosaic", "generate"]

BLURS: tuple[float, ...] = (1.0 / 6.0, 0.0)
"""Blur coefficients of the training data: continuous exposure and stroboscopic."""


@dataclass(frozen=True)
class DataSettings:
    """What the generator draws (module docstring)."""

    D_px2_per_frame: tuple[float, float] = (1e-3, 1.0)
    photons_per_frame: tuple[float, float] = (300.0, 3000.0)
    background_photons_per_px: tuple[float, float] = (2.0, 20.0)
    grid: int = 8
    cell_px: int = 32
    groups_per_mosaic: int = 4

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StackSet:
    """Samples: ``pixels (n, T, S, S)`` ADU float32, ``blur (n,)``, ``log_D (n,)`` (px²/frame),
    ``photons (n,)``, true positions ``xy (n, T, 2)`` in window coordinates (px)."""

    pixels: np.ndarray
    blur: np.ndarray
    log_D: np.ndarray
    photons: np.ndarray
    xy: np.ndarray

    def __len__(self) -> int:
        return int(self.log_D.size)

    @staticmethod
    def concatenate(parts: list[StackSet]) -> StackSet:
        return StackSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pixels", "blur", "log_D", "photons", "xy")))


def _config(spec: StackSpec, data: DataSettings, blur: float, background: float) -> Any:
    side = data.grid * data.cell_px
    exposure = spec.frame_interval_ms if blur > 0 else 0.1
    return build_config({
        "acquisition": {"exposure_ms": exposure, "frame_interval_ms": spec.frame_interval_ms},
        "optics": {"pixel_size_nm": spec.pixel_size_nm},
        "simulation": {
            "frame_height_px": side, "frame_width_px": side, "n_particles": data.grid**2, "margin_nm": 0.0,
            "particle_kind": "point", "states": ["RanW"], "D_um2_per_s": 0.1,
            "background_photons_per_px": float(background), "blink_off_mean_ms": 0.0,
            "substeps_per_exposure": 16 if blur > 0 else 1,
            "psf_sigma_nm": spec.psf_sigma_px * spec.pixel_size_nm,
        },
    })


def _log_range(bounds: tuple[float, float]) -> tuple[float, float]:
    lo, hi = np.log(np.asarray(bounds, dtype=np.float64))
    return float(lo), float(hi)


def render_mosaic(seed: int, index: int, blur: float, spec: StackSpec, data: DataSettings) -> StackSet:
    """The samples of one mosaic (module docstring); also the frames' true positions."""
    from scopestream.sim_camera import make_simulator

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    background = float(np.exp(rng.uniform(*np.log(data.background_photons_per_px))))
    config = _config(spec, data, blur, background)
    sim = make_simulator(config, "widefield", seed=int(rng.integers(0, 2**63 - 1)))
    scene = sim.scene
    g, c, t, s = data.grid, data.cell_px, spec.frames, spec.region_px
    a = spec.pixel_size_nm
    centres_px = (np.stack(np.meshgrid(np.arange(g), np.arange(g)), -1).reshape(-1, 2) + 0.5) * c - 0.5
    n = g * g
    frame = np.empty(sim.shape, dtype=np.uint16)
    um2_per_s = a**2 / 1e6 / (spec.frame_interval_ms / 1e3)  # 1 px²/frame in µm²/s
    parts = []
    for _ in range(data.groups_per_mosaic):
        log_d = rng.uniform(*_log_range(data.D_px2_per_frame), n)
        photons = np.exp(rng.uniform(*_log_range(data.photons_per_frame), n))
        origin = scene.origin_nm
        scene.pos_nm[:n, 0] = (centres_px[:, 0] + 0.5) * a + origin[0]  # inverse of scene.to_px
        scene.pos_nm[:n, 1] = (centres_px[:, 1] + 0.5) * a + origin[1]
        scene.pos_nm[:n, 2] = 0.0
        scene.D_nm2_per_ms[:n] = np.exp(log_d) * um2_per_s * 1e3  # 1 µm²/s = 1e3 nm²/ms
        scene.photons_per_frame[:n] = photons
        ids = scene.particle_id[:n].copy()
        movie = np.empty((t, *sim.shape), dtype=np.float32)
        truth = np.full((t, n, 2), np.nan)
        replaced = np.zeros(n, dtype=bool)
        for k in range(t):
            img, rows = sim.next_frame(frame)
            movie[k] = img
            pid = rows["particle"]
            where = {int(p): i for i, p in enumerate(pid)}
            for j in range(n):
                i = where.get(int(ids[j]))
                if i is None:
                    replaced[j] = True
                else:
                    truth[k, j] = (rows["x"][i], rows["y"][i])
            replaced |= scene.particle_id[:n] != ids
        mean = np.nanmean(truth, axis=0)  # (n, 2)
        ok = ~replaced & np.isfinite(mean).all(axis=1)
        cell_lo = centres_px - (c - 1) / 2
        lo = np.nanmin(truth, axis=0)
        hi = np.nanmax(truth, axis=0)
        ok &= (lo >= cell_lo + 2).all(axis=1) & (hi <= cell_lo + c - 3).all(axis=1)
        pix, xy, keep = [], [], []
        for j in np.flatnonzero(ok).tolist():
            x0r = int(round(mean[j, 0])) - s // 2
            y0r = int(round(mean[j, 1])) - s // 2
            cx0, cy0 = int(round(cell_lo[j, 0])), int(round(cell_lo[j, 1]))
            if not (cx0 <= x0r <= cx0 + c - s and cy0 <= y0r <= cy0 + c - s):
                continue  # the window would reach into a neighbour's cell or past the frame
            pix.append(movie[:, y0r : y0r + s, x0r : x0r + s])
            xy.append(truth[:, j] - np.array([x0r, y0r]))
            keep.append(j)
        keep_a = np.asarray(keep, dtype=np.int64)
        parts.append(StackSet(
            pixels=np.stack(pix) if pix else np.empty((0, t, s, s), np.float32),
            blur=np.full(keep_a.size, blur), log_D=log_d[keep_a], photons=photons[keep_a],
            xy=np.stack(xy) if xy else np.empty((0, t, 2)),
        ))
    return StackSet.concatenate(parts)


def generate(seed: int, n_mosaics: int, spec: StackSpec, data: DataSettings,
             progress: Callable[[int], None] | None = None) -> StackSet:
    """``n_mosaics`` mosaics (alternating R = 1/6 and R = 0) from ``seed``."""
    parts = []
    for i in range(n_mosaics):
        parts.append(render_mosaic(seed, i, BLURS[i % len(BLURS)], spec, data))
        if progress is not None:
            progress(1)
    return StackSet.concatenate(parts)


def blur_coefficient_of(blur: float) -> float:
    """The exact R of the rendered data (16 sampled instants: R = (1 - 1/16²)/6)."""
    return 0.0 if blur == 0 else (1.0 - 1.0 / 256.0) / 6.0 if math.isclose(blur, 1 / 6) else blur
