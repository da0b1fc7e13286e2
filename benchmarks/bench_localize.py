"""Localization precision (vs the Cramér-Rao bound) and speed, side by side with trackpy.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_localize.py
Ground truth: exact pixel-integrated Gaussian spots with Poisson noise (tests/spot_images.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spot_images import random_positions, render_spots, to_adu  # noqa: E402

from scopestream.plugins._gaussian_mle import (  # noqa: E402
    fisher_crlb_px,
    fit_mle,
    mortensen_mle_variance_px2,
    radial_symmetry_centres,
)
from scopestream.plugins.localize import Localizer, LocalizeSettings  # noqa: E402

SIGMA, BG = 1.3, 100.0


def precision_on_rois(rng: np.random.Generator, photons: float, n: int = 4000, roi: int = 7) -> None:
    c = (roi - 1) / 2
    tx, ty = c + rng.uniform(-0.5, 0.5, n), c + rng.uniform(-0.5, 0.5, n)
    ex = np.stack([render_spots((roi, roi), [tx[i]], [ty[i]], photons, SIGMA, BG) for i in range(n)])
    rois = rng.poisson(ex).astype(float)
    crlb = fisher_crlb_px(photons, BG, SIGMA)
    crlb_roi = fisher_crlb_px(photons, BG, SIGMA, roi_px=roi)
    mort = float(np.sqrt(mortensen_mle_variance_px2(photons, BG, SIGMA)))
    print(f"\n-- precision, N = {photons:.0f} photons, b = {BG:.0f} photons/px, sigma = {SIGMA} px, {n} spots")
    print(f"   CRLB numeric (Fisher, 21 px region): {crlb:.4f} px   (on the {roi} px fit region: {crlb_roi:.4f} px)")
    print(f"   Mortensen MLE formula              : {mort:.4f} px")
    t = time.perf_counter()
    fit = fit_mle(rois, SIGMA)
    t_mle = time.perf_counter() - t
    t = time.perf_counter()
    xr, yr = radial_symmetry_centres(rois)
    t_rs = time.perf_counter() - t
    for name, x, y, dt in (("MLE (ours)", fit.x_px, fit.y_px, t_mle), ("radial symmetry (ours)", xr, yr, t_rs)):
        err = np.concatenate([x - tx, y - ty])
        rmse = float(np.sqrt(np.mean(err**2)))
        print(f"   {name:24s}: RMSE {rmse:.4f} px = {rmse / crlb:.3f} x CRLB   bias x {np.mean(x - tx):+.4f} y {np.mean(y - ty):+.4f} px   {n / dt:,.0f} fits/s")
    e = np.concatenate([fit.x_px - tx, fit.y_px - ty])
    print(f"   MLE error percentiles |e| 50/90/99 %: {np.percentile(np.abs(e), [50, 90, 99]).round(3).tolist()} px")


def frames_100_spots(rng: np.random.Generator, n_frames: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n_frames):
        x, y = random_positions(rng, 100, (512, 512), 4.0, 12.0)
        out.append((to_adu(rng, render_spots((512, 512), x, y, 1000.0, SIGMA, BG)), x, y))
    return out


def score(x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray) -> tuple[int, int, np.ndarray]:
    if x.size == 0:
        return 0, 0, np.empty(0)
    d, j = cKDTree(np.column_stack([x, y])).query(np.column_stack([tx, ty]))
    hit = d < 1.5
    err = np.concatenate([x[j[hit]] - tx[hit], y[j[hit]] - ty[hit]])
    return int(hit.sum()), int(x.size - hit.sum()), err


def speed(rng: np.random.Generator) -> None:
    import trackpy as tp

    tp.quiet()
    frames = frames_100_spots(rng, 20)
    crlb = fisher_crlb_px(1000.0, BG, SIGMA)
    print("\n-- detection + localization, 512x512 frames with 100 spots (N 1000, b 100, sigma 1.3 px), 20 frames")
    # trackpy: diameter 7 (>= 4 sigma + 1, odd), minmass tuned on the first frame for the best F1.
    best = (0.0, -1.0)
    for mm in (100, 200, 300, 400, 500, 600, 800, 1000, 1200):
        df = tp.locate(frames[0][0], 7, minmass=mm, engine="numba")
        hit, fp, _ = score(df.x.to_numpy(), df.y.to_numpy(), frames[0][1], frames[0][2])
        f1 = 2 * hit / (2 * hit + fp + (100 - hit))
        if f1 > best[1]:
            best = (mm, f1)
    minmass = best[0]
    results = {}
    runs = {
        "trackpy.locate (numba)": lambda img: tp.locate(img, 7, minmass=minmass, engine="numba"),
        "scopestream MLE": Localizer(LocalizeSettings(psf_sigma_px=SIGMA)).localize,
        "scopestream radial symmetry": Localizer(LocalizeSettings(psf_sigma_px=SIGMA, method="radial_symmetry")).localize,
    }
    for name, fn in runs.items():
        fn(frames[0][0])  # warm-up (numba compile)
        times, hits, fps, errs = [], 0, 0, []
        for img, tx, ty in frames:
            t = time.perf_counter()
            res = fn(img)
            times.append(time.perf_counter() - t)
            x = np.asarray(res.x, dtype=float)
            y = np.asarray(res.y, dtype=float)
            h, f, e = score(x, y, tx, ty)
            hits, fps, errs = hits + h, fps + f, errs + [e]
        err = np.concatenate(errs)
        rmse = float(np.sqrt(np.mean(err**2)))
        results[name] = float(np.median(times))
        print(f"   {name:28s}: {np.median(times) * 1e3:7.2f} ms/frame (median)  recall {hits / 2000:.3f}  false {fps}  RMSE {rmse:.4f} px = {rmse / crlb:.3f} x CRLB")
    ref = results["trackpy.locate (numba)"]
    print(f"   (trackpy minmass tuned to {minmass})")
    for name in ("scopestream MLE", "scopestream radial symmetry"):
        print(f"   speed-up vs trackpy, {name}: {ref / results[name]:.1f}x")


def main() -> None:
    rng = np.random.default_rng(2024)
    precision_on_rois(rng, 1000.0)
    precision_on_rois(rng, 200.0)
    speed(rng)


if __name__ == "__main__":
    main()
