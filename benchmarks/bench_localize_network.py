"""The learned localizer (``localize.method: network``) against trackpy and our MLE, on the same frames.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_localize_network.py [--quick] [--scanning-only ...]
Needs the ``bench`` extra (trackpy, pandas). Seeds here start at 2 * 10**12: no training,
validation or test scene of ``scopestream train localize`` (seeds < 1.1 * 10**15, of the form
seed * 1_000_003 + index with seed 0, 5 * 10**8 or 10**9) uses them.

(a) Scanning camera, Netterstrøm et al.'s protocol: one quantum dot (a point, 3-D Brownian) in
    24 x 25 px images from the scanning simulator (2 us dwell, 1.1 ms retrace, 200 nm excitation
    sigma = 2 px at 100 nm pixels), at three diffusion coefficients from little to heavy scan blur.
    The truth is the photon-weighted centroid of the trajectory over the beam's time on the
    particle. A detection is true within eps px of the truth (one per image; duplicates are
    false); detections are ranked by each method's score (network: heat-map confidence; trackpy:
    mass; MLE: fitted photons; hybrid = network detections refined by the MLE, confidence; sparse =
    the network with 7 x 7 maxima and positions pooled over 3 x 3 cells, confidence; the first scanning
    model's sparse-particle variant, which the second model's own decoding -- 5 x 5, pooled -- supersedes) and the
    area under the precision-recall curve is the
    interpolated average precision (VOC). eps = 1, 2, 3 px (0.5, 1, 1.5 PSF sigma). Then a paired
    bootstrap over images of AUC(network) - AUC(MLE) at eps = 2 px: is the network ahead beyond noise?
    ``--scanning-only --first-image 400 --scanning-images N``: part (a) alone on fresh frames.
(b) Widefield, exact pixel-integrated Gaussian spots (sigma 1.3 px, b = 100 photons/px, Poisson;
    tests/spot_images.py): RMSE per axis over the Cramér-Rao bound at N = 200, 500, 1000 photons,
    16 well-separated spots per 64 x 64 frame, network vs the hybrid (network detects, MLE refines:
    ``network_refine: mle``) vs MLE, on the spots all found (and each on its own finds); then detection recall / precision / Jaccard (match within 1 px, Hungarian) at
    densities where spots overlap, network vs the MLE's band-pass detector.
(c) Speed on one CPU core: frames/s of the whole network method (normalization, ONNX Runtime,
    decoding, photometry) and of the ONNX Runtime call alone, at 64 x 64 and 512 x 512, beside the
    MLE stage on the same frames; CPU time (process_time) beside wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spot_images import random_positions, render_spots, to_adu  # noqa: E402

from scopestream.daemon._config import ScopestreamConfig, load_config  # noqa: E402
from scopestream.models.localize._train import match  # noqa: E402
from scopestream.plugins._gaussian_mle import fisher_crlb_px, fit_mle  # noqa: E402
from scopestream.plugins._loc_network import NetworkLocalizer, shipped_model_dir  # noqa: E402
from scopestream.plugins.localize import Localizer, LocalizeSettings  # noqa: E402
from scopestream.sim_camera._scanning import ScanningSimulator  # noqa: E402
from scopestream.sim_camera._settings import physics_from_config  # noqa: E402

SEED0 = 2 * 10**12
EPS_PX = (1.0, 2.0, 3.0)
D_VALUES = (0.5, 2.0, 5.0)
SIGMA_WF, BG_WF = 1.3, 100.0


def network(camera: str, config: ScopestreamConfig, threshold: float, sigma_px: float, refine: str = "none") -> NetworkLocalizer:
    """The shipped model of ``camera``; ``refine`` 'none' (the network's positions) or 'mle' (the hybrid)."""
    s = LocalizeSettings(method="network", network_threshold=threshold, psf_sigma_px=sigma_px, network_refine=refine)
    return NetworkLocalizer(s, config.camera, sigma_px, shipped_model_dir(camera))


def average_precision(scores: list[np.ndarray], hits: list[np.ndarray], n_truth: int) -> tuple[float, float, float]:
    """VOC average precision of pooled ranked detections; also the best F1's precision and recall."""
    s = np.concatenate(scores) if scores else np.empty(0)
    h = np.concatenate(hits) if hits else np.empty(0, bool)
    if s.size == 0 or n_truth == 0:
        return 0.0, 0.0, 0.0
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(h[order])
    fp = np.cumsum(~h[order])
    recall = tp / n_truth
    precision = tp / (tp + fp)
    # Interpolated: precision at recall r is the best precision at any recall >= r.
    interp = np.maximum.accumulate(precision[::-1])[::-1]
    r_prev = np.concatenate([[0.0], recall[:-1]])
    ap = float(np.sum((recall - r_prev) * interp))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    k = int(np.argmax(f1))
    return ap, float(precision[k]), float(recall[k])


def greedy_hits(x: np.ndarray, y: np.ndarray, score: np.ndarray, tx: float, ty: float, eps: float) -> np.ndarray:
    """True for the highest-scoring detection within eps of the single truth; the rest are false."""
    hit = np.zeros(x.size, bool)
    if x.size:
        near = np.flatnonzero(np.hypot(x - tx, y - ty) <= eps)
        if near.size:
            hit[near[np.argmax(score[near])]] = True
    return hit


def scanning_protocol(n_images: int, first_image: int = 0) -> None:
    import trackpy

    trackpy.quiet()
    print(f"\n(a) scanning camera, Netterstrøm protocol: 1 QD per 24 x 25 px image, {n_images} images per D, "
          "1000 photons/frame, background 5 photons/px, 2 us dwell, 1.1 ms retrace, sigma 2 px")
    base = load_config(None, [])
    net = network("scanning", base, 0.02, 2.0)
    hybrid = network("scanning", base, 0.02, 2.0, refine="mle")
    # The sparse-particle decoding variant (not the default; see the model's card): maxima over 7 x 7
    # cells and positions pooled over the 3 x 3 cells around each peak.
    sparse = network("scanning", base, 0.02, 2.0)
    sparse.nms_cells, sparse.pool_decoding = 7, True
    mle = Localizer(LocalizeSettings(method="mle", psf_sigma_px=2.0, threshold_snr=2.5, min_separation_px=3.0,
                                     exclude_saturated=False), base)
    rows = []
    boot: list[tuple[float, float, float, float]] = []
    for d_i, D in enumerate(D_VALUES):
        sim_settings = {"frame_height_px": 24, "frame_width_px": 25, "n_particles": 1, "margin_nm": 0.0,
                        "particle_kind": "point", "states": ["RanW"], "D_um2_per_s": D, "dwell_ms": 1e9,
                        "photons_per_frame": 1000.0, "background_photons_per_px": 5.0}
        physics = physics_from_config(base, **sim_settings)
        frames, truths = [], []
        for i in range(first_image, first_image + n_images):
            sim = ScanningSimulator(physics, seed=SEED0 + 10**6 * d_i + i)
            img, truth = sim.next_frame()
            vis = truth[truth["visible"]]
            if len(vis) != 1:
                continue  # the particle left the image during the scan (rare); no single truth
            frames.append(img)
            truths.append((float(vis["x"][0]), float(vis["y"][0])))
        dets: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"network": [], "hybrid": [], "sparse": [], "trackpy": [], "MLE": []}
        t_cpu = dict.fromkeys(dets, 0.0)
        for img in frames:
            t = time.process_time()
            loc, conf = net.localize_scored(img)
            t_cpu["network"] += time.process_time() - t
            dets["network"].append((loc.x, loc.y, conf))
            t = time.process_time()
            loc, conf = hybrid.localize_scored(img)
            t_cpu["hybrid"] += time.process_time() - t
            dets["hybrid"].append((loc.x, loc.y, conf))
            t = time.process_time()
            loc, conf = sparse.localize_scored(img)
            t_cpu["sparse"] += time.process_time() - t
            dets["sparse"].append((loc.x, loc.y, conf))
            t = time.process_time()
            f = trackpy.locate(img.astype(np.float64), 7, minmass=0, preprocess=True, engine="numba")
            t_cpu["trackpy"] += time.process_time() - t
            dets["trackpy"].append((f["x"].to_numpy(), f["y"].to_numpy(), f["mass"].to_numpy()))
            t = time.process_time()
            m = mle.localize(img)
            t_cpu["MLE"] += time.process_time() - t
            dets["MLE"].append((m.x, m.y, m.photons))
        # Is the network ahead of the MLE beyond sampling noise? Paired bootstrap over images (both
        # methods on the same resampled images) of AUC(network) - AUC(MLE) at eps = 2 px.
        diffs = []
        rng_b = np.random.default_rng(SEED0 + 9)
        pairs = {name: [(sc, greedy_hits(x, y, sc, tx, ty, 2.0)) for (x, y, sc), (tx, ty) in zip(dets[name], truths, strict=True)]
                 for name in ("network", "MLE")}
        for _ in range(1000):
            idx = rng_b.integers(0, len(truths), len(truths))
            a = [average_precision([pairs[m][k][0] for k in idx], [pairs[m][k][1] for k in idx], len(idx))[0] for m in pairs]
            diffs.append(a[0] - a[1])
        boot.append((D, float(np.mean(diffs)), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))))
        blur = []
        for name, per_image in dets.items():
            aps = []
            for eps in EPS_PX:
                scores, hits = [], []
                for (x, y, sc), (tx, ty) in zip(per_image, truths, strict=True):
                    scores.append(sc)
                    hits.append(greedy_hits(x, y, sc, tx, ty, eps))
                aps.append(average_precision(scores, hits, len(truths)))
            rows.append((D, name, aps, 1e3 * t_cpu[name] / max(len(frames), 1)))
        # How far the brightest pixel is from the truth: the scan blur this D causes.
        for img, (tx, ty) in zip(frames, truths, strict=True):
            r, c = np.unravel_index(np.argmax(img), img.shape)
            blur.append(np.hypot(c - tx, r - ty))
        print(f"   D = {D:g} um^2/s: {len(frames)} images with one visible particle; brightest pixel to truth "
              f"median {np.median(blur):.2f} px, 90th percentile {np.percentile(blur, 90):.2f} px")
    print(f"\n   {'D um2/s':>8} {'method':>8} " + " ".join(f"{'AUC eps=' + format(e, 'g'):>11} {'P/R@bestF1':>11}" for e in EPS_PX)
          + f" {'CPU ms/img':>10}")
    for D, name, aps, ms in rows:
        cells = " ".join(f"{ap:11.3f} {p:5.2f}/{r:4.2f}" for ap, p, r in aps)
        print(f"   {D:8g} {name:>8} {cells} {ms:10.2f}")
    print("\n   AUC(network) - AUC(MLE) at eps = 2 px, paired bootstrap over images (1000 resamples)")
    for D, mean, lo, hi in boot:
        print(f"   D = {D:g} um^2/s: {mean:+.3f}, 95 % interval [{lo:+.3f}, {hi:+.3f}]")


def widefield_precision(n_frames: int) -> None:
    print(f"\n(b1) widefield: RMSE per axis / CRLB, sigma {SIGMA_WF} px, b = {BG_WF:g} photons/px, 16 spots per 64 x 64 frame, "
          f"{n_frames} frames per N")
    config = ScopestreamConfig()
    net = network("widefield", config, 0.5, SIGMA_WF)
    hybrid = network("widefield", config, 0.5, SIGMA_WF, refine="mle")
    mle = Localizer(LocalizeSettings(method="mle", psf_sigma_px=SIGMA_WF), config)
    rng = np.random.default_rng(SEED0 + 1)
    print(f"   {'N':>5} {'CRLB px':>8} {'method':>8} {'recall':>7} {'RMSE/CRLB (own)':>16} {'RMSE/CRLB (all found)':>23} "
          f"{'sd(err/sigma_pred)':>18}")
    for n_ph in (200.0, 500.0, 1000.0):
        crlb = fisher_crlb_px(n_ph, BG_WF, SIGMA_WF)
        errs: dict[str, list[np.ndarray]] = {"network": [], "hybrid": [], "MLE": []}
        both: dict[str, list[np.ndarray]] = {"network": [], "hybrid": [], "MLE": []}
        zs: dict[str, list[np.ndarray]] = {"network": [], "hybrid": [], "MLE": []}
        found = dict.fromkeys(errs, 0)
        n_true = 0
        for _ in range(n_frames):
            gy, gx = np.meshgrid(np.arange(4) * 16 + 7.5, np.arange(4) * 16 + 7.5, indexing="ij")
            tx = gx.ravel() + rng.uniform(-2, 2, 16)
            ty = gy.ravel() + rng.uniform(-2, 2, 16)
            img = to_adu(rng, render_spots((64, 64), tx, ty, n_ph, SIGMA_WF, BG_WF))
            n_true += 16
            res = {"network": net.localize(img), "hybrid": hybrid.localize(img), "MLE": mle.localize(img)}
            pairs = {}
            for name, loc in res.items():
                i, j = match(loc.x, loc.y, tx, ty, 1.5)
                found[name] += len(i)
                e = np.column_stack([loc.x[i] - tx[j], loc.y[i] - ty[j]])
                errs[name].append(e)
                zs[name].append(e / loc.uncertainty_px[i, None])
                pairs[name] = dict(zip(j.tolist(), e.tolist(), strict=True))
            common = sorted(set(pairs["network"]) & set(pairs["hybrid"]) & set(pairs["MLE"]))
            for name in errs:
                both[name].append(np.array([pairs[name][k] for k in common]).reshape(-1, 2))
        # Reference: the MLE on 7 x 7 regions centred on every spot's rounded true position (no
        # detection step; what benchmarks/bench_localize.py reports: 1.21x at N = 200).
        rois, offs = [], []
        for _ in range(n_frames):
            tx, ty = 3 + rng.uniform(-0.5, 0.5, 16), 3 + rng.uniform(-0.5, 0.5, 16)
            rois.append(rng.poisson(render_stack(tx, ty, n_ph)))
            offs.append(np.column_stack([tx, ty]))
        r, o = np.concatenate(rois).astype(float), np.concatenate(offs)
        fit = fit_mle(r, SIGMA_WF)
        e_known = np.column_stack([fit.x_px - o[:, 0], fit.y_px - o[:, 1]])
        print(f"   {n_ph:5.0f} {crlb:8.4f} {'MLE, known positions (all spots)':>33} {np.sqrt(np.mean(e_known**2)) / crlb:7.3f}")
        for name in errs:
            e = np.concatenate(errs[name])
            b = np.concatenate(both[name])
            z = np.concatenate(zs[name])
            print(f"   {n_ph:5.0f} {crlb:8.4f} {name:>8} {found[name] / n_true:7.3f} {np.sqrt(np.mean(e**2)) / crlb:16.3f} "
                  f"{np.sqrt(np.mean(b**2)) / crlb:17.3f} (n={b.shape[0]}) {np.std(z):18.2f}")


def render_stack(tx: np.ndarray, ty: np.ndarray, n_ph: float) -> np.ndarray:
    """Expected photons of 7 x 7 regions with one spot each at (tx, ty), background BG_WF."""
    from spot_images import pixel_fractions

    return BG_WF + n_ph * pixel_fractions(ty, SIGMA_WF, 7)[:, :, None] * pixel_fractions(tx, SIGMA_WF, 7)[:, None, :]


def widefield_density(n_frames: int) -> None:
    print(f"\n(b2) widefield detection at overlapping densities: 64 x 64 px frames, spots uniform at random (no minimum "
          f"distance), N uniform in [500, 2000], sigma {SIGMA_WF} px, b = {BG_WF:g}; match within 1 px; {n_frames} frames per density")
    config = ScopestreamConfig()
    net = network("widefield", config, 0.5, SIGMA_WF)
    hybrid = network("widefield", config, 0.5, SIGMA_WF, refine="mle")
    mle = Localizer(LocalizeSettings(method="mle", psf_sigma_px=SIGMA_WF), config)
    rng = np.random.default_rng(SEED0 + 2)
    print(f"   {'spots/um2':>9} {'spots/frame':>11} {'NN dist px (median)':>19} {'method':>8} {'recall':>7} {'precision':>9} {'Jaccard':>8}")
    for density in (0.25, 0.5, 1.0, 2.0):
        n = int(round(density * 64 * 64 / 100.0))
        counts = {"network": [0, 0, 0], "hybrid": [0, 0, 0], "MLE": [0, 0, 0]}
        nn = []
        for _ in range(n_frames):
            tx, ty = random_positions(rng, n, (64, 64), 1.0, 0.0)
            d = np.hypot(tx[:, None] - tx[None], ty[:, None] - ty[None]) + np.eye(n) * 1e9
            nn.append(np.median(d.min(axis=1)))
            ph = rng.uniform(500, 2000, n)
            img = to_adu(rng, render_spots((64, 64), tx, ty, ph, SIGMA_WF, BG_WF))
            for name, loc in (("network", net.localize(img)), ("hybrid", hybrid.localize(img)), ("MLE", mle.localize(img))):
                i, _ = match(loc.x, loc.y, tx, ty, 1.0)
                counts[name][0] += len(i)
                counts[name][1] += len(loc) - len(i)
                counts[name][2] += n - len(i)
        for name, (tp, fp, fn) in counts.items():
            print(f"   {density:9g} {n:11d} {np.median(nn):19.2f} {name:>8} {tp / (tp + fn):7.3f} {tp / max(tp + fp, 1):9.3f} "
                  f"{tp / (tp + fp + fn):8.3f}")


def speed(rounds: int) -> None:
    print("\n(c) speed on one CPU core (ONNX Runtime intra-op threads 1, OMP_NUM_THREADS=1); widefield model; "
          "frames with 1 spot per 100 px^2, N 1000, b 100")
    config = ScopestreamConfig()
    net = network("widefield", config, 0.5, SIGMA_WF)
    hybrid = network("widefield", config, 0.5, SIGMA_WF, refine="mle")
    mle = Localizer(LocalizeSettings(method="mle", psf_sigma_px=SIGMA_WF), config)
    rng = np.random.default_rng(SEED0 + 3)
    from scopestream.models.localize._inputs import normalize_photons

    print(f"   {'frame':>9} {'what':>34} {'frames/s (wall)':>15} {'frames/s (CPU)':>14} {'Mpx/s (CPU)':>11}")
    for side in (64, 512):
        n = side * side // 100
        x, y = random_positions(rng, n, (side, side), 3.0, 0.0)
        img = to_adu(rng, render_spots((side, side), x, y, 1000.0, SIGMA_WF, BG_WF))
        norm = normalize_photons((img.astype(np.float32) - 100) * 0.5)[None]
        net.warm_up(img.shape)
        reps = max(3, rounds * (4096 // side))
        for what, fn, arg in (("network (whole method)", net.localize, img),
                              ("hybrid (network + MLE refinement)", hybrid.localize, img),
                              ("network (ONNX Runtime call only)", net.run_network, norm),
                              ("MLE (whole method)", mle.localize, img)):
            fn(arg)
            w, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fn(arg)
            w, c = time.perf_counter() - w, time.process_time() - c
            print(f"   {side:4d}x{side:<4d} {what:>34} {reps / w:15.1f} {reps / c:14.1f} {reps * side * side / c / 1e6:11.2f}")
        # Behind: the stage's look-ahead runs the network once on 8 waiting frames, then decodes each.
        batch, norms = [img] * 8, np.repeat(norm, 8, axis=0)

        def look_ahead_8(batch: list[np.ndarray] = batch) -> None:
            for im, out in zip(batch, net.run_batch(batch), strict=True):
                net.localize(im, 0, out)

        def onnx_8(norms: np.ndarray = norms) -> None:
            net.run_network(norms)

        for what, call in (("network, look-ahead batch of 8", look_ahead_8), ("ONNX call only, batch of 8", onnx_8)):
            per = 8
            call()
            w, c = time.perf_counter(), time.process_time()
            for _ in range(max(1, reps // per)):
                call()
            n_frames = max(1, reps // per) * per
            w, c = time.perf_counter() - w, time.process_time() - c
            print(f"   {side:4d}x{side:<4d} {what:>34} {n_frames / w:15.1f} {n_frames / c:14.1f} {n_frames * side * side / c / 1e6:11.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer frames (a smoke run)")
    p.add_argument("--scanning-only", action="store_true", help="part (a) only")
    p.add_argument("--scanning-images", type=int, default=None, help="images per D in part (a) (default 400; 60 with --quick)")
    p.add_argument("--first-image", type=int, default=0,
                   help="index of the first scanning image (seed SEED0 + 10**6 * D index + index); 400 onwards are "
                   "fresh frames the default run never used")
    args = p.parse_args()
    q = args.quick
    t0, c0 = time.perf_counter(), time.process_time()
    scanning_protocol(args.scanning_images or (60 if q else 400), args.first_image)
    if args.scanning_only:
        print(f"\nbench_localize_network: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU")
        return
    widefield_precision(8 if q else 60)
    widefield_density(4 if q else 25)
    speed(2 if q else 10)
    print(f"\nbench_localize_network: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU")


if __name__ == "__main__":
    main()
