"""MUSICAL speed: the vectorized kernel against a plain per-pixel loop, on one core.

Run:  .venv/bin/python benchmarks/bench_musical.py [--quick]

Prints, side by side in one run:
- 25×25 px × 200 frames at sub 20 and sub 10: plain per-pixel loop (SVD of D per pixel, projection
  on all N_w² singular vectors, as a straightforward port of the published code) vs the numpy
  kernel with float64, float32 and mixed projections and the torch CPU backend (float64); times
  (best of 5, the variants interleaved), speed-ups over the loop and over numpy float64, the
  largest element-wise relative error against the loop, and the share of (window, test point)
  pairs that mixed recomputed in float64.
- The parts at sub 20: Gram matrices, eigh, the projections in each precision.
- 256×256 px × 200 frames at sub 10 and sub 20, float64 and mixed (kernel only; the loop's time
  extrapolated from its per-window time above, since it would run for tens of minutes).
- The worker pool: 8 windows through 2 threads vs 2 spawned processes vs serial.

BLAS is limited to one thread before numpy is imported (SCIENCE.md: batched eigh was 15× slower
with 2 BLAS threads).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import numpy as np  # noqa: E402
from scipy.special import erf  # noqa: E402

from scopestream.daemon._offload import limit_blas_threads  # noqa: E402
from scopestream.plugins import _musical_core as core  # noqa: E402
from scopestream.plugins import musical as mus  # noqa: E402

PX_NM, LAMBDA_NM, NA = 65.0, 510.0, 1.49
THRESHOLD = -1.0


def vesicle_movie(n_frames: int, size: int, seed: int, n_vesicles: int = 1) -> np.ndarray:
    """Circ vesicles (20 blinking fluorophores in ~100 nm) at ~2000 photons/frame, background 10."""
    rng = np.random.default_rng(seed)
    sigma = 0.21 * LAMBDA_NM / NA / PX_NM
    edges = np.arange(size + 1) - 0.5
    expected = np.full((n_frames, size, size), 10.0)
    for _ in range(n_vesicles):
        centre = rng.uniform(8, size - 8, 2) if n_vesicles > 1 else np.array([(size - 1) / 2] * 2)
        angle = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n_frames) / n_frames
        radius = 300.0 / PX_NM
        for _f in range(20):
            off = rng.normal(0, 50.0 / PX_NM, 2)
            y = centre[0] + radius * np.sin(angle) + off[0]
            x = centre[1] + radius * np.cos(angle) + off[1]
            on = rng.random(n_frames) < 0.3
            ey = np.diff(erf((edges[None] - y[:, None]) / (np.sqrt(2) * sigma)), axis=1) / 2
            ex = np.diff(erf((edges[None] - x[:, None]) / (np.sqrt(2) * sigma)), axis=1) / 2
            expected += (on * 2000.0 / 20 / 0.3)[:, None, None] * ey[:, :, None] * ex[:, None, :]
    return rng.poisson(expected).astype(np.float64)


def plain_loop(stack: np.ndarray, sub: int) -> np.ndarray:
    """The reference: one pixel at a time, SVD of D, projections on all singular vectors."""
    geom = core.musical_geometry(LAMBDA_NM, NA, PX_NM, sub)
    g, w, n_w = geom.psf_matrix, geom.weights, geom.window_px
    k, h, wd = stack.shape
    x = stack / stack.max()
    canvas = np.zeros((h * sub, wd * sub))
    count = np.zeros_like(canvas)
    for r in range(h - n_w + 1):
        for c in range(wd - n_w + 1):
            d = w[:, None] * x[:, r : r + n_w, c : c + n_w].reshape(k, -1).T
            u, s, _ = np.linalg.svd(d, full_matrices=True)
            n_sv = min(n_w * n_w, k)
            above = int(np.sum(s >= 10.0**THRESHOLD))
            m = above + 1 if above + 1 < n_sv else n_sv - 3
            proj = u.T @ g
            f = (np.sqrt((proj[:m] ** 2).sum(0)) / np.sqrt((proj[m:] ** 2).sum(0))) ** 4.0
            canvas[r * sub : (r + n_w) * sub, c * sub : (c + n_w) * sub] += f.reshape(n_w * sub, n_w * sub)
            count[r * sub : (r + n_w) * sub, c * sub : (c + n_w) * sub] += 1
    return canvas / count


def best_of(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best time and last output of each function, the functions taking turns (fair under load)."""
    best = {name: np.inf for name in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


def kernel(stack: np.ndarray, sub: int, **kw) -> np.ndarray:
    return mus.musical_image(stack, wavelength_nm=LAMBDA_NM, na=NA, pixel_size_nm=PX_NM,
                             subpixels=sub, threshold=THRESHOLD, **kw).image


def recomputed_share(stack: np.ndarray, sub: int) -> float:
    stats: dict[str, float] = {}
    geom = core.musical_geometry(LAMBDA_NM, NA, PX_NM, sub)
    core.musical_canvas(stack / stack.max(), geom, THRESHOLD, 4.0, dtype="mixed", stats=stats)
    return stats["recomputed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="skip the 256×256 field and the pool")
    args = parser.parse_args()
    stack = vesicle_movie(200, 25, seed=1)
    print("MUSICAL benchmark, one core (BLAS 1 thread); λ 510 nm, NA 1.49, 65 nm px (N_w = 7), threshold −1, α 4")
    print(f"25×25 px × 200 frames, {19 * 19} windows; times best of 5 (interleaved); ×loop = speed-up over the "
          "plain loop, ×f64 = over numpy float64; err = max element-wise relative error against the loop")
    per_window_loop = {}
    for sub in (20, 10):
        core.musical_geometry(LAMBDA_NM, NA, PX_NM, sub)  # G once, outside the timings
        t_loop, ref = best_of(lambda sub=sub: plain_loop(stack, sub), 1)
        per_window_loop[sub] = t_loop / 361
        variants = {
            "numpy float64": lambda sub=sub: kernel(stack, sub, dtype="float64"),
            "numpy float32": lambda sub=sub: kernel(stack, sub, dtype="float32"),
            "numpy mixed": lambda sub=sub: kernel(stack, sub, dtype="mixed"),
            "torch CPU float64": lambda sub=sub: kernel(stack, sub, backend="torch"),
        }
        for fn in variants.values():
            fn()  # operands (float32 copies, basis) once, outside the timings
        times, outs = interleaved(variants, 5)
        print(f"  sub {sub:2d}: plain loop {t_loop:7.3f} s")
        for name, t in times.items():
            err = float(np.max(np.abs(outs[name] - ref) / ref))
            extra = f", recomputed in float64: {recomputed_share(stack, sub):.1%} of pairs" if "mixed" in name else ""
            print(f"    {name:18s} {t:6.3f} s  ×loop {t_loop / t:5.1f}  ×f64 {times['numpy float64'] / t:4.2f}  "
                  f"err {err:.1e}{extra}")
    geom = core.musical_geometry(LAMBDA_NM, NA, PX_NM, 20)
    hwk = np.ascontiguousarray(np.moveaxis(stack / stack.max(), 0, -1))
    t_gram, gram = best_of(lambda: core.gram_matrices(hwk, geom), 3)
    t_eigh, (sigma, vec) = best_of(lambda: core.eigen_decomposition(gram.reshape(-1, 49, 49)), 3)
    m = core.signal_subspace_size(sigma, THRESHOLD, 200)
    rows = np.minimum(m, 49 - m)
    t_proj, _ = interleaved({dt: lambda dt=dt: core.indicator_numpy(vec, m, geom, 4.0, dt)
                             for dt in ("float64", "float32", "mixed")}, 3)
    print(f"  parts at sub 20: Gram {t_gram * 1e3:.1f} ms, eigh {t_eigh * 1e3:.1f} ms, projections "
          + ", ".join(f"{dt} {t * 1e3:.0f} ms" for dt, t in t_proj.items())
          + f"; signal-subspace size M median {int(np.median(m))} (max {m.max()}); rows projected per window "
          f"{rows.mean():.1f} of 49")
    t_auto, _ = best_of(lambda: mus.musical_image(stack, subpixels=20, threshold="auto").image, 3)
    sig_all = np.sqrt(np.clip(np.linalg.eigvalsh(gram.reshape(-1, 49, 49))[:, ::-1], 0, None))
    thr_auto = core.auto_threshold(sig_all, 200)
    m_auto = core.signal_subspace_size(sig_all, thr_auto, 200)
    print(f"  threshold 'auto' ({thr_auto:.2f}) at sub 20: {t_auto:.3f} s, M median {int(np.median(m_auto))}, "
          f"rows per window {np.minimum(m_auto, 49 - m_auto).mean():.1f}")
    if args.quick:
        return
    big = vesicle_movie(200, 256, seed=2, n_vesicles=40)
    n_big = 250 * 250
    print(f"256×256 px × 200 frames, {n_big} windows (40 Circ vesicles)")
    for sub in (10, 20):
        t_big, _ = best_of(lambda sub=sub: kernel(big, sub), 1)
        t_mixed, _ = best_of(lambda sub=sub: kernel(big, sub, dtype="mixed"), 1)
        est = per_window_loop[sub] * n_big
        print(f"  sub {sub:2d}: numpy f64 {t_big:7.1f} s | numpy mixed {t_mixed:7.1f} s (×f64 {t_big / t_mixed:4.2f}) | "
              f"plain loop (extrapolated from 25×25) {est:7.0f} s ({est / t_big:5.1f}× f64)")
    movies = [vesicle_movie(200, 25, seed=10 + i) for i in range(8)]
    jobs = [mus._WindowJob(m, float(m.max()), LAMBDA_NM, NA, PX_NM, 10, THRESHOLD, 4.0, "numpy", "cpu")
            for m in movies]
    t0 = time.perf_counter()
    for j in jobs:
        mus._run_window_job(j)
    t_serial = time.perf_counter() - t0
    with ThreadPoolExecutor(2) as ex:
        t0 = time.perf_counter()
        list(ex.map(mus._run_window_job, jobs))
        t_thread = time.perf_counter() - t0
    with ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=limit_blas_threads) as ex:
        list(ex.map(mus._run_window_job, jobs[:2]))  # start-up and G outside the timing
        t0 = time.perf_counter()
        list(ex.map(mus._run_window_job, jobs))
        t_proc = time.perf_counter() - t0
    print(f"pool, 8 windows of 25×25×200 at sub 10 ({os.cpu_count()} cores on this machine): serial {t_serial:.2f} s | "
          f"2 threads {t_thread:.2f} s ({t_serial / t_thread:.2f}×) | 2 processes {t_proc:.2f} s "
          f"({t_serial / t_proc:.2f}×)")


if __name__ == "__main__":
    main()
