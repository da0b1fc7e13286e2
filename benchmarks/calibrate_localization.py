"""Calibration of the localization uncertainties ``localize`` reports, static and under motion blur.

Writes the table :mod:`scopestream.plugins._loc_calibration` applies
(``plugins/_loc_calibration.json``) with ``--write``; without it, prints only.

The widefield simulator (point emitters, Brownian, uniformly lit exposure = frame interval,
``substeps_per_exposure`` 32, Gaussian PSF) gives each frame's exact photon-weighted mean
position over the exposure. ``localize`` (MLE, fixed PSF width) is run with its RAW uncertainty,
the Mortensen et al. (2010) bound (``Localizer(..., calibrated=False)``). We match detections to
the truth (nearest within 1 px, isolated particles only: no other particle within
``max(6, 8 s)`` px) and measure the normalized errors ``z = (x_hat - x) / uncertainty`` per axis:
``mean z^2`` is 1 for calibrated uncertainties.

1. **Static** (D = 0): photons 200-5000, background 10 and 50 photons/px, PSF SD 0.77 px (100 nm
   pixels) and 1.28 px (60 nm pixels). The fit is above its asymptotic bound by a factor that
   grows as the spot gets fainter; with ``q = var_raw / (s^2 + 1/12)`` (the raw variance in units
   of the pixelated PSF variance, ~ 1 / effective photons) it is fitted, by weighted least squares
   over the rows (weights: the inverse variance ``n / (2 var^2)`` of each row's ``mean z^2``), as
   ``f(q) = c0 + c1 q``, per spot. Rows where fewer than 95 % of the isolated particles are
   matched (the detection threshold selects the luckier spots there) are left out of the fit.
2. **Blur** (D 0-0.8 px^2/frame at 500, 1000, 4000 photons, PSF 0.77 px, 200 frames each): a fixed-width fit
   understates the error of a spot that the motion widened, in two ways: the photon noise acts on
   a wider spot (a variance factor ``1 + a u``, ``a`` ~ 1/3 from the blur's added variance
   ``D t_E / 3``) and the fitted centre of an asymmetric blurred spot differs from the mean
   position by an amount that does not shrink with photons (an added variance ``b s^2 u^4``; of
   the powers 2, 2.5, 3, 3.5, 4 tried, 4 fits best). With ``u = D t_E / s^2`` (D in px^2/frame,
   t_E the exposure in frames, s the PSF SD in px) the expected ``z^2`` of a spot is
   ``f(q) (1 + a u) + b s^2 u^4 / var_raw``; ``a`` and ``b`` are fitted (weighted least squares,
   ``f`` from step 1) to the rows' ``mean z^2``.

The calibrated variance of a spot is then ``f(q) var_raw (1 + a u) + b s^2 u^4``: ``localize``
reports ``sqrt(f(q) var_raw)`` (static part), the diffusion MLE adds the blur part at its D.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibrate_localization.py [--write] [--quick]
(~2-3 min CPU; --quick: a quarter of the frames, for a smoke run, never with --write).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from scopestream.daemon._config import build_config
from scopestream.plugins._loc_calibration import TABLE_PATH
from scopestream.plugins.localize import Localizer, LocalizeSettings
from scopestream.sim_camera import simulate_stack

COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibrate_localization.py --write"


def measure(
    d_um2_per_s: float, photons: float, n_frames: int, seed: int, *, background: float = 10.0, pixel_nm: float = 100.0,
    calibrated: bool = False,
) -> dict[str, np.ndarray | float]:
    """Normalized errors (x and y pooled) and the uncertainties (per z value) of matched spots.

    Returns ``z``, ``unc`` (px), ``sigma_px`` (the PSF SD localize fits with) and ``matched`` (the
    share of isolated in-field particles that were detected and matched).
    """
    cfg = build_config({
        "acquisition": {"exposure_ms": 10, "frame_interval_ms": 10}, "optics": {"pixel_size_nm": pixel_nm},
        "simulation": {"particle_kind": "point", "states": ["RanW"], "D_um2_per_s": d_um2_per_s,
                       "photons_per_frame": photons, "background_photons_per_px": background,
                       "substeps_per_exposure": 32, "margin_nm": 0.0},
    })
    # Wider PSFs: fewer particles, so that isolated ones stay common.
    n_particles = 30 if pixel_nm >= 100 else 12
    movie, truth = simulate_stack(cfg, "widefield", n_frames=n_frames, size_px=96, n_particles=n_particles, seed=seed)
    loc = Localizer(LocalizeSettings(), cfg, calibrated=calibrated)
    isolation_px = max(6.0, 8.0 * loc.sigma_px)
    z, unc = [], []
    n_true = n_found = 0
    for f in range(n_frames):
        spots = loc.localize(movie[f], f)
        t = truth[(truth["frame"] == f) & truth["visible"]]
        inside = (t["x"] > 5) & (t["x"] < 90) & (t["y"] > 5) & (t["y"] < 90)
        # Isolated particles only (a neighbour nearby biases both fits).
        nd, _ = cKDTree(np.c_[t["x"], t["y"]]).query(np.c_[t["x"], t["y"]], k=2)
        t = t[inside & (nd[:, 1] > isolation_px)]
        n_true += len(t)
        if not len(t) or not len(spots):
            continue
        dist, j = cKDTree(np.c_[spots.x, spots.y]).query(np.c_[t["x"], t["y"]], distance_upper_bound=1.0)
        ok = np.isfinite(dist)
        n_found += int(ok.sum())
        j = j[ok]
        u = spots.uncertainty_px[j]
        z.append(np.concatenate([(spots.x[j] - t["x"][ok]) / u, (spots.y[j] - t["y"][ok]) / u]))
        unc.append(np.concatenate([u, u]))
    return {"z": np.concatenate(z), "unc": np.concatenate(unc), "sigma_px": float(loc.sigma_px),
            "matched": n_found / max(n_true, 1)}


def _wls(design: np.ndarray, target: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least squares; returns the coefficients and the chi-square."""
    coef, *_ = np.linalg.lstsq(design * weight[:, None], target * weight, rcond=None)
    return coef, float(np.sum(((design @ coef - target) * weight) ** 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write the fitted table to {TABLE_PATH.name}")
    ap.add_argument("--quick", action="store_true", help="a quarter of the frames (smoke run; not with --write)")
    args = ap.parse_args()
    if args.quick and args.write:
        ap.error("--quick is a smoke run: it does not write the table")
    scale = 0.25 if args.quick else 1.0
    date = time.strftime("%Y-%m-%d %H:%M")
    t0, w0 = time.process_time(), time.perf_counter()
    print(f"date {date}; exposure = interval = 10 ms, background in photons/px, PSF sigma from 0.21 lambda/NA")
    # -- 1. static ---------------------------------------------------------------------
    print("static (D = 0), raw (Mortensen) uncertainties:")
    print(f"{'px nm':>5s} {'s px':>5s} {'bg':>4s} {'photons':>7s} {'spots':>6s} {'matched':>7s} {'q':>8s} {'mean z2':>7s} {'SE':>6s}")
    static = []
    seed = 100
    for pixel_nm in (100.0, 60.0):
        for background in (10.0, 50.0):
            for photons in (200.0, 350.0, 500.0, 1000.0, 2000.0, 5000.0):
                seed += 1
                r = measure(0.0, photons, int(1200 * scale), seed, background=background, pixel_nm=pixel_nm)
                z, unc, s = r["z"], r["unc"], float(r["sigma_px"])  # type: ignore[arg-type]
                q = unc**2 / (s**2 + 1.0 / 12.0)  # type: ignore[operator]
                v = float(np.mean(z**2))  # type: ignore[operator]
                se = v * np.sqrt(2.0 / z.size)  # type: ignore[union-attr]
                static.append({"pixel_nm": pixel_nm, "sigma_px": s, "background": background, "photons": photons,
                               "n": int(z.size), "matched": float(r["matched"]), "q_mean": float(np.mean(q)),  # type: ignore[arg-type]
                               "mean_z2": v, "se": float(se), "q": q})
                print(f"{pixel_nm:5.0f} {s:5.3f} {background:4.0f} {photons:7.0f} {z.size // 2:6d} {r['matched']:7.3f} "  # type: ignore[union-attr]
                      f"{np.mean(q):8.2e} {v:7.3f} {se:6.3f}", flush=True)
    use = [row for row in static if row["matched"] >= 0.95]
    # Row expectation of z^2: c0 + c1 mean(q) (f is linear in q, so the row mean is exact).
    design = np.array([[1.0, row["q_mean"]] for row in use])
    target = np.array([row["mean_z2"] for row in use])
    weight = 1.0 / np.array([row["se"] for row in use])
    (c0, c1), chi2_s = _wls(design, target, weight)
    print(f"static fit over {len(use)} rows (matched >= 95 %): f(q) = c0 + c1 q, c0 = {c0:.4f}, c1 = {c1:.3f}; "
          f"chi2 = {chi2_s:.1f} on {len(use) - 2} dof")
    print("mean z2 after the static correction (should be 1):",
          " ".join(f"{row['mean_z2'] / (c0 + c1 * row['q_mean']):.3f}" for row in static))
    # -- 2. blur -----------------------------------------------------------------------
    print("motion blur, raw uncertainties:")
    print(f"{'D um2/s':>8s} {'photons':>7s} {'u=Dt_E/s2':>9s} {'spots':>6s} {'unc px':>7s} {'mean z2':>7s} {'SE':>6s} {'|z|>3':>6s}")
    rows = []
    for photons in (500.0, 1000.0, 4000.0):
        for i, d in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)):
            r = measure(d, photons, int(200 * scale), seed=11 + i)
            z, unc, s = r["z"], r["unc"], float(r["sigma_px"])  # type: ignore[arg-type]
            v = float(np.mean(z**2))  # type: ignore[operator]
            u = d * 1.0 / s**2  # 1 px^2/frame = 1 um^2/s here; t_E = 1 frame
            se = v * np.sqrt(2.0 / z.size)  # type: ignore[union-attr]
            f_mean = float(np.mean(c0 + c1 * unc**2 / (s**2 + 1.0 / 12.0)))  # type: ignore[operator]
            rows.append((u, v, float(se), f_mean, float(np.mean(1.0 / unc**2)), s))  # type: ignore[operator]
            print(f"{d:8.3f} {photons:7.0f} {u:9.3f} {z.size // 2:6d} {np.median(unc):7.4f} {v:7.3f} {se:6.3f} "  # type: ignore[arg-type, union-attr]
                  f"{np.mean(np.abs(z) > 3):6.3f}", flush=True)  # type: ignore[operator]
    u, var, se, f_mean, inv_unc2, s = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    # E[z^2] = f (1 + a u) + b s^2 u^4 / unc^2, averaged over a row's spots: linear in (a, b).
    design = np.column_stack([f_mean * u, s**2 * u**4 * inv_unc2])
    (a, b), chi2_b = _wls(design, var - f_mean, 1.0 / se)
    pred = f_mean + design @ np.array([a, b])
    print(f"blur fit: mean z2 = f(q) (1 + a u) + b s^2 u^4 / unc^2: a = {a:.4f}, b = {b:.5f}; "
          f"chi2 = {chi2_b:.1f} on {len(u) - 2} dof")
    print("mean z2 after the correction (should be 1):", " ".join(f"{v:.2f}" for v in var / pred))
    print(f"CPU {time.process_time() - t0:.1f} s, wall {time.perf_counter() - w0:.1f} s")
    if args.write:
        table = {
            "command": COMMAND, "date": date,
            "static": {"c0": float(c0), "c1": float(c1), "chi2": chi2_s, "dof": len(use) - 2,
                       "q_range": [float(min(r["q_mean"] for r in use)), float(max(r["q_mean"] for r in use))],
                       "rows": [{k: v for k, v in row.items() if k != "q"} for row in static]},
            "blur": {"a": float(a), "b": float(b), "chi2": chi2_b, "dof": len(u) - 2,
                     "rows": [dict(zip(("u", "mean_z2", "se", "f_mean"), map(float, r[:4]), strict=True)) for r in rows]},
        }
        Path(TABLE_PATH).write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {TABLE_PATH}")


if __name__ == "__main__":
    main()
