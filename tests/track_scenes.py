"""Ground-truth particle scenes for tracking tests and benchmarks (not part of the package).

Particles move by Brownian steps (and optionally a constant drift per particle) in a square
field, reflected at the walls; detections are the true positions plus Gaussian localization
noise, with a fraction missed at random. Exact truth: ``frame, particle, x, y``.
"""

from __future__ import annotations

import numpy as np


def brownian_scene(
    rng: np.random.Generator, *, n_particles: int, n_frames: int, size_px: float = 512.0,
    step_sd_px: float = 1.0, drift_px: float = 0.0, loc_sd_px: float = 0.05, p_miss: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Truth and detections as dicts of 1-D arrays (frame, particle, x, y [, uncertainty_px])."""
    pos = rng.uniform(0, size_px, (n_particles, 2))
    angle = rng.uniform(0, 2 * np.pi, n_particles)
    vel = drift_px * np.column_stack([np.cos(angle), np.sin(angle)])
    frames, parts, xs, ys = [], [], [], []
    for f in range(n_frames):
        if f:
            pos = pos + vel + rng.normal(0.0, step_sd_px, pos.shape)
            pos = np.abs(pos)
            pos = size_px - np.abs(size_px - pos)
        frames.append(np.full(n_particles, f))
        parts.append(np.arange(n_particles))
        xs.append(pos[:, 0].copy())
        ys.append(pos[:, 1].copy())
    truth = {"frame": np.concatenate(frames), "particle": np.concatenate(parts),
             "x": np.concatenate(xs), "y": np.concatenate(ys)}
    keep = rng.random(truth["x"].size) >= p_miss
    det = {
        "frame": truth["frame"][keep],
        "x": truth["x"][keep] + rng.normal(0, loc_sd_px, keep.sum()),
        "y": truth["y"][keep] + rng.normal(0, loc_sd_px, keep.sum()),
        "uncertainty_px": np.full(keep.sum(), loc_sd_px),
    }
    return truth, det


def mota(truth: dict[str, np.ndarray], result: dict[str, np.ndarray] | object, max_dist_px: float = 2.0) -> float:
    """MOTA (Bernardin & Stiefelhagen 2008) via motmetrics; ``result`` has frame, particle, x, y."""
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=False)
    get = (lambda k: np.asarray(result[k])) if isinstance(result, dict) else (lambda k: np.asarray(result[k]))  # type: ignore[index]
    rf, rp, rx, ry = get("frame"), get("particle"), get("x"), get("y")
    t_order = np.argsort(truth["frame"], kind="stable")
    r_order = np.argsort(rf, kind="stable")
    tf = truth["frame"][t_order]
    t_b = np.searchsorted(tf, np.arange(tf.max() + 2))
    rf_s = rf[r_order]
    r_b = np.searchsorted(rf_s, np.arange(tf.max() + 2))
    for f in range(int(tf.max()) + 1):
        ti = t_order[t_b[f]:t_b[f + 1]]
        ri = r_order[r_b[f]:r_b[f + 1]]
        a = np.column_stack([truth["x"][ti], truth["y"][ti]])
        b = np.column_stack([rx[ri], ry[ri]])
        d = mm.distances.norm2squared_matrix(a, b, max_d2=max_dist_px**2)
        acc.update(truth["particle"][ti].tolist(), rp[ri].tolist(), d, frameid=f)
    mh = mm.metrics.create()
    return float(mh.compute(acc, metrics=["mota"], name="m")["mota"].iloc[0])
