"""Motion-state model: accuracy, robustness, speed. Run: ``python benchmarks/bench_motion.py [--quick]``.

Evaluates the SHIPPED weights (``models/weights/motion``) through ONNX Runtime on freshly simulated sets
from seeds never used in training (training data: seed 0; its test set: 10**9; here 3 · 10**9 + i):

1. accuracy at K = 200 and K = 50 (all windows, the windows the live stage would cut, and the windows
   whose motion exceeds the localization precision), per-class F1, the confusion matrix, accuracy per
   speed bin;
2. robustness at K = 200: photons 1×, 2×, 4× dimmer; vesicle diameter bins; a second, stationary
   vesicle 6 px away; the Airy PSF and EMCCD noise (never seen in training): the generalization gap;
3. speed: the network alone (batch 1, one ONNX Runtime thread) and the whole job per window (MUSICAL
   image + features + network), wall and CPU time; the latency to ``motion_state`` when 32 windows
   complete in the same frame and one worker takes them in turn;
4. frames from a true state switch (simulated with switching on) to its change event.

The side-by-side comparison of SRAN / features-only / fused comes from ``scopestream train motion``'s
report (``report.md``), where all three are trained and tested on the same sets.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from scopestream.daemon._products import MOTION_STATES  # noqa: E402
from scopestream.models._backends import OnnxRuntimeBackend  # noqa: E402
from scopestream.models._card import load_model_folder  # noqa: E402
from scopestream.models.motion._data import DataSettings, generate_dataset  # noqa: E402
from scopestream.models.motion._evaluate import (  # noqa: E402
    binned_accuracy,
    classification_figures,
    format_confusion,
    format_figures,
)
from scopestream.models.motion._inputs import InputSpec  # noqa: E402
from scopestream.plugins.motion import default_model_dir  # noqa: E402


def _predict(backend: OnnxRuntimeBackend, ds) -> np.ndarray:  # type: ignore[no-untyped-def]
    return backend.run({"image": ds.images.astype(np.float32)[:, None], "features": ds.features})["probabilities"].argmax(1)


def accuracy(backend: OnnxRuntimeBackend, spec: InputSpec, movies: int) -> None:
    ds = generate_dataset(seed=3 * 10**9, movies_per_state=movies, spec=spec, k_long=200, k_short=50)
    pred = _predict(backend, ds)
    rows = {}
    for k in (200, 50):
        sel = ds.k_frames == k
        rows[f"K{k} all"] = classification_figures(ds.labels[sel], pred[sel])
        rows[f"K{k} live"] = classification_figures(ds.labels[sel & ds.live], pred[sel & ds.live])
        res = sel & ((ds.labels == 0) | (ds.speed_nm_per_frame >= 20.0))
        rows[f"K{k} resolvable"] = classification_figures(ds.labels[res], pred[res])
    print("## Accuracy (shipped model, seed 3e9)\n")
    print(format_figures(rows))
    print("\nK200 confusion (rows truth):\n")
    print(format_confusion(rows["K200 all"]))
    sel = ds.k_frames == 200
    correct = pred[sel] == ds.labels[sel]
    print("\nK200 accuracy per speed bin (nm/frame; RanW/RCir: RMS step):")
    for state in ("RanW", "RCir", "Circ", "Flow"):
        s = ds.labels[sel] == MOTION_STATES.index(state)
        cells = binned_accuracy(ds.speed_nm_per_frame[sel][s], correct[s], (0, 5, 20, 100, 500, 1001))
        print(f"- {state}: " + ", ".join(f"[{c['low']:g},{c['high']:g}) {c['accuracy']:.2f} (n={c['n']})" for c in cells if c["n"]))
    s = ds.labels[sel] == 0
    print(f"- Stat: {correct[s].mean():.2f} (n={int(s.sum())})")
    d = ds.diameter_nm[sel]
    print("K200 accuracy per diameter bin: " + ", ".join(
        f"[{c['low']:g},{c['high']:g}) nm {c['accuracy']:.2f} (n={c['n']})" for c in binned_accuracy(d, correct, (150, 230, 320, 401))))


def robustness(backend: OnnxRuntimeBackend, spec: InputSpec, movies: int) -> None:
    print("\n## Robustness (K = 200, all windows / resolvable windows)\n")
    print("| condition | n | accuracy all | accuracy resolvable |\n|---|---|---|---|")
    base = DataSettings()
    conditions = [
        ("training conditions (2000 photons, Gaussian PSF, sCMOS)", base),
        ("2× dimmer (1000 photons)", DataSettings(photons_per_frame=1000.0)),
        ("4× dimmer (500 photons)", DataSettings(photons_per_frame=500.0)),
        ("second stationary vesicle 6 px away", DataSettings(second_vesicle=6.0)),
        ("Airy PSF (unseen)", DataSettings(psf_model="airy")),
        ("EMCCD, EM gain 100 (unseen)", DataSettings(em_gain=100.0)),
    ]
    for i, (name, data) in enumerate(conditions):
        t0 = time.perf_counter()
        ds = generate_dataset(seed=3 * 10**9 + 1 + i, movies_per_state=movies, spec=spec, data=data, k_long=200, k_short=200)
        pred = _predict(backend, ds)
        res = (ds.labels == 0) | (ds.speed_nm_per_frame >= 20.0)
        a_all = float(np.mean(pred == ds.labels))
        a_res = float(np.mean(pred[res] == ds.labels[res]))
        print(f"| {name} | {len(ds)} | {a_all:.3f} | {a_res:.3f} |  ({time.perf_counter() - t0:.0f} s)", flush=True)


def speed(folder, spec: InputSpec) -> None:  # type: ignore[no-untyped-def]
    from scopestream.models._backends import ModelRef
    from scopestream.plugins.motion import classify_windows

    print("\n## Speed (one core)\n")
    backend = OnnxRuntimeBackend(threads=1)
    backend.load(folder)
    backend.warm_up()
    ds = generate_dataset(seed=3 * 10**9 + 99, movies_per_state=1, spec=spec, k_long=200, k_short=200)
    x = {"image": ds.images[:1].astype(np.float32)[:, None], "features": ds.features[:1]}
    n = 500
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        backend.run(x)
    print(f"network alone, ONNX Runtime, batch 1: {(time.perf_counter() - t0) / n * 1e3:.2f} ms wall, "
          f"{(time.process_time() - c0) / n * 1e3:.2f} ms CPU per window (target <= 5 ms)")
    rng = np.random.default_rng(0)
    pixels = (100 + rng.poisson(30, (200, 25, 25))).astype(np.float32)
    pixels[:, 10:15, 10:15] += rng.poisson(300, (200, 5, 5))
    pos = np.c_[12 + rng.normal(0, 0.3, 200), 12 + rng.normal(0, 0.3, 200)]
    ref = ModelRef(str(folder.path), "onnxruntime", "cpu", 1)
    classify_windows(ref, [pixels], [pos])
    jobs, cpus = [], []
    for _ in range(32):
        t0, c0 = time.perf_counter(), time.process_time()
        r = classify_windows(ref, [pixels], [pos])
        jobs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    jobs_ms = np.array(jobs) * 1e3
    print(f"whole job per K=200 window (MUSICAL sub {spec.subpixels} + features + network): median {np.median(jobs_ms):.1f} ms wall, "
          f"{np.median(cpus) * 1e3:.1f} ms CPU; network inside it {r.inference_ms:.2f} ms")
    done = np.cumsum(jobs_ms)  # 32 windows completing in one frame, one worker, in turn
    print(f"32 windows complete in one frame, one worker: window complete -> result p50 {np.percentile(done, 50):.0f} ms, "
          f"p99 {np.percentile(done, 99):.0f} ms (+ the housekeeping tick, <= 100 ms, to publication)")


def switch_delay(seeds: int) -> None:
    from scopestream.daemon._config import load_config
    from scopestream.daemon._frames import Frame
    from scopestream.models._backends import ModelRef
    from scopestream.plugins.localize import Localizer, LocalizeSettings
    from scopestream.plugins.motion import _WindowCutter, classify_windows
    from scopestream.plugins.track import Tracker, TrackSettings
    from scopestream.sim_camera import simulate_stack

    print("\n## Frames from a true switch to its motion_change (K = 200 windows side by side)\n")
    scene = {"n_particles": 1, "margin_nm": 0.0, "states": ["Stat", "Circ"], "dwell_ms": {"Stat": 4000.0, "Circ": 1.0e9},
             "circ_speed_um_per_s": 10.0, "circ_radius_nm": [300.0, 400.0], "vesicle_diameter_nm": 200.0,
             "blink_on_mean_ms": 200.0, "blink_off_mean_ms": 100.0, "bleach_half_life_ms": 20000.0}
    config = load_config(None, ["stages=[localize, track]"], preset={"simulation": scene})
    ref = ModelRef(str(default_model_dir()), "onnxruntime", "cpu", 1)
    delays = []
    for seed in range(seeds * 4):
        movie, truth = simulate_stack(config, "widefield", n_frames=800, size_px=64, n_particles=1, seed=seed)
        states = truth["state"]
        if states[0] != "Stat" or not (states != "Stat").any():
            continue
        switch = int(truth["frame"][np.flatnonzero(states != "Stat")[0]])
        if not 100 <= switch <= 550:
            continue
        loc, tracker = Localizer(LocalizeSettings(), config), Tracker(TrackSettings())
        cutter = _WindowCutter(200, 200, 25, 12, 32)
        previous, change_at = None, None
        for i in range(movie.shape[0]):
            spots = loc.localize(movie[i], i)
            upd = tracker.update(i, spots.x, spots.y, spots.uncertainty_px)
            for w in cutter.update(Frame(seq=i, image=movie[i], t_acquired=0.0), upd).windows:
                state = MOTION_STATES[int(classify_windows(ref, [w.pixels], [w.positions_px]).probabilities[0].argmax())]
                if previous is not None and state != previous and change_at is None:
                    change_at = w.frame_end
                previous = state
        delays.append(np.nan if change_at is None else change_at - switch)
        print(f"seed {seed}: switch at frame {switch}, change event at frame {change_at} (delay {delays[-1]})", flush=True)
        if len(delays) >= seeds:
            break
    d = np.array(delays, dtype=float)
    print(f"delay switch -> change event: median {np.nanmedian(d):.0f} frames, max {np.nanmax(d):.0f} "
          f"(bound: 2 K - 1 = 399 with windows side by side), missed {int(np.isnan(d).sum())}/{len(d)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sets (a couple of minutes)")
    parser.add_argument("--only", choices=("accuracy", "robustness", "speed", "switch"), nargs="*")
    args = parser.parse_args()
    folder = load_model_folder(default_model_dir(), name="motion", major_version=1)
    spec = InputSpec(**folder.card.input_spec)
    backend = OnnxRuntimeBackend()
    backend.load(folder)
    print(f"model {folder.card.name} {folder.card.version} ({folder.card.architecture}), {time.strftime('%Y-%m-%d %H:%M')}\n")
    only = set(args.only or ("accuracy", "robustness", "speed", "switch"))
    t0, c0 = time.perf_counter(), time.process_time()
    if "speed" in only:
        speed(folder, spec)
    if "accuracy" in only:
        accuracy(backend, spec, 10 if args.quick else 30)
    if "robustness" in only:
        robustness(backend, spec, 6 if args.quick else 12)
    if "switch" in only:
        switch_delay(2 if args.quick else 4)
    print(f"\nbenchmark: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU")


if __name__ == "__main__":
    main()
