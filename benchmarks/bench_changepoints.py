"""Live change points against the AnDi 2 metrics, on trajectories of our own AnDi-2-model generator.

Generator (after Muñoz-Gil et al. 2025, the challenge's models, simplified): 2-D trajectories of
200 frames that switch between states by a Markov chain (switching probability per frame
``1 / mean_dwell``), each state with (D, alpha) and a kind:

- ``two_state``: two free states, D 0.01 and 0.1 px^2/frame (tenfold), alpha 1 and 0.7 (fractional
  Brownian motion for alpha != 1: fractional Gaussian noise by circulant embedding, Davies-Harte);
- ``multi_state``: immobile (D 1e-4), free (D 0.05), free (D 0.5), directed (D 0.02 plus a drift of
  0.4 px/frame in a random direction; alpha 2 in the challenge's convention);

plus Gaussian localization noise of 0.03 px (known to the estimator as the per-spot uncertainty).
Mean dwell 60 frames, at least 10 frames per segment. The trajectories go frame by frame through
the ``diffusion`` stage's estimator (method ``mle``), as live: change points come from the
``diffusion_change`` output, segments from ``diffusion_segments``.

Metrics (as the challenge's ``utils_challenge`` computes them, per trajectory, pooled):
change points matched to the truth by the Hungarian method (``scipy.optimize.linear_sum_assignment``)
with a 10-frame gate: RMSE of the matched positions and JSC = TP / (TP + FP + FN); each true segment
paired with the predicted segment that overlaps it most: D by mean squared log error (MSLE), alpha
by mean absolute error (alpha capped at 2), the state by micro-F1 (here: the fraction of true
segments whose paired predicted segment has the right regime); and the delay from a true change to
the live event (frames; frame of the event - true change frame).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_changepoints.py
"""

from __future__ import annotations

import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from scopestream.daemon._config import build_config
from scopestream.plugins._changepoints import REGIME_LABELS
from scopestream.plugins.diffusion import DiffusionEstimator, DiffusionSettings
from scopestream.plugins.track import TrackUpdate

GATE = 10
SIGMA = 0.03
CFG = build_config({"acquisition": {"exposure_ms": 1, "frame_interval_ms": 10}, "optics": {"pixel_size_nm": 100}})
# 100 nm px, 10 ms frames: 1 px^2/frame = 1 um^2/s.

MODELS = {
    "two_state": [("free", 0.01, 1.0, 0.0), ("free", 0.1, 0.7, 0.0)],
    "multi_state": [("immobile", 1e-4, 1.0, 0.0), ("free", 0.05, 1.0, 0.0), ("free", 0.5, 1.0, 0.0), ("directed", 0.02, 2.0, 0.4)],
}


def fgn(rng: np.random.Generator, n: int, hurst: float) -> np.ndarray:
    """n samples of unit-variance fractional Gaussian noise (Davies-Harte)."""
    if abs(hurst - 0.5) < 1e-9:
        return rng.normal(size=n)
    k = np.arange(n + 1)
    gamma = 0.5 * (np.abs(k - 1) ** (2 * hurst) - 2 * k ** (2 * hurst) + (k + 1) ** (2 * hurst))
    row = np.concatenate([gamma, gamma[-2:0:-1]])
    lam = np.clip(np.fft.fft(row).real, 0, None)
    m = row.size
    z = rng.normal(size=m) + 1j * rng.normal(size=m)
    return (np.fft.fft(np.sqrt(lam / m) * z).real)[:n]


def generate(rng: np.random.Generator, model: str, n_frames: int = 200, dwell: float = 60.0):
    """One trajectory: positions (n_frames, 2) with noise, and its segments
    [(frame_start, frame_end, D, alpha, regime)] (frames of positions; a change at frame c means
    the displacement c -> c + 1 is the first of the new state)."""
    states = MODELS[model]
    k = len(states)
    s = rng.integers(k)
    cps = [0]
    labels = []
    t = 0
    while t < n_frames - 1:
        length = max(10, int(rng.geometric(1.0 / dwell)))
        labels.append(s)
        t += length
        if t < n_frames - 1:
            cps.append(t)
            s = (s + 1 + rng.integers(k - 1)) % k
    cps.append(n_frames - 1)
    steps = np.zeros((n_frames - 1, 2))
    segments = []
    for (a, b), lab in zip(zip(cps[:-1], cps[1:], strict=True), labels, strict=True):
        kind, d, alpha, v = states[lab]
        n = b - a
        inc = np.stack([fgn(rng, n, alpha / 2 if kind == "free" else 0.5) for _ in range(2)], axis=1) * np.sqrt(2 * d)
        if kind == "directed":
            ang = rng.uniform(0, 2 * np.pi)
            inc += v * np.array([np.cos(ang), np.sin(ang)])
        steps[a:b] = inc
        segments.append((a, b, d, alpha, kind))
    pos = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)]) + rng.normal(0, SIGMA, (n_frames, 2))
    return pos, segments


def match(true_cp: list[int], pred_cp: list[int]) -> tuple[list[tuple[int, int]], int, int]:
    """Hungarian matching with the gate: matched pairs, FP, FN."""
    if not true_cp or not pred_cp:
        return [], len(pred_cp), len(true_cp)
    cost = np.abs(np.subtract.outer(np.array(true_cp), np.array(pred_cp))).astype(float)
    big = cost.copy()
    big[big > GATE] = 1e6
    r, c = linear_sum_assignment(big)
    pairs = [(true_cp[i], pred_cp[j]) for i, j in zip(r, c, strict=True) if cost[i, j] <= GATE]
    return pairs, len(pred_cp) - len(pairs), len(true_cp) - len(pairs)


def run(model: str, n_traj: int, rng: np.random.Generator) -> None:
    data = [generate(rng, model) for _ in range(n_traj)]
    pos = np.stack([p for p, _ in data])  # (n, T, 2)
    n, T, _ = pos.shape
    est = DiffusionEstimator(DiffusionSettings(method="mle", rolling=False, history_frames=T + 1), CFG)
    events: list[tuple[int, int, int]] = []  # particle, frame_change, frame detected
    segments: dict[int, list[tuple[int, int, float, float, str]]] = {i: [] for i in range(n)}
    t0, w0 = time.process_time(), time.perf_counter()
    ids = np.arange(n)
    for f in range(T):
        upd = TrackUpdate(f, ids, pos[:, f, 0], pos[:, f, 1], [], [] if f < T - 1 else ids.tolist(),
                          uncertainty_px=np.full(n, SIGMA))
        _, ch = est.update(upd)
        if ch is None:
            continue
        if ch.changes:
            for p, c in zip(ch.changes["particle"].tolist(), ch.changes["frame_change"].tolist(), strict=True):
                events.append((p, c, f))
        if ch.segments:
            s = ch.segments
            for i in range(len(s["particle"])):
                segments[int(s["particle"][i])].append((
                    int(s["frame_start"][i]), int(s["frame_end"][i]), float(s["D_um2_per_s"][i]),
                    float(s["alpha"][i]), REGIME_LABELS[int(s["regime"][i])],
                ))
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    tp = fp = fn = 0
    sq, delays = [], []
    msle, mae, right, total = [], [], 0, 0
    for i, (_, true_seg) in enumerate(data):
        true_cp = [a for a, _, _, _, _ in true_seg[1:]]
        mine = [(c, f) for p, c, f in events if p == i]
        pairs, a, b = match(true_cp, [c for c, _ in mine])
        tp += len(pairs)
        fp += a
        fn += b
        sq += [(t - p) ** 2 for t, p in pairs]
        detected = dict(mine)
        delays += [detected[p] - t for t, p in pairs]
        for a0, b0, d, alpha, kind in true_seg:
            best, overlap = None, 0
            for seg in segments[i]:
                o = min(b0, seg[1]) - max(a0, seg[0])
                if o > overlap:
                    best, overlap = seg, o
            if best is None:
                continue
            total += 1
            msle.append((np.log(max(best[2], 1e-6)) - np.log(d)) ** 2)
            if np.isfinite(best[3]):
                mae.append(abs(min(best[3], 2.0) - min(alpha, 2.0)))
            right += best[4] == kind
    jsc = tp / max(tp + fp + fn, 1)
    print(f"{model:12s} {n:5d} {tp + fn:5d} {tp:4d} {fp:4d} {fn:4d}  {np.sqrt(np.mean(sq)) if sq else np.nan:5.2f}  {jsc:5.3f}  "
          f"{np.mean(msle):6.3f}  {np.mean(mae):5.3f}  {right / max(total, 1):5.3f}  "
          f"{np.median(delays) if delays else np.nan:5.1f} {np.percentile(delays, 90) if delays else np.nan:5.1f}  "
          f"{1e3 * cpu / T:7.2f} {1e3 * wall / T:7.2f}")


def main() -> None:
    rng = np.random.default_rng(7)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}; 200 frames per trajectory, sigma {SIGMA} px, gate {GATE} frames, live (causal) detection")
    print(f"{'model':12s} {'traj':>5s} {'trueCP':>5s} {'TP':>4s} {'FP':>4s} {'FN':>4s}  {'RMSE':>5s}  {'JSC':>5s}  "
          f"{'D MSLE':>6s}  {'a MAE':>5s}  {'F1':>5s}  {'delay':>5s} {'p90':>5s}  {'CPU ms/frame':>7s} {'wall':>7s}")
    for model in MODELS:
        run(model, 300, rng)


if __name__ == "__main__":
    main()
