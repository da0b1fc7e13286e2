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


def test_short_tracks_have_undefined_d() -> None:
    t = {"frame": np.array([0, 1, 0]), "particle": np.array([7, 7, 8]), "x": np.array([1.0, 2.0, 5.0]), "y": np.zeros(3)}
    table = estimate_diffusion(t, CFG)
    assert table.D_um2_per_s.isna().all() and table.D_err_um2_per_s.isna().all()
    assert sorted(table.particle.tolist()) == [7, 8]


def test_gaps_do_not_bias_the_estimate() -> None:
    pos = _simulate(6, 800, 41, 1.0, 0.2)
    t = as_table(pos)
    keep = np.random.default_rng(0).random(t["x"].size) > 0.15
    table = estimate_diffusion({k: v[keep] for k, v in t.items()}, CFG)
    sd = float(np.sqrt(cve_variance(1.0, 0.04, R, 30)))
    assert table.D_um2_per_s.mean() == pytest.approx(1.0, abs=4 * sd / np.sqrt(800))


def test_stage_rolling_ended_and_teardown() -> None:
    plugin = installed_stage_plugins()["diffusion"]
    assert plugin.consumes == (TrackUpdate,) and plugin.tables == {"diffusion": "diffusion.csv"}
    cfg = build_config({**CFG.model_dump(include={"acquisition", "optics"}), "stages": ["localize", "track", "diffusion"],
                        "diffusion": {"window_frames": 10, "step_frames": 5}})
    stage = DiffusionStage(cfg, cfg.stage_settings("diffusion"))  # type: ignore[arg-type]
    pos = _simulate(7, 2, 30, 1.0, 0.1)
    img = np.zeros((2, 2), np.uint16)
    bodies = []
    for f in range(30):
        ended = [1] if f == 20 else []
        ids = np.array([0, 1]) if f <= 20 else np.array([0])
        upd = TrackUpdate(f, ids, pos[ids, f, 0], pos[ids, f, 1], [], ended)
        bodies += [e.body for e in stage.process(Frame(seq=f, image=img, t_acquired=0.0), Products(upd))]
    rolling = [b for b in bodies if b.window == "rolling"]  # type: ignore[attr-defined]
    assert rolling and all(b.frame_end - b.frame_start == 9 for b in rolling)  # type: ignore[attr-defined]
    ended_bodies = [b for b in bodies if b.window == "track"]  # type: ignore[attr-defined]
    assert [b.particle for b in ended_bodies] == [1]  # type: ignore[attr-defined]
    final = [e.body for e in stage.teardown()]
    assert [b.particle for b in final] == [0] and final[0].n_steps == 29  # type: ignore[attr-defined]
    assert final[0].D_um2_per_s is not None  # type: ignore[attr-defined]
