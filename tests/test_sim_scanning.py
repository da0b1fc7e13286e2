"""Scanning two-photon camera: scan timing, motion smear, and the image of a still emitter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from scopestream.daemon._config import build_config
from scopestream.sim_camera import make_simulator

COUNTING = {"offset_adu": 100, "gain_e_per_adu": 1.0, "read_noise_e": 0.0}


def _scanner(size: int = 32, n_particles: int = 1, seed: int = 0, **simulation: Any):
    config = build_config(
        {
            "camera": COUNTING,
            "simulation": {"n_particles": n_particles, "margin_nm": 0, "particle_kind": "point",
                           "states": ["Stat"], "background_photons_per_px": 0.0, **simulation},
        }
    )
    return make_simulator(config, "scanning", size_px=size, seed=seed)


def _place(sim, k: int, x_px: float, y_px: float) -> None:
    a = sim.physics.pixel_size_nm
    sim.scene.pos_nm[k, :2] = [(x_px + 0.5) * a, (y_px + 0.5) * a]


def test_row_times_follow_dwell_and_retrace() -> None:
    sim = _scanner(size=48, n_particles=40, scan_dwell_us=3.0, scan_retrace_ms=0.5)
    line_ms = 48 * 3e-3 + 0.5
    assert sim.line_period_ms == pytest.approx(line_ms)
    assert sim.exposure_ms == pytest.approx(48 * line_ms)
    _, first = sim.next_frame()
    start = sim.next_frame_start_ms
    assert start == pytest.approx(48 * line_ms)  # frames follow back to back
    assert np.allclose(np.diff(sim.row_start_ms(start)), line_ms)
    _, truth = sim.next_frame()
    # Away from the edges the photon weights are symmetric about the emitter, so the weighted
    # time is when the beam passed over its centre: row y, column x, middle of the dwell.
    inner = (truth["x"] > 10) & (truth["x"] < 37) & (truth["y"] > 10) & (truth["y"] < 37)
    assert inner.sum() > 5
    expected = start + truth["y"] * line_ms + (truth["x"] + 0.5) * 3e-3
    assert np.allclose(truth["t_ms"][inner], expected[inner], atol=1e-6)


def test_stationary_emitter_looks_like_the_excitation_psf() -> None:
    sim = _scanner(size=32, photons_per_frame=5000.0, scan_sigma_xy_nm=200.0)
    _place(sim, 0, 15.3, 16.6)
    counts = np.zeros((32, 32))
    frames = 20
    for _ in range(frames):
        image, truth = sim.next_frame()
        counts += image - 100.0
    assert truth["x"][0] == pytest.approx(15.3, abs=1e-9)
    n = counts.sum()
    # Peak * sum of the sampled Gaussian = photons (sum equals 2 pi sigma^2 to 1e-30 at 2 px);
    # Poisson total, SD sqrt(frames * photons). 5 SD.
    assert abs(n - frames * 5000) < 5 * math.sqrt(frames * 5000)
    assert truth["photons"][0] == pytest.approx(5000.0, rel=1e-5)  # PSF cut beyond ~5 sigma
    rows, cols = np.indices(counts.shape)
    mx, my = (counts * cols).sum() / n, (counts * rows).sum() / n
    # Point sampling at pixel centres (no pixel integration): variance sigma^2 = 4 px^2.
    var = 2.0**2
    assert abs(mx - 15.3) < 5 * math.sqrt(var / n)
    assert abs(my - 16.6) < 5 * math.sqrt(var / n)
    for v in ((counts * (cols - mx) ** 2).sum() / n, (counts * (rows - my) ** 2).sum() / n):
        assert abs(v / var - 1) < 5 * math.sqrt(2 / n)


def test_out_of_focus_emitter_is_dimmer() -> None:
    sim = _scanner(size=24, photons_per_frame=5000.0, scan_sigma_z_nm=700.0)
    _place(sim, 0, 12.0, 12.0)
    sim.scene.pos_nm[0, 2] = 700.0  # one sigma_z out of focus
    _, truth = sim.next_frame()
    # exp(-dz^2 / 2 sigma_z^2); the excitation is cut beyond ~5 sigma_xy (< 1e-5 of the photons).
    assert truth["photons"][0] == pytest.approx(5000.0 * math.exp(-0.5), rel=1e-5)


def test_fast_emitter_is_sheared_by_the_scan() -> None:
    # 20 um/s = 20 nm/ms along +x; one line lasts 64 * 2 us + 1.1 ms = 1.228 ms, so from one row
    # to the next the emitter moves 24.6 nm = 0.246 px: the spot's rows are shifted progressively.
    v_nm_per_ms = 20.0
    sim = _scanner(size=64, photons_per_frame=2e6, states=["Flow"], flow_speed_um_per_s=v_nm_per_ms,
                   flow_persistence_length_um=1e6, z_diffusion=False)
    _place(sim, 0, 20.0, 30.0)
    sim.scene.heading_rad[0] = 0.0
    image, truth = sim.next_frame()
    counts = image - 100.0
    rows = np.arange(26, 35)  # +-2 sigma around the emitter's row
    cols = np.arange(64)
    row_sum = counts[rows].sum(axis=1)
    centroid = (counts[rows] * cols).sum(axis=1) / row_sum
    slope = np.polyfit(rows, centroid, 1, w=np.sqrt(row_sum))[0]
    expected = v_nm_per_ms * sim.line_period_ms / 100.0
    # Per-row centroid SE sigma / sqrt(counts) <= 2 / sqrt(5e4) = 0.009 px; the fitted slope
    # over 9 rows has SE <= 0.009 / sqrt(sum (r - mean)^2 = 60) = 0.0012 px/row. 5 SE.
    assert abs(slope - expected) < 5 * 0.0012
    # The truth (photon-weighted trajectory centroid) is where the spot's centroid is.
    n = counts.sum()
    all_rows, all_cols = np.indices(counts.shape)
    assert abs((counts * all_cols).sum() / n - truth["x"][0]) < 0.05
    assert abs((counts * all_rows).sum() / n - truth["y"][0]) < 0.05


def test_still_emitter_is_not_sheared() -> None:
    sim = _scanner(size=64, photons_per_frame=2e6)
    _place(sim, 0, 20.0, 30.0)
    counts = sim.next_frame()[0] - 100.0
    rows = np.arange(26, 35)
    row_sum = counts[rows].sum(axis=1)
    centroid = (counts[rows] * np.arange(64)).sum(axis=1) / row_sum
    slope = np.polyfit(rows, centroid, 1, w=np.sqrt(row_sum))[0]
    assert abs(slope) < 5 * 0.0012  # same derivation as above


def test_emitters_diffuse_in_3d_during_the_scan() -> None:
    sim = _scanner(size=32, n_particles=300, states=["RanW"], D_um2_per_s=1.0, margin_nm=0)
    assert sim.scene._z_diffusion  # 3-D by default for the scanning camera
    z0 = sim.scene.pos_nm[:, 2].copy()
    sim.next_frame()
    elapsed = sim.scene.time_ms
    dz = sim.scene.pos_nm[:, 2] - z0
    # Var(dz) = 2 D t (1 um^2/s = 1000 nm^2/ms); relative SE sqrt(2/300) = 8 %. 5 SE.
    assert abs(np.mean(dz**2) / (2 * 1000.0 * elapsed) - 1) < 5 * math.sqrt(2 / 300)
