"""The whole pipeline on the simulated cameras: analyze against exact truth, and a live run of
the default daemon (every stage) through the simulated Micro-Manager camera."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import yaml
from scipy.spatial import cKDTree

from scopestream.daemon._config import ScopestreamConfig, load_config
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import Subscriber
from scopestream.sim_camera import simulate_stack

SCENE = {
    "particle_kind": "point",
    "states": ["RanW"],
    "D_um2_per_s": 0.02,
    "photons_per_frame": 3000,
    "background_photons_per_px": 10,
}


def read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]} if rows else {}


N_FRAMES = 100
SIZE_PX = 64


def _matches(truth: np.ndarray, table: dict[str, np.ndarray], gate_px: float) -> list[tuple[int, int, float]]:
    """(true particle, table row, distance) of each truth row's nearest table row in its frame
    within ``gate_px`` (each table row used once per frame, nearest first)."""
    fx, fy, ff = table["x"].astype(float), table["y"].astype(float), table["frame"].astype(int)
    out = []
    for f in np.unique(truth["frame"]):
        t = truth[truth["frame"] == f]
        rows = np.flatnonzero(ff == f)
        if not len(t) or not len(rows):
            continue
        d, j = cKDTree(np.c_[fx[rows], fy[rows]]).query(np.c_[t["x"], t["y"]], distance_upper_bound=gate_px)
        used: set[int] = set()
        for k in np.argsort(d):
            if np.isfinite(d[k]) and j[k] not in used:
                used.add(int(j[k]))
                out.append((int(t["particle"][k]), int(rows[j[k]]), float(d[k])))
    return out


def test_analyze_a_simulated_movie_against_its_truth(tmp_path: Path) -> None:
    settings = {"simulation": SCENE, "stages": ["frame_stats", "localize", "track", "diffusion"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(tmp_path / "c.yaml")
    movie, truth = simulate_stack(config, "widefield", n_frames=N_FRAMES, size_px=SIZE_PX, n_particles=10, seed=3)
    # The scene of this seed keeps every two particles >= 5 px apart in every frame (checked
    # here), so each spot is resolvable (localize.min_separation_px = 3) and the detection
    # and linking bounds below hold without crossing events.
    for f in range(N_FRAMES):
        t = truth[truth["frame"] == f]
        nearest, _ = cKDTree(np.c_[t["x"], t["y"]]).query(np.c_[t["x"], t["y"]], k=2)
        assert nearest[:, 1].min() >= 5.0, f"frame {f}: particles {nearest[:, 1].min():.1f} px apart"
    tifffile.imwrite(tmp_path / "m.tif", movie)
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "m.tif"),
                          "--out", str(tmp_path / "res"), "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    locs = read_csv(tmp_path / "res" / "localizations.csv")
    # Score against truth particles well inside the frame (a spot cut by the border is harder).
    edge = 3
    inside = truth["visible"] & (truth["x"] > edge) & (truth["x"] < SIZE_PX - 1 - edge) & (truth["y"] > edge) & (truth["y"] < SIZE_PX - 1 - edge)
    interior = truth[inside]
    matched = _matches(interior, locs, gate_px=1.0)
    errors = np.array([d for _, _, d in matched])
    assert len(interior) > 500
    assert len(matched) / len(interior) >= 0.95, f"recall {len(matched)}/{len(interior)}"
    # 3000 photons, background 10/px, PSF sigma ~0.77 px: CRLB ~0.02 px; blur during the 10 ms
    # exposure (sqrt(2 D t) ~ 0.2 px) widens the spot a little. 0.08 px is 4x that bound.
    rmse = float(np.sqrt(np.mean(np.square(errors))))
    assert rmse < 0.08, f"RMSE {rmse:.3f} px"

    # Tracks: one track per true particle. Recall >= 0.95 per detection and gap closing over
    # max_gap_frames = 2 missed frames break a track only after 3 misses in a row (p <= 0.05^3
    # per frame, < 0.2 expected breaks in these ~1000 particle-frames), and particles >= 5 px
    # apart moving ~0.2 px per frame never compete for the same detection. So every true particle seen in the interior maps to exactly one track id, with at
    # most one break (a particle that leaves the interior and comes back) allowed overall.
    tracks = read_csv(tmp_path / "res" / "tracks.csv")
    assert set(tracks) >= {"frame", "particle", "x", "y"}
    track_of = tracks["particle"].astype(int)
    ids_per_particle: dict[int, set[int]] = {}
    for particle, row, _ in _matches(interior, tracks, gate_px=1.0):
        ids_per_particle.setdefault(particle, set()).add(int(track_of[row]))
    true_particles = set(interior["particle"].tolist())
    assert set(ids_per_particle) == true_particles  # every true particle was tracked
    extra_ids = sum(len(ids) - 1 for ids in ids_per_particle.values())
    assert extra_ids <= 1, ids_per_particle
    owners: dict[int, set[int]] = {}
    for particle, ids in ids_per_particle.items():
        for i in ids:
            owners.setdefault(i, set()).add(particle)
    assert all(len(p) == 1 for p in owners.values()), "a track switched between true particles"

    # Diffusion: the D the simulation was given, from the whole-track estimates (CVE).
    d_true = float(np.unique(truth["D_um2_per_s"]).item())
    assert d_true == SCENE["D_um2_per_s"]
    diff = read_csv(tmp_path / "res" / "diffusion.csv")
    assert {"particle", "frame_start", "frame_end", "D_um2_per_s", "D_err_um2_per_s", "sigma_loc_nm", "n_steps",
            "method", "D_crlb_um2_per_s", "window"} <= set(diff)
    # Default method 'auto': the MLE with localize's uncertainties (a CVE row only where they fail
    # the calibration check); the whole-track estimates agree with the simulated D = 0.02 um^2/s
    # within 4 standard errors of their mean (sample SD over tracks / sqrt(tracks)).
    assert set(diff["method"]) <= {"mle", "cve"} and "mle" in set(diff["method"])
    whole = (diff["window"] == "track") & (diff["n_steps"].astype(int) >= 15)
    d = diff["D_um2_per_s"][whole].astype(float)
    assert d.size >= 4
    assert abs(d.mean() - 0.02) < 4 * d.std(ddof=1) / np.sqrt(d.size), (d.mean(), d)
    mle = whole & (diff["method"] == "mle")
    assert (diff["D_crlb_um2_per_s"][mle].astype(float) > 0).all()
    segments = read_csv(tmp_path / "res" / "segments.csv")
    assert {"particle", "frame_start", "frame_end", "D_um2_per_s", "D_err_um2_per_s", "alpha", "regime"} <= set(segments)
    # One regime throughout (RanW): most segment-frames are 'free'.
    span = segments["frame_end"].astype(int) - segments["frame_start"].astype(int)
    assert span[segments["regime"] == "free"].sum() >= 0.7 * span.sum()


def test_default_daemon_on_the_simulated_camera_publishes_every_stage(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    config = make_config(
        "source.mm_config=simulated-widefield", "source.frames_limit=90", "events.wait_for_subscriber_s=20",
        "simulation.frame_height_px=64", "simulation.frame_width_px=64", "simulation.n_particles=5",
        "simulation.particle_kind=point", "simulation.states=[Circ]", "simulation.photons_per_frame=3000",
        "musical.window_frames=30", "musical.slide_frames=30", "musical.region_px=25", "musical.subpixels=4",
        "offload.backend=threads", "musical.skip_when_busy=false",
    )
    assert config.stages == ["frame_stats", "preview", "localize", "track", "diffusion", "musical", "motion"]
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint)
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(20)
    starter.join(20)
    topics: dict[str, list] = {}
    while (m := sub.recv(30)) is not None:
        topics.setdefault(m.topic, []).append(m)
        if m.topic == "run_stop":
            break
    stop = topics["run_stop"][0].body
    assert stop["frames_received"] == 90 == stop["frames_processed"] + stop["frames_dropped"]
    assert stop["exit_status"] == "success"
    for topic in ("run_start", "frame_stats", "preview", "localizations", "track", "diffusion", "musical", "motion_state"):
        assert topic in topics, f"no {topic} event; got {sorted(topics)}"
    for topic, msgs in topics.items():
        assert [m.header.seq for m in msgs] == list(range(len(msgs))), topic
    locs = topics["localizations"]
    assert np.mean([len(m.arrays["x"]) for m in locs]) >= 3  # 5 particles, some near the border
    track_images = [m for m in topics["musical"] if m.body["particle"] is not None]
    assert track_images, "no per-track MUSICAL window"
    m = track_images[0]
    assert m.arrays["image"].shape == (25 * 4, 25 * 4)
    assert m.body["frame_end"] - m.body["frame_start"] + 1 == 30
    assert 0 <= m.body["x0_px"] <= 64 - 25 and 0 <= m.body["y0_px"] <= 64 - 25
    # The motion stage classified the same 30-frame track windows (its own cut until the musical
    # stage's TrackWindows product is wired in): one state per window, probabilities summing to 1.
    for s in topics["motion_state"]:
        assert s.body["frame_end"] - s.body["frame_start"] + 1 == 30
        assert abs(sum(s.body[f"p_{k}"] for k in ("Stat", "RanW", "RCir", "Circ", "Flow")) - 1) < 1e-5
    assert np.isfinite(m.arrays["image"]).all() and m.arrays["image"].max() > 0


def test_a_short_soak_keeps_memory_flat_and_counts_adding_up() -> None:
    """15 s of the embedded default on a small camera (benchmarks/soak.py, cheap version).

    Memory: after a 6 s warm-up the bounded buffers are full or nearly so: the camera's
    sequence buffer (4 MB here, filled within ~1.5 s at 32 KB per frame), the bus (64 frames of
    128 x 128 uint16 = 2 MB) and MUSICAL's per-track windows (200 frames of a region per open
    track, ~0.5 MB each, full after the first 200 frames). What may still grow is bounded by
    the bus and the sequence buffer plus 8 MB for the allocator's arenas: 14 MB (measured
    here: ~5 MB). A per-frame leak of even one frame's pixels (32 KB x ~800 frames in the
    last 9 s = 25 MB) exceeds it.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from soak import soak

    frame_mb = 128 * 128 * 2 / 2**20
    sequence_buffer_mb = 4
    small = ["simulation.frame_height_px=128", "simulation.frame_width_px=128", "simulation.n_particles=10",
             "offload.workers=1", f"source.sequence_buffer_mb={sequence_buffer_mb}"]
    r = soak(15.0, small, sample_s=0.5, warmup_s=6.0)
    assert r.exit_status == "success" and r.counts_add_up
    # The camera ran at (most of) its rate the whole time: frames are counted whatever the
    # stages manage (a loaded 2-core machine may make the simulated camera itself lag).
    assert r.frames_received >= 0.5 * r.camera_rate_hz * 15.0
    assert r.frames_processed > 0
    after = [s for s in r.samples if s[0] >= 6.0]
    growth_mb = max(s[1] for s in after) - after[0][1]
    bound_mb = 64 * frame_mb + sequence_buffer_mb + 8.0
    assert growth_mb <= bound_mb, f"RSS grew {growth_mb:.1f} MB after warm-up (bound {bound_mb:.1f} MB)"
