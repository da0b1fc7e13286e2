"""Diffusion estimates against simulated blurred Brownian tracks with localization noise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from scopestream.daemon import Frame, installed_stage_plugins
from scopestream.daemon._config import build_config
from scopestream.daemon._products import Products
from scopestream.plugins.diffusion import DiffusionStage, cve_variance, estimate_diffusion
from scopestream.plugins.track import TrackUpdate

sys.path.insert(0, str(Path(__file__).parent))
from brownian_tracks import as_table, blurred_brownian  # noqa: E402

# 100 nm pixels, 10 ms frames: 1 px^2/frame = 1 um^2/s.
CFG = build_config({"acquisition": {"exposure_ms": 10, "frame_interval_ms": 10}, "optics": {"pixel_size_nm": 100}})
R = 10 / (6 * 10)


def _simulate(seed: int, n_tracks: int, n_frames: int, d: float, sigma: float) -> np.ndarray:
    return blurred_brownian(
        np.random.default_rng(seed), n_tracks=n_tracks, n_frames=n_frames, d_px2_per_frame=d,
        exposure_fraction=1.0, sigma_loc_px=sigma,
    )


@pytest.mark.parametrize(("d", "sigma"), [(1.0, 0.3), (0.2, 0.45)])  # sigma^2/(D dt) = 0.09, ~1
def test_cve_is_unbiased_with_the_theoretical_spread(d: float, sigma: float) -> None:
    n_tracks, n_frames = 1500, 41
    table = estimate_diffusion(as_table(_simulate(3, n_tracks, n_frames, d, sigma)), CFG)
    est = table.D_um2_per_s.to_numpy()
    sd_theory = float(np.sqrt(cve_variance(d, sigma**2, R, n_frames - 1)))
    # Mean of n estimates: SE = sd/sqrt(n); allow 4 SE.
    assert est.mean() == pytest.approx(d, abs=4 * sd_theory / np.sqrt(n_tracks))
    # Sample SD of n values has relative SE ~ sqrt((1 + kurtosis/2)/(2n)); allow 4 SE with
    # excess kurtosis ~1 for these small-N estimators (16 % at n = 1500 is generous; measured ~1 %).
    assert est.std() == pytest.approx(sd_theory, rel=4 * np.sqrt(1.5 / (2 * n_tracks)))
    # The reported error matches the spread on average.
    assert np.nanmean(table.D_err_um2_per_s) == pytest.approx(sd_theory, rel=0.15)


def test_localization_error_is_recovered() -> None:
    # Long tracks with sigma^2/(D dt) = 0.45: the sigma^2 estimate is almost always positive,
    # so the mean of the reported sigma_loc^2 is unbiased; SE ~ 2 % here, allow 8 %.
    table = estimate_diffusion(as_table(_simulate(8, 300, 401, 0.2, 0.3)), CFG)
    s2 = table.sigma_loc_nm.to_numpy() ** 2
    assert np.isfinite(s2).mean() > 0.97
    assert np.nanmean(s2) == pytest.approx(30.0**2, rel=0.08)


def test_naive_msd_is_biased_and_cve_is_not() -> None:
    pos = _simulate(4, 800, 41, 1.0, 0.0)
    naive = np.mean(np.sum(np.diff(pos, axis=1) ** 2, axis=2)) / 4.0
    assert naive == pytest.approx(2 / 3, rel=0.03)  # blur alone: MSD(1) = 4D dt (1 - 2R)
    cve = estimate_diffusion(as_table(pos), CFG).D_um2_per_s.mean()
    assert cve == pytest.approx(1.0, rel=0.03)


def test_msd_method_is_unbiased() -> None:
    n_tracks, n_frames = 1000, 61
    table = estimate_diffusion(as_table(_simulate(5, n_tracks, n_frames, 0.5, 0.4)), CFG, method="msd")
    sd_theory = float(np.sqrt(cve_variance(0.5, 0.16, R, n_frames - 1)))
    assert table.D_um2_per_s.mean() == pytest.approx(0.5, abs=5 * 1.3 * sd_theory / np.sqrt(n_tracks))


def test_short_tracks_have_no_row() -> None:
    # One step (particle 7) or a single point (8): no estimate, so no row (never a made-up D).
    t = {"frame": np.array([0, 1, 0]), "particle": np.array([7, 7, 8]), "x": np.array([1.0, 2.0, 5.0]), "y": np.zeros(3)}
    for method in ("cve", "mle", "auto", "msd"):
        table = estimate_diffusion(t, CFG, method=method)
        assert len(table) == 0, method


def test_gaps_do_not_bias_the_estimate() -> None:
    pos = _simulate(6, 800, 41, 1.0, 0.2)
    t = as_table(pos)
    keep = np.random.default_rng(0).random(t["x"].size) > 0.15
    table = estimate_diffusion({k: v[keep] for k, v in t.items()}, CFG)
    sd = float(np.sqrt(cve_variance(1.0, 0.04, R, 30)))
    assert table.D_um2_per_s.mean() == pytest.approx(1.0, abs=4 * sd / np.sqrt(800))


def test_stage_publishes_one_message_per_frame_with_arrays() -> None:
    plugin = installed_stage_plugins()["diffusion"]
    assert plugin.consumes == (TrackUpdate,)
    assert plugin.tables == {"diffusion": "diffusion.csv", "diffusion_segments": "segments.csv"}
    cfg = build_config({**CFG.model_dump(include={"acquisition", "optics"}), "stages": ["localize", "track", "diffusion"],
                        "diffusion": {"window_frames": 10, "step_frames": 5, "method": "cve"}})
    stage = DiffusionStage(cfg, cfg.stage_settings("diffusion"))  # type: ignore[arg-type]
    pos = _simulate(7, 3, 30, 1.0, 0.1)
    img = np.zeros((2, 2), np.uint16)
    emissions = []
    for f in range(30):
        ended = [1] if f == 20 else []
        ids = np.array([0, 1, 2]) if f <= 20 else np.array([0, 2])
        # Particle 2 has a NaN position on every other frame from 10 on (no detection there).
        x = pos[ids, f, 0].copy()
        if f >= 10 and f % 2:
            x[ids == 2] = np.nan
        upd = TrackUpdate(f, ids, x, pos[ids, f, 1], [], ended)
        out = stage.process(Frame(seq=f, image=img, t_acquired=0.0), Products(upd))
        diff = [e for e in out if e.topic == "diffusion"]
        assert len(diff) <= 1  # at most one message per frame
        emissions += diff
    for e in emissions:
        n = e.body.count  # type: ignore[attr-defined]
        assert n > 0 and all(len(a) == n for a in e.arrays.values())
        assert np.isfinite(e.arrays["D_um2_per_s"]).all()  # only rows with an estimate
    labels = emissions[0].body.labels  # type: ignore[attr-defined]
    window = [np.asarray(labels["window"])[e.arrays["window"]] for e in emissions]
    rolling = [(e, w == "rolling") for e, w in zip(emissions, window, strict=True)]
    assert all((e.frame_seq + 1) % 5 == 0 for e, r in rolling if r.any())  # common cadence
    ended = [e for e, w in zip(emissions, window, strict=True) if (w == "track").any()]
    assert [int(e.arrays["particle"][0]) for e in ended] == [1] and ended[0].frame_seq == 20
    final = stage.teardown()
    body = [e for e in final if e.topic == "diffusion"][0]
    assert body.arrays["particle"].tolist() == [0, 2] and body.arrays["n_steps"].tolist()[0] == 29
    assert (np.asarray(labels["method"])[body.arrays["method"]] == "cve").all()


def test_segments_batched_over_frames_equal_those_estimated_on_their_frame() -> None:
    # Tracks whose D jumps 20x at frame 60: change points fire. Estimated every 7 frames as one
    # batch (each frame's own group), the change and segment rows equal those estimated on the
    # frame of the change (to rounding), in the same order; they are published on the batch's frame.
    from scopestream.plugins.diffusion import DiffusionEstimator, DiffusionSettings

    n_tracks, n_frames = 12, 140
    slow = _simulate(12, n_tracks, n_frames, 0.02, 0.03)
    fast = _simulate(13, n_tracks, n_frames, 0.4, 0.03)
    pos = np.where(np.arange(n_frames)[None, :, None] < 60, slow, fast - fast[:, 60:61] + slow[:, 60:61])
    sigma = np.full(n_tracks, 0.03)
    out = {}
    for batch in (1, 7):
        est = DiffusionEstimator(DiffusionSettings(segment_batch_frames=batch), CFG)
        rows: dict[str, list] = {"change": [], "segment": [], "frames": []}
        for f in range(n_frames):
            ids = np.arange(n_tracks) if f < 120 else np.arange(n_tracks - 3)
            ended = [n_tracks - 3, n_tracks - 2, n_tracks - 1] if f == 120 else []
            x = pos[ids, f, 0]
            _, ch = est.update(TrackUpdate(f, ids, x, pos[ids, f, 1], [], ended, uncertainty_px=sigma[ids]))
            if ch is not None:
                rows["frames"].append(f)
                if ch.changes:
                    rows["change"].append(ch.changes)
                if ch.segments:
                    rows["segment"].append(ch.segments)
        _, ch = est.finish()
        assert ch is not None and ch.segments
        rows["segment"].append(ch.segments)
        out[batch] = rows
    assert all((f + 1) % 7 == 0 for f in out[7]["frames"])
    for kind in ("change", "segment"):
        a = {k: np.concatenate([p[k] for p in out[1][kind]]) for k in out[1][kind][0]}
        b = {k: np.concatenate([p[k] for p in out[7][kind]]) for k in out[7][kind][0]}
        assert len(a["particle"]) > 0 and a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k].astype(float), a[k].astype(float), rtol=1e-9, equal_nan=True)
    assert len(np.concatenate([p["particle"] for p in out[1]["change"]])) >= n_tracks // 2  # the jump is found
