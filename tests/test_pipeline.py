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


def test_analyze_a_simulated_movie_against_its_truth(tmp_path: Path) -> None:
    settings = {"simulation": SCENE, "stages": ["frame_stats", "localize", "track", "diffusion"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(tmp_path / "c.yaml")
    movie, truth = simulate_stack(config, "widefield", n_frames=40, size_px=64, n_particles=6, seed=2)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "m.tif"),
                          "--out", str(tmp_path / "res"), "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    locs = read_csv(tmp_path / "res" / "localizations.csv")
    lx, ly, lf = locs["x"].astype(float), locs["y"].astype(float), locs["frame"].astype(int)
    # Score against truth particles well inside the frame (a spot cut by the border is harder).
    inside = truth["visible"] & (truth["x"] > 3) & (truth["x"] < 60) & (truth["y"] > 3) & (truth["y"] < 60)
    errors, found, total = [], 0, 0
    for f in range(40):
        t = truth[inside & (truth["frame"] == f)]
        sel = lf == f
        total += len(t)
        if not len(t) or not sel.any():
            continue
        d, _ = cKDTree(np.c_[lx[sel], ly[sel]]).query(np.c_[t["x"], t["y"]], distance_upper_bound=1.0)
        ok = np.isfinite(d)
        found += int(ok.sum())
        errors.extend(d[ok])
    assert total > 100
    assert found / total >= 0.95, f"recall {found}/{total}"
    # 3000 photons, background 10/px, PSF sigma ~0.77 px: CRLB ~0.02 px; blur during the 10 ms
    # exposure (sqrt(2 D t) ~ 0.2 px) widens the spot a little. 0.08 px is 4x that bound.
    rmse = float(np.sqrt(np.mean(np.square(errors))))
    assert rmse < 0.08, f"RMSE {rmse:.3f} px"
    tracks = read_csv(tmp_path / "res" / "tracks.csv")
    assert set(tracks) >= {"frame", "particle", "x", "y"}
    # ~6 particles visible at a time, a few entering/leaving: far fewer ids than detections
    assert len(set(tracks["particle"])) <= 3 * len(set(truth["particle"][truth["visible"]]))
    diff = read_csv(tmp_path / "res" / "diffusion.csv")
    assert {"particle", "frame_start", "frame_end", "D_um2_per_s", "D_err_um2_per_s", "sigma_loc_nm", "n_steps"} <= set(diff)


def test_default_daemon_on_the_simulated_camera_publishes_every_stage(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    config = make_config(
        "source.mm_config=simulated-widefield", "source.frames_limit=90", "events.wait_for_subscriber_s=20",
        "simulation.frame_height_px=64", "simulation.frame_width_px=64", "simulation.n_particles=5",
        "simulation.particle_kind=point", "simulation.states=[Circ]", "simulation.photons_per_frame=3000",
        "musical.window_frames=30", "musical.slide_frames=30", "musical.region_px=25", "musical.subpixels=4",
        "musical.workers=1", "musical.executor=thread", "musical.skip_when_busy=false",
    )
    assert config.stages == ["frame_stats", "localize", "track", "diffusion", "musical", "motion"]
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
    for topic in ("run_start", "frame_stats", "localizations", "track", "diffusion", "musical", "motion_state"):
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
