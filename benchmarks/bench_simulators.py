"""Frame rate of the simulated cameras, and which step limits it.

Run:  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_simulators.py

Widefield: 512x512 px, 100 vesicles (10 fluorophores each) in view, default motion mix, 4 sub-steps
per exposure, sCMOS noise. Side by side with a plain-numpy reference renderer of the same scene
(full-frame ``rng.poisson`` + Gaussian read noise, PSF patches from ``scipy.special.ndtr`` added
per emitter with ``np.add.at``), and with the 500 frames/s target and the real-time rate of the
acquisition settings. Scanning: the default 512x512 scan (2 us dwell, 1.1 ms retrace) and a
64x64 scan, against their real-time rates. One process, one core; widefield rates are the best of
three runs.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import ndtr

from scopestream.daemon._config import build_config
from scopestream.sim_camera import make_simulator
from scopestream.sim_camera._widefield import WidefieldSimulator

TARGET_FPS = 500.0


def _instrument(obj: Any, name: str, totals: dict[str, float], label: str) -> None:
    inner: Callable[..., Any] = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t0

    setattr(obj, name, timed)


def _rate(step: Callable[[], object], frames: int, repeats: int = 3) -> float:
    """Frames per second: the best of ``repeats`` runs of ``frames`` frames (this machine is shared)."""
    step()  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(frames):
            step()
        best = max(best, frames / (time.perf_counter() - t0))
    return best


def _reference_frame(sim: WidefieldSimulator, rng: np.random.Generator) -> np.ndarray:
    """The same scene rendered the plain way: per-emitter patches, np.add.at, full-frame noise."""
    scene, phys = sim.scene, sim.physics
    n_sub = phys.sim.substeps_per_exposure
    dts = np.full(n_sub, phys.exposure_ms / n_sub)
    path = scene.advance(dts)
    on = scene.photophysics(dts)
    a = phys.pixel_size_nm
    sigma = phys.psf_sigma_nm / a
    f = scene.n_fluorophores
    ex = ((path[:, None, :, 0] + scene.fluor_offset_nm[:, :, None, 0]) / a - 0.5).ravel()
    ey = ((path[:, None, :, 1] + scene.fluor_offset_nm[:, :, None, 1]) / a - 0.5).ravel()
    w = (on * (scene.photons_per_frame / (f * n_sub))[:, None, None]).ravel()
    h_img, w_img = sim.shape
    half = 4
    q = np.arange(-half, half + 1)
    cx = np.rint(ex).astype(int)[:, None] + q
    cy = np.rint(ey).astype(int)[:, None] + q
    px = ndtr((cx + 0.5 - ex[:, None]) / sigma) - ndtr((cx - 0.5 - ex[:, None]) / sigma)
    py = ndtr((cy + 0.5 - ey[:, None]) / sigma) - ndtr((cy - 0.5 - ey[:, None]) / sigma)
    patch = w[:, None, None] * py[:, :, None] * px[:, None, :]
    rows = np.broadcast_to(cy[:, :, None], patch.shape)
    cols = np.broadcast_to(cx[:, None, :], patch.shape)
    ok = (rows >= 0) & (rows < h_img) & (cols >= 0) & (cols < w_img)
    lam = np.full((h_img, w_img), phys.sim.background_photons_per_px)
    np.add.at(lam, (rows[ok], cols[ok]), patch[ok])
    e = rng.poisson(lam) + rng.standard_normal(lam.shape) * phys.read_noise_e
    adu = np.clip(np.floor(e / phys.gain_e_per_adu + phys.offset_adu + 0.5), 0, phys.saturation_adu)
    return adu.astype(np.uint16)


def bench_widefield(frames: int) -> None:
    config = build_config({})  # defaults: 512x512, 100 vesicles x 10 fluorophores, 100 nm px
    sim = make_simulator(config, "widefield", seed=0)
    assert isinstance(sim, WidefieldSimulator)
    out = np.empty(sim.shape, np.uint16)
    totals: dict[str, float] = defaultdict(float)
    _instrument(sim.scene, "advance", totals, "motion")
    _instrument(sim.scene, "photophysics", totals, "photophysics")
    _instrument(sim, "_render", totals, "PSF rendering")
    _instrument(sim.noise, "render", totals, "camera noise")
    t0 = time.perf_counter()
    fps = _rate(lambda: sim.next_frame(out), frames)
    total = time.perf_counter() - t0
    totals["truth + bookkeeping"] = total - sum(totals.values())
    n_timed = 3 * frames + 1

    ref_sim = make_simulator(config, "widefield", seed=0)
    assert isinstance(ref_sim, WidefieldSimulator)
    rng = np.random.default_rng(1)
    ref_fps = _rate(lambda: _reference_frame(ref_sim, rng), max(frames // 10, 20))

    real_time = 1000.0 / sim.frame_period_ms
    n_particles = len(sim.scene.state)
    print(f"widefield {sim.shape[0]}x{sim.shape[1]} px, {config.simulation or 'default'} scene: "
          f"{n_particles} particles (100 in view) x {sim.scene.n_fluorophores} fluorophores, "
          f"{sim.physics.sim.substeps_per_exposure} sub-steps")
    print(f"  scopestream        {fps:8.1f} frames/s  ({1000 / fps:.2f} ms/frame)")
    print(f"  plain-numpy ref    {ref_fps:8.1f} frames/s  -> speed-up x{fps / ref_fps:.1f}")
    print(f"  target {TARGET_FPS:.0f} frames/s -> ratio {fps / TARGET_FPS:.2f};  real time ({real_time:.0f} "
          f"frames/s at {sim.frame_period_ms:g} ms) -> x{fps / real_time:.1f}")
    print("  time per frame by step (mean over all runs):")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {label:22s} {1000 * seconds / n_timed:6.2f} ms  ({100 * seconds / total:4.1f} %)")


def bench_scanning(size: int, frames: int) -> None:
    config = build_config({"simulation": {"frame_height_px": size, "frame_width_px": size}})
    sim = make_simulator(config, "scanning", seed=0)
    out = np.empty(sim.shape, np.uint16)
    totals: dict[str, float] = defaultdict(float)
    _instrument(sim.scene, "advance", totals, "motion (per line + dwell windows)")
    _instrument(sim.scene, "photophysics", totals, "photophysics (per line)")
    _instrument(sim.noise, "render", totals, "camera noise")
    t0 = time.perf_counter()
    fps = _rate(lambda: sim.next_frame(out), frames, repeats=1)
    total = time.perf_counter() - t0
    totals["excitation + truth (per line)"] = total - sum(totals.values())
    real_time = 1000.0 / sim.frame_period_ms
    print(f"scanning {size}x{size} px, {len(sim.scene.state)} particles: scan {sim.exposure_ms:.1f} ms/frame")
    print(f"  scopestream        {fps:8.2f} frames/s  ({1000 / fps:.1f} ms/frame); "
          f"real time {real_time:.2f} frames/s -> x{fps / real_time:.1f}")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {label:34s} {1000 * seconds / (frames + 1):7.2f} ms  ({100 * seconds / total:4.1f} %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="widefield frames per timed run, best of 3 (default 300)")
    args = parser.parse_args()
    bench_widefield(args.frames)
    bench_scanning(512, 5)
    bench_scanning(64, 40)


if __name__ == "__main__":
    main()
