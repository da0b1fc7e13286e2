"""Tracking quality (MOTA) and per-frame linking latency, side by side with trackpy.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_track.py
Scenes (tests/track_scenes.py): Brownian particles in a 512x512 px field, step SD 1 px/axis,
localization noise 0.05 px, 2 % of detections missed; 50 frames. (The shared simulator
scopestream.sim_camera.simulate_stack was not available when this was written; these scenes
give exact truth for the linking problem itself.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from track_scenes import brownian_scene, mota  # noqa: E402

from scopestream.plugins.track import Tracker, TrackSettings, link  # noqa: E402


def main() -> None:
    import pandas as pd
    import trackpy as tp

    tp.quiet()
    rng = np.random.default_rng(11)
    print("-- MOTA (motmetrics, match within 2 px), 512x512 px, 50 frames, step SD 1 px, 2 % missed")
    print(f"   {'density':>8s} {'particles':>9s}  {'scopestream':>11s}  {'trackpy.link':>12s}   (ms/frame ours / trackpy)")
    for label, n in (("low", 100), ("medium", 500), ("high", 1000)):
        truth, det = brownian_scene(rng, n_particles=n, n_frames=50, step_sd_px=1.0, p_miss=0.02)
        t = time.perf_counter()
        ours = link(det, max_displacement_px=5.0, max_gap_frames=2)
        t_ours = (time.perf_counter() - t) / 50
        df = pd.DataFrame({"frame": det["frame"], "x": det["x"], "y": det["y"]})
        t = time.perf_counter()
        theirs = tp.link(df, search_range=5.0, memory=2)
        t_tp = (time.perf_counter() - t) / 50
        print(f"   {label:>8s} {n:9d}  {mota(truth, ours):11.4f}  {mota(truth, theirs):12.4f}   ({t_ours * 1e3:.2f} / {t_tp * 1e3:.2f})")

    print("\n-- streaming latency per frame at 1000 particles (200 frames)")
    truth, det = brownian_scene(rng, n_particles=1000, n_frames=200, step_sd_px=1.0, p_miss=0.02)
    frames = [np.flatnonzero(det["frame"] == f) for f in range(200)]
    tracker = Tracker(TrackSettings(max_displacement_px=5.0, max_gap_frames=2))
    lat = []
    for f, idx in enumerate(frames):
        t = time.perf_counter()
        tracker.update(f, det["x"][idx], det["y"][idx], det["uncertainty_px"][idx])
        lat.append(time.perf_counter() - t)
    lat_ours = np.array(lat[1:]) * 1e3

    def frames_iter():  # type: ignore[no-untyped-def]
        for f, idx in enumerate(frames):
            yield f, np.column_stack([det["y"][idx], det["x"][idx]])

    lat = []
    gen = tp.link_iter(frames_iter(), search_range=5.0, memory=2)
    while True:
        t = time.perf_counter()
        try:
            next(gen)
        except StopIteration:
            break
        lat.append(time.perf_counter() - t)
    lat_tp = np.array(lat[1:]) * 1e3
    for name, v in (("scopestream Tracker.update", lat_ours), ("trackpy.link_iter", lat_tp)):
        print(f"   {name:28s}: p50 {np.percentile(v, 50):6.2f} ms   p99 {np.percentile(v, 99):6.2f} ms   max {v.max():6.2f} ms")
    print(f"   p99 ratio trackpy / ours: {np.percentile(lat_tp, 99) / np.percentile(lat_ours, 99):.1f}x")


if __name__ == "__main__":
    main()
