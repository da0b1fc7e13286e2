"""Training and test frames for the localization network, simulated with exact truth.

Each *scene* is one simulator (:class:`~scopestream.sim_camera.ScanningSimulator` or
:class:`~scopestream.sim_camera.WidefieldSimulator`) with its own randomly drawn settings
(background, photon range, PSF width, diffusion range, scan timing, particle kind), run for a few
frames of ``size_px`` x ``size_px``; the scene's seed is ``seed * 1_000_003 + index``, so the training
set (``seed``) and the test set (``10**9 + seed``) never share a scene.

Truth: the simulator's own truth rows (:data:`~scopestream.sim_camera.TRUTH_DTYPE`). For the
scanning camera ``x, y`` is the centroid of the particle's trajectory over the dwell times the beam
spent near it, weighted by the photons it sent: exactly what a localizer should report for a
scan-blurred spot; for the widefield camera the photon-weighted centroid over the exposure.

Which particles the network must find: those whose centroid is in the frame and whose signal is
clearly above the noise, ``snr = N / sqrt(N + 4 pi sigma^2 (b + read variance)) >= 3`` with N the
particle's expected photons in the frame (truth ``photons``), sigma the PSF width (px) and b the
background (photons/px) -- the SNR of an aperture sum over the spot. Particles with
``1.5 <= snr < 3`` are ambiguous: the heat-map loss ignores the cells around them. Fainter ones are
background.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from scopestream.daemon._config import ScopestreamConfig
from scopestream.models.localize._inputs import heat_targets, normalize_photons
from scopestream.models.localize.locnet import STRIDE_PX

__all__ = ["CAMERAS", "FrameSet", "scene_settings", "simulate_set", "snr_of"]

Camera = Literal["scanning", "widefield"]
CAMERAS: tuple[str, ...] = ("scanning", "widefield")
SNR_TARGET = 3.0
SNR_IGNORE = 1.5

# What the scenes are drawn from, per camera (recorded in the model card).
SCENE_RANGES: dict[str, dict[str, Any]] = {
    "scanning": {
        "background_photons_per_px": "log-uniform [1, 30]",
        "photons_per_frame": "per scene low log-uniform [150, 3000], high = 2 low; per particle uniform in [low, high]",
        "D_um2_per_s": "per scene [0.7 Dc, 1.3 Dc], Dc log-uniform [0.05, 10]; per particle uniform",
        "states": "RanW (70 % of scenes) or all five states (30 %)",
        "particle_kind": "point (70 %) or vesicle 100-300 nm with 10 fluorophores (30 %)",
        "scan_dwell_us": "uniform [1, 4]",
        "scan_retrace_ms": "uniform [0.5, 2]",
        "scan_sigma_xy_nm": "uniform [180, 220] (pixel 100 nm)",
        "particles": "0-6 in a 32 x 32 px frame",
    },
    "widefield": {
        "background_photons_per_px": "log-uniform [2, 300]",
        "photons_per_frame": "per scene low log-uniform [80, 3000], high = 3 low; per particle uniform in [low, high]",
        "psf_sigma_nm": "uniform [70, 160] (0.7-1.6 px at 100 nm pixels)",
        "states": "Stat (80 %) or RanW with D in [0, 0.5] um^2/s (20 %)",
        "particle_kind": "point",
        "particles": "0-16 in a 32 x 32 px frame (spots overlap at the high end)",
    },
}


HEAVY_BLUR_D_UM2_PER_S = (1.5, 10.0)


def scene_settings(camera: str, rng: np.random.Generator, size_px: int,
                   heavy_blur_fraction: float = 0.0) -> tuple[dict[str, Any], int]:
    """Random ``simulation`` settings of one scene, and its particle count.

    ``heavy_blur_fraction`` (scanning only): the fraction of scenes whose central D is drawn
    log-uniform from :data:`HEAVY_BLUR_D_UM2_PER_S` (heavy scan blur) instead of [0.05, 10] um^2/s;
    0 (the validation and test sets) keeps the recorded scene ranges and draws exactly (no extra draw).
    """
    s: dict[str, Any] = {"frame_height_px": size_px, "frame_width_px": size_px, "margin_nm": 400.0,
                         "dwell_ms": 1e9, "z_start_nm": 0.0}
    if camera == "scanning":
        low = float(math.exp(rng.uniform(math.log(150), math.log(3000))))
        d_low, d_high = HEAVY_BLUR_D_UM2_PER_S if heavy_blur_fraction > 0 and rng.random() < heavy_blur_fraction else (0.05, 10.0)
        d_centre = float(math.exp(rng.uniform(math.log(d_low), math.log(d_high))))
        s.update(
            background_photons_per_px=float(math.exp(rng.uniform(0.0, math.log(30.0)))),
            photons_per_frame=(low, 2 * low),
            D_um2_per_s=(0.7 * d_centre, 1.3 * d_centre),
            states=["RanW"] if rng.random() < 0.7 else ["Stat", "RanW", "RCir", "Circ", "Flow"],
            scan_dwell_us=float(rng.uniform(1.0, 4.0)),
            scan_retrace_ms=float(rng.uniform(0.5, 2.0)),
            scan_sigma_xy_nm=float(rng.uniform(180.0, 220.0)),
        )
        if rng.random() < 0.7:
            s["particle_kind"] = "point"
        else:
            s.update(particle_kind="vesicle", vesicle_diameter_nm=(100.0, 300.0))
        n = int(rng.integers(0, 7))
    elif camera == "widefield":
        low = float(math.exp(rng.uniform(math.log(80), math.log(3000))))
        s.update(
            background_photons_per_px=float(math.exp(rng.uniform(math.log(2.0), math.log(300.0)))),
            photons_per_frame=(low, 3 * low),
            psf_sigma_nm=float(rng.uniform(70.0, 160.0)),
            particle_kind="point",
        )
        if rng.random() < 0.8:
            s["states"] = ["Stat"]
        else:
            s.update(states=["RanW"], D_um2_per_s=(0.0, 0.5))
        n = int(rng.integers(0, 17))
    else:
        raise ValueError(f"unknown camera {camera!r}; choose one of {CAMERAS}")
    return s, n


def snr_of(photons: np.ndarray, sigma_px: float, background: float, read_variance: float) -> np.ndarray:
    """Aperture SNR of spots with ``photons`` (see the module docstring)."""
    n = np.maximum(np.asarray(photons, float), 0.0)
    return n / np.sqrt(n + 4.0 * math.pi * sigma_px**2 * (background + read_variance) + 1e-12)


@dataclass
class FrameSet:
    """Normalized frames, their targets and their truth (one list entry per frame)."""

    images: np.ndarray  # (n, H, W) float32, normalized
    heat: np.ndarray  # (n, H/2, W/2)
    offset: np.ndarray  # (n, 2, H/2, W/2)
    mask: np.ndarray  # (n, H/2, W/2)
    weight: np.ndarray  # (n, H/2, W/2): 0 around ambiguous particles
    truth: list[np.ndarray] = field(default_factory=list)  # per frame: (k, 5) x, y, photons, D, snr of targets
    scene: list[dict[str, float]] = field(default_factory=list)  # per frame: background, sigma_px, ...


def _simulator(camera: str, config: ScopestreamConfig, sim: dict[str, Any], n: int, seed: int) -> Any:
    from scopestream.sim_camera._scanning import ScanningSimulator
    from scopestream.sim_camera._settings import physics_from_config
    from scopestream.sim_camera._widefield import WidefieldSimulator

    physics = physics_from_config(config, **sim, n_particles=n)
    return ScanningSimulator(physics, seed) if camera == "scanning" else WidefieldSimulator(physics, seed)


def simulate_set(
    camera: str, n_frames: int, seed: int, *, size_px: int = 32, frames_per_scene: int = 8,
    config: ScopestreamConfig | None = None, progress: Callable[[int], None] | None = None,
    heavy_blur_fraction: float = 0.0, dense_offsets: bool = False,
) -> FrameSet:
    """``n_frames`` simulated frames of ``camera`` with targets (see the module docstring).

    ``heavy_blur_fraction``: see :func:`scene_settings`; ``dense_offsets``: see
    :func:`~scopestream.models.localize._inputs.heat_targets`.
    """
    config = config if config is not None else ScopestreamConfig()
    cam = config.camera
    photons_per_adu = cam.gain_e_per_adu / cam.em_gain
    read_var = (cam.read_noise_e / cam.em_gain) ** 2
    hc = size_px // STRIDE_PX
    images = np.empty((n_frames, size_px, size_px), np.float32)
    heat = np.empty((n_frames, hc, hc), np.float32)
    offset = np.empty((n_frames, 2, hc, hc), np.float32)
    mask = np.empty((n_frames, hc, hc), np.float32)
    weight = np.ones((n_frames, hc, hc), np.float32)
    out = FrameSet(images, heat, offset, mask, weight)
    k = 0
    scene_index = 0
    while k < n_frames:
        scene_seed = seed * 1_000_003 + scene_index
        rng = np.random.default_rng(scene_seed)
        sim_settings, n = scene_settings(camera, rng, size_px, heavy_blur_fraction)
        simulator = _simulator(camera, config, sim_settings, n, scene_seed)
        sigma_px = (
            sim_settings["scan_sigma_xy_nm"] if camera == "scanning" else sim_settings["psf_sigma_nm"]
        ) / config.optics.pixel_size_nm
        bg = sim_settings["background_photons_per_px"]
        for _ in range(min(frames_per_scene, n_frames - k)):
            adu, truth = simulator.next_frame()
            photons = (adu.astype(np.float32) - np.float32(cam.offset_adu)) * np.float32(photons_per_adu)
            images[k] = normalize_photons(photons, read_var)
            vis = truth[truth["visible"]]
            snr = snr_of(vis["photons"], sigma_px, bg, read_var)
            target = snr >= SNR_TARGET
            heat[k], offset[k], mask[k] = heat_targets(vis["x"][target], vis["y"][target], (size_px, size_px), STRIDE_PX,
                                                       dense_offsets=dense_offsets)
            amb = (snr >= SNR_IGNORE) & ~target
            for x, y in zip(vis["x"][amb], vis["y"][amb], strict=True):
                i, j = int((y + 0.5) // STRIDE_PX), int((x + 0.5) // STRIDE_PX)
                weight[k, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2] = 0.0
            out.truth.append(np.column_stack([vis["x"][target], vis["y"][target], vis["photons"][target],
                                              vis["D_um2_per_s"][target], snr[target]]))
            out.scene.append({"background": bg, "sigma_px": sigma_px})
            k += 1
            if progress is not None:
                progress(1)
        scene_index += 1
    return out
