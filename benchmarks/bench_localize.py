"""Localization precision (vs the Cramér-Rao bound) and speed, side by side with trackpy.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_localize.py
Ground truth: exact pixel-integrated Gaussian spots with Poisson noise (tests/spot_images.py).

The bound: the Cramér-Rao bound of x from the 4-parameter (x, y, N, b) Fisher information of the
pixelated Poisson model, on a 21 px region (``fisher_crlb_px``). For a spot at the region's
centre x is orthogonal to N and b, so the 3-parameter bound (b known) is the same number; both
are printed. Timings: trackpy and ours run interleaved, frame by frame, in one process, so load
from other processes hits both alike; the speed-up is the median of per-frame time ratios.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spot_images import pixel_fractions, random_positions, render_spots, to_adu  # noqa: E402

from scopestream.plugins._gaussian_mle import (  # noqa: E402
    _jacobian,
    fisher_crlb_px,
    fit_mle,
    mortensen_mle_variance_px2,
    radial_symmetry_centres,
)
from scopestream.plugins.localize import Localizer, LocalizeSettings  # noqa: E402

SIGMA, BG = 1.3, 100.0


def crlb_b_known_px(photons: float, roi: int = 21) -> float:
    """Cramér-Rao bound of x with the background known (3 parameters x, y, N), px."""
    c = (roi - 1) / 2
    model, jac = _jacobian(np.array([[c, c, photons, BG, SIGMA]]), roi, False)
    jac = jac[:, :3]
    fisher = (jac / model[:, None, :]) @ jac.transpose(0, 2, 1)
    return float(np.sqrt(np.linalg.inv(fisher)[0, 0, 0]))


def fit_b_known(rois: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Converged 3-parameter Poisson MLE (background fixed at its true value): (n, 2) x, y."""
    n, r, _ = rois.shape
    data = rois.reshape(n, -1)
    fit = fit_mle(rois, SIGMA)
    theta = np.column_stack([fit.x_px, fit.y_px, fit.photons, np.full(n, BG), np.full(n, SIGMA)])
    for _ in range(iterations):
        model, jac = _jacobian(theta, r, False)
        jac = jac[:, :3]
        w = jac / model[:, None, :]
        step = np.linalg.solve(w @ jac.transpose(0, 2, 1), w @ (data - model)[:, :, None])[:, :, 0]
        np.clip(step[:, :2], -1.0, 1.0, out=step[:, :2])
        theta[:, :3] += step
        theta[:, :2] = np.clip(theta[:, :2], -0.5, r - 0.5)
        theta[:, 2] = np.maximum(theta[:, 2], 1.0)
    return theta[:, :2]


def precision_on_rois(rng: np.random.Generator, photons: float, n: int = 4000, roi: int = 7) -> None:
    c = (roi - 1) / 2
    tx, ty = c + rng.uniform(-0.5, 0.5, n), c + rng.uniform(-0.5, 0.5, n)
    ex = BG + photons * pixel_fractions(ty, SIGMA, roi)[:, :, None] * pixel_fractions(tx, SIGMA, roi)[:, None, :]
    rois = rng.poisson(ex).astype(float)
    crlb = fisher_crlb_px(photons, BG, SIGMA)
    crlb_roi = fisher_crlb_px(photons, BG, SIGMA, roi_px=roi)
    mort = float(np.sqrt(mortensen_mle_variance_px2(photons, BG, SIGMA)))
    print(f"\n-- precision, N = {photons:.0f} photons, b = {BG:.0f} photons/px, sigma = {SIGMA} px, {n} spots, {roi} px regions")
    print(f"   CRLB, 4-parameter Fisher (x, y, N, b), 21 px region: {crlb:.4f} px   (on the {roi} px fit region: {crlb_roi:.4f} px)")
    print(f"   CRLB, 3-parameter Fisher (b known)                 : {crlb_b_known_px(photons):.4f} px")
    print(f"   Mortensen MLE formula                              : {mort:.4f} px")
    t = time.perf_counter()
    fit = fit_mle(rois, SIGMA)
    t_mle = time.perf_counter() - t
    t = time.perf_counter()
    xr, yr = radial_symmetry_centres(rois)
    t_rs = time.perf_counter() - t
    xb, yb = fit_b_known(rois).T
    rows = (
        ("MLE (ours)", fit.x_px, fit.y_px, f"{n / t_mle:9,.0f} fits/s"),
        ("radial symmetry (ours)", xr, yr, f"{n / t_rs:9,.0f} fits/s"),
        ("MLE, b known (oracle)", xb, yb, "  (converged, for reference)"),
    )
    truth = np.concatenate([tx, ty]) - c
    for name, x, y, speed_note in rows:
        err = np.concatenate([x - tx, y - ty])
        rmse = float(np.sqrt(np.mean(err**2)))
        # Slope of the estimate against the true offset from the region centre: 1 for an
        # unbiased estimator; < 1 means it is pulled toward the centre (which, here, is the
        # rounded true position - information a real detector does not have).
        slope = float(np.polyfit(truth, err + truth, 1)[0])
        print(
            f"   {name:24s}: RMSE {rmse:.4f} px = {rmse / crlb:.3f} x CRLB   bias x {np.mean(x - tx):+.4f} "
            f"y {np.mean(y - ty):+.4f} px   slope {slope:.3f}  {speed_note}"
        )
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


def speed(rng: np.random.Generator, n_frames: int = 20, rounds: int = 5) -> None:
    import warnings

    import trackpy as tp

    tp.quiet()
    frames = frames_100_spots(rng, n_frames)
    crlb = fisher_crlb_px(1000.0, BG, SIGMA)
    print(
        f"\n-- detection + localization, 512x512 frames with 100 spots (N 1000, b 100, sigma 1.3 px), "
        f"{n_frames} frames x {rounds} rounds, interleaved"
    )
    # trackpy: diameter 7 (>= 4 sigma + 1, odd), minmass tuned on the first frame for the best F1.
    best = (0.0, -1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mm in (100, 200, 300, 400, 500, 600, 800, 1000, 1200):
            df = tp.locate(frames[0][0], 7, minmass=mm, engine="numba")
            hit, fp, _ = score(df.x.to_numpy(), df.y.to_numpy(), frames[0][1], frames[0][2])
            f1 = 2 * hit / (2 * hit + fp + (100 - hit))
            if f1 > best[1]:
                best = (mm, f1)
    minmass = best[0]
    runs = {
        "trackpy.locate (numba)": lambda img: tp.locate(img, 7, minmass=minmass, engine="numba"),
        "scopestream MLE": Localizer(LocalizeSettings(psf_sigma_px=SIGMA)).localize,
        "scopestream radial symmetry": Localizer(LocalizeSettings(psf_sigma_px=SIGMA, method="radial_symmetry")).localize,
    }
    for fn in runs.values():
        fn(frames[0][0])  # warm-up (numba compile, buffers)
    times: dict[str, list[float]] = {name: [] for name in runs}
    stats: dict[str, tuple[int, int, list[np.ndarray]]] = {name: (0, 0, []) for name in runs}
    for r in range(rounds):
        for img, tx, ty in frames:
            for name, fn in runs.items():
                t = time.perf_counter()
                res = fn(img)
                times[name].append(time.perf_counter() - t)
                if r == 0:
                    h, f, e = score(np.asarray(res.x, dtype=float), np.asarray(res.y, dtype=float), tx, ty)
                    hits, fps, errs = stats[name]
                    stats[name] = (hits + h, fps + f, errs + [e])
    for name in runs:
        hits, fps, errs = stats[name]
        err = np.concatenate(errs)
        rmse = float(np.sqrt(np.mean(err**2)))
        t_ms = np.array(times[name]) * 1e3
        print(
            f"   {name:28s}: {np.median(t_ms):7.2f} ms/frame (median; p10 {np.percentile(t_ms, 10):.2f}, p90 "
            f"{np.percentile(t_ms, 90):.2f})  recall {hits / (100 * n_frames):.3f}  false {fps}  "
            f"RMSE {rmse:.4f} px = {rmse / crlb:.3f} x CRLB  bias x {np.mean(err[: err.size // 2]):+.4f} px"
        )
    print(f"   (trackpy minmass tuned to {minmass})")
    ref = np.array(times["trackpy.locate (numba)"])
    for name in ("scopestream MLE", "scopestream radial symmetry"):
        ratio = ref / np.array(times[name])
        print(
            f"   speed-up vs trackpy, {name}: {np.median(ratio):.1f}x (median of per-frame ratios; "
            f"p10 {np.percentile(ratio, 10):.1f}x, p90 {np.percentile(ratio, 90):.1f}x)"
        )


def main() -> None:
    rng = np.random.default_rng(2024)
    precision_on_rois(rng, 1000.0)
    precision_on_rois(rng, 500.0)
    precision_on_rois(rng, 200.0)
    speed(rng)
    print(
        "\nNotes: at N = 200, b = 100 the spot's peak SNR after matched filtering is ~4 (below the 5-sigma detection"
        "\nthreshold); the MLE is in its low-SNR regime where no unbiased estimator reaches the CRLB: even the MLE"
        "\nthat is told the true background stays ~1.2x above it. Radial symmetry scores below the bound only"
        "\nbecause it shrinks toward the region centre (slope < 1), which in this test is the rounded true position."
    )


if __name__ == "__main__":
    main()
