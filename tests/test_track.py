"""Tracking against ground-truth scenes (Brownian and directed motion, missed detections)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from scopestream.daemon import Frame, installed_stage_plugins
from scopestream.daemon._config import build_config
from scopestream.daemon._products import Products
from scopestream.plugins.localize import Localizations
from scopestream.plugins.track import Tracker, TrackSettings, TrackStage, TrackUpdate, link

sys.path.insert(0, str(Path(__file__).parent))
from track_scenes import brownian_scene, mota  # noqa: E402


def test_random_walk_scene_is_linked_almost_perfectly() -> None:
    rng = np.random.default_rng(0)
    truth, det = brownian_scene(rng, n_particles=300, n_frames=40, size_px=256, step_sd_px=1.0, p_miss=0.02)
    result = link(det, max_displacement_px=5.0, max_gap_frames=2)
    # 2 % of the detections are missing: MOTA cannot exceed 0.98; ID switches and FP must be rare.
    assert mota(truth, result) >= 0.95
    assert (result.particle >= 0).all()


def test_directed_motion_needs_and_gets_the_velocity_model() -> None:
    rng = np.random.default_rng(1)
    truth, det = brownian_scene(rng, n_particles=150, n_frames=40, size_px=256, step_sd_px=0.3, drift_px=4.0)
    cv = link(det, motion_model="constant_velocity", max_displacement_px=6.0, acceleration_px_per_frame2=0.3)
    assert mota(truth, cv) >= 0.95


def test_gap_closing_keeps_identity_across_missed_frames() -> None:
    tracker = Tracker(TrackSettings(max_displacement_px=3.0, max_gap_frames=2))
    xs = np.array([10.0, 50.0])
    ids = []
    for f in range(8):
        if f in (3, 4):  # particle 0 missing for two frames
            upd = tracker.update(f, xs[1:] + 0.1 * f, np.array([20.0]))
        else:
            upd = tracker.update(f, xs + 0.1 * f, np.array([20.0, 20.0]))
        ids.append(upd)
    assert ids[0].started == [0, 1]
    assert all(u.started == [] for u in ids[1:])
    assert ids[-1].particle.tolist() == [0, 1]
    # After three missed frames the track ends.
    for f in range(8, 11):
        upd = tracker.update(f, np.array([]), np.array([]))
    assert upd.ended == [0, 1]


def test_crossing_particles_resolved_by_assignment() -> None:
    # Two particles approach within 1.2 px; greedy nearest-neighbour would swap them at some
    # frame, the optimal assignment with the Kalman prediction must not.
    tracker = Tracker(TrackSettings(motion_model="constant_velocity", max_displacement_px=3.0))
    for f in range(12):
        x = np.array([10.0 + f, 22.0 - f])
        y = np.array([10.0, 10.6])
        upd = tracker.update(f, x, y)
    order = np.argsort(upd.x)
    assert upd.particle[order].tolist() == [1, 0]  # particle 0 started left, now right


def test_high_density_stays_bounded_and_correct() -> None:
    rng = np.random.default_rng(2)
    truth, det = brownian_scene(rng, n_particles=1000, n_frames=15, size_px=256, step_sd_px=0.7)
    result = link(det, max_displacement_px=4.0, max_cluster_size=50)
    assert mota(truth, result) >= 0.9


def test_empty_and_nan_detections() -> None:
    tracker = Tracker(TrackSettings())
    upd = tracker.update(0, np.array([]), np.array([]))
    assert len(upd) == 0 and upd.started == []
    upd = tracker.update(1, np.array([1.0, np.nan]), np.array([2.0, 3.0]))
    assert upd.particle.tolist() == [0] and upd.detection_index.tolist() == [0]
    with pytest.raises(ValueError, match="not after"):
        tracker.update(1, np.array([1.0]), np.array([2.0]))


def test_settings_reject_impossible_values() -> None:
    with pytest.raises(ValueError, match="max_displacement_px"):
        link({"frame": np.zeros(1), "x": np.zeros(1), "y": np.zeros(1)}, max_displacement_px=-1)
    with pytest.raises(ValueError, match="gate_probability"):
        TrackSettings(gate_probability=1.5)


def test_stage_events_and_teardown() -> None:
    plugin = installed_stage_plugins()["track"]
    assert plugin.consumes == (Localizations,) and plugin.produces == (TrackUpdate,) and plugin.tables == {"track": "tracks.csv"}
    cfg = build_config({"stages": ["localize", "track"]})
    stage = TrackStage(cfg, cfg.stage_settings("track"))  # type: ignore[arg-type]
    img = np.zeros((8, 8), np.uint16)
    for f in range(3):
        e = np.full(2, 0.05)
        locs = Localizations(f, np.array([5.0, 30.0]) + f * 0.2, np.array([5.0, 9.0]), e, e, e, e)
        products = Products(locs)
        (em,) = stage.process(Frame(seq=f, image=img, t_acquired=0.0), products)
        assert isinstance(products.get(TrackUpdate), TrackUpdate)
    assert em.body.count == 2 and em.arrays["particle"].tolist() == [0, 1]  # type: ignore[attr-defined]
    (final,) = stage.teardown()
    assert final.body.ended == [0, 1]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="'track' needs Localizations"):
        stage.process(Frame(seq=9, image=img, t_acquired=0.0), Products())


def test_dense_and_sparse_solvers_give_the_same_links(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small augmented problems go to a dense solver, large ones to the sparse one; both solve
    # the same problem, whose optimum is unique for continuous random costs.
    import scopestream.plugins.track as track_module

    rng = np.random.default_rng(31)
    tracker = Tracker(TrackSettings())
    for _ in range(40):
        n_tr, n_det = rng.integers(1, 30, 2)
        pairs = rng.random((n_tr, n_det)) < 0.15
        ti, dj = np.nonzero(pairs)
        if ti.size == 0:
            continue
        cost = rng.uniform(0.0, tracker._gate_d2, ti.size)  # gated pairs: d^2 inside the gate
        dense = tracker._sparse_optimal(ti, dj, cost)
        monkeypatch.setattr(track_module, "_DENSE_NODES", 0)
        sparse = tracker._sparse_optimal(ti, dj, cost)
        monkeypatch.undo()
        assert set(zip(*dense, strict=True)) == set(zip(*sparse, strict=True))
        assert len(dense[0]) > 0
