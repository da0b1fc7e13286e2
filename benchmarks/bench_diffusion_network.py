"""The image-stack network against the track estimators (MLE, CVE) on the SAME 16-frame stacks.

Stacks: fresh seeds of the training generator (:mod:`scopestream.models.diffusion._data`: the
widefield simulator, point emitters, D log-uniform in [1e-3, 1] px²/frame, 300-3000 photons,
background 2-20 photons/px), at R = 1/6 (continuous exposure, 16 instants per exposure) and R = 0
(stroboscopic). The seeds (``--seed``, default 2·10^9) are neither the training nor the training
report's test seeds.

Per stack:

- network: the shipped model folder (``models/weights/diffusion``, or ``--model-dir``) through
  ONNX Runtime (rotation-averaged; one thread), fed the stack and R;
- MLE and CVE: the frames of the stack go through ``localize`` (``locate``, the live stage's code,
  default settings), the detection nearest the particle's true position (within 2 px) in each
  frame is its point; ``estimate_batch(method="mle")`` with the reported uncertainties (blur-
  calibrated, the calibration check as live) and ``method="cve"`` on those 15 displacements,
  with the exact R of the data.

Figure of merit: RMSE of ln D per D bin (six bins, two per decade). Track estimates of D <= 0
(MLE at its bound, CVE negative) and stacks with fewer than 4 detections are floored at
D = 1e-4 px²/frame (a tenth of the lowest true D) and counted in ``floored``; the network
always answers. Also: the network's calibration (mean z² = error²/predicted variance) and the CPU
time per stack of each route (localize + MLE vs the network).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_diffusion_network.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path

import numpy as np

from scopestream.daemon._config import build_config
from scopestream.models._backends import ModelRef
from scopestream.models.diffusion._data import (
    DataSettings,
    StackSet,
    blur_coefficient_of,
    render_mosaic,
)
from scopestream.models.diffusion._inputs import StackSpec, stack_input
from scopestream.plugins._diffusion_mle import displacement_series, estimate_batch, warm_up_kernel
from scopestream.plugins._diffusion_network import default_model_dir, load_network
from scopestream.plugins.localize import locate

FLOOR = 1e-4
EDGES = np.log(np.logspace(-3, 0, 7))


def track_points(ds: StackSet, blur: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Localize every frame of every stack; (frames, x, y, uncertainty) (m, T) and CPU seconds."""
    m, t, s, _ = ds.pixels.shape
    config = build_config({"acquisition": {"exposure_ms": 10.0 if blur > 0 else 0.1, "frame_interval_ms": 10.0}})
    c0 = time.process_time()
    table = locate(ds.pixels.reshape(m * t, s, s), config)
    cpu = time.process_time() - c0
    f = np.asarray(table["frame"], dtype=np.int64)
    x = np.asarray(table["x"], dtype=np.float64)
    y = np.asarray(table["y"], dtype=np.float64)
    u = np.asarray(table["uncertainty_px"], dtype=np.float64)
    frames = np.full((m, t), -1, dtype=np.int64)
    px, py, pu = (np.full((m, t), np.nan) for _ in range(3))
    best = np.full((m, t), np.inf)
    stack, k = f // t, f % t
    d = np.hypot(x - ds.xy[stack, k, 0], y - ds.xy[stack, k, 1])
    for i in np.flatnonzero(d <= 2.0):
        a, b = stack[i], k[i]
        if d[i] < best[a, b]:
            best[a, b] = d[i]
            frames[a, b], px[a, b], py[a, b], pu[a, b] = b, x[i], y[i], u[i]
    return frames, px, py, pu, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mosaics", type=int, default=12, help="mosaics per R (about 250 stacks each; default 12)")
    ap.add_argument("--seed", type=int, default=2 * 10**9)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="3 mosaics per R")
    args = ap.parse_args()
    n_mosaics = 3 if args.quick else args.mosaics
    spec, data = StackSpec(), DataSettings()
    ref = ModelRef(str(args.model_dir or default_model_dir()), "onnxruntime", "cpu", 1)
    folder, backend = load_network(ref)
    warm_up_kernel()  # numba compiles here, not in the timed MLE
    print(f"# bench_diffusion_network  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  model {folder.card.name} "
          f"{folder.card.version} ({folder.path}); {n_mosaics} mosaics per R, seed {args.seed}")
    rows = []
    timing = []
    for r_index, blur in enumerate((1.0 / 6.0, 0.0)):
        w0 = time.perf_counter()
        ds = StackSet.concatenate([render_mosaic(args.seed + r_index, i, blur, spec, data) for i in range(n_mosaics)])
        sim_s = time.perf_counter() - w0
        c0 = time.process_time()
        x = stack_input(ds.pixels)
        out = backend.run({"stack": x, "blur": np.full((len(ds), 1), blur, np.float32)})
        net_cpu = time.process_time() - c0
        mu = out["log_D"][:, 0].astype(np.float64)
        var = np.exp(out["log_var"][:, 0].astype(np.float64))
        frames, px, py, pu, loc_cpu = track_points(ds, blur)
        series = displacement_series(frames, px, py, pu)
        r_exact = blur_coefficient_of(blur)
        exposure_frames = 1.0 if blur > 0 else 0.01
        c0 = time.process_time()
        mle = estimate_batch(series, r_exact, "mle", exposure_frames=exposure_frames, psf_sigma_px=spec.psf_sigma_px)
        mle_cpu = time.process_time() - c0
        cve = estimate_batch(series, r_exact, "cve", exposure_frames=exposure_frames, psf_sigma_px=spec.psf_sigma_px)
        few = np.isfinite(px).sum(axis=1) < 4
        est = {"network": mu}
        floored = {"network": np.zeros(len(ds), bool)}
        for name, e in (("MLE", mle.D), ("CVE", cve.D)):
            bad = few | ~np.isfinite(e) | (e <= FLOOR)
            est[name] = np.log(np.where(bad, FLOOR, e))
            floored[name] = bad
        timing.append((blur, len(ds), sim_s, net_cpu, loc_cpu, mle_cpu))
        for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
            sel = (ds.log_D >= lo) & (ds.log_D < hi)
            row = {"R": blur, "D_lo": math.exp(lo), "D_hi": math.exp(hi), "n": int(sel.sum())}
            for name, e in est.items():
                row[name] = float(np.sqrt(np.mean((e[sel] - ds.log_D[sel]) ** 2)))
                row[name + "_floored"] = int(floored[name][sel].sum())
            row["z2"] = float(np.mean((mu[sel] - ds.log_D[sel]) ** 2 / var[sel]))
            row["cover95"] = float(np.mean((mu[sel] - ds.log_D[sel]) ** 2 / var[sel] <= 1.96**2))
            rows.append(row)
        sel = np.ones(len(ds), bool)
        row = {"R": blur, "D_lo": 1e-3, "D_hi": 1.0, "n": len(ds)}
        for name, e in est.items():
            row[name] = float(np.sqrt(np.mean((e - ds.log_D) ** 2)))
            row[name + "_floored"] = int(floored[name].sum())
        row["z2"] = float(np.mean((mu - ds.log_D) ** 2 / var))
        row["cover95"] = float(np.mean((mu - ds.log_D) ** 2 / var <= 1.96**2))
        row["all"] = True
        rows.append(row)
    print()
    print("RMSE of ln D on the same 16-frame stacks (D in px²/frame; 1 px²/frame = 1 µm²/s at 100 nm, 10 ms).")
    print("MLE/CVE: localize's points on those frames; floored = track estimates set to D = 1e-4 (D <= 0 or < 4 points).")
    print()
    print("| R | D bin | n | network | MLE | CVE | MLE / network | CVE / network | MLE floored | CVE floored | network mean z² | network 95 % cover |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = "all" if r.get("all") else f"[{r['D_lo']:.3g}, {r['D_hi']:.3g})"
        print(f"| {r['R']:.3f} | {label} | {r['n']} | {r['network']:.3f} | {r['MLE']:.3f} | {r['CVE']:.3f} | "
              f"{r['MLE'] / r['network']:.2f} | {r['CVE'] / r['network']:.2f} | {r['MLE_floored']} | {r['CVE_floored']} | "
              f"{r['z2']:.2f} | {r['cover95']:.3f} |")
    print()
    print("| R | stacks | simulate wall s | network CPU ms/stack (ORT, 1 thread, batch) | localize CPU ms/stack | MLE CPU ms/stack |")
    print("|---|---|---|---|---|---|")
    for blur, n, sim_s, net_cpu, loc_cpu, mle_cpu in timing:
        print(f"| {blur:.3f} | {n} | {sim_s:.1f} | {1e3 * net_cpu / n:.2f} | {1e3 * loc_cpu / n:.2f} | {1e3 * mle_cpu / n:.3f} |")


if __name__ == "__main__":
    main()
