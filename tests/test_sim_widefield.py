"""Widefield camera: PSF width and photons, pixel-centre convention, blur, stage shift, seeds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from scopestream.daemon._config import build_config
from scopestream.sim_camera import make_simulator, simulate_stack

# A photon-counting camera (gain 1 e-/ADU, no read noise, no background): image - offset is
# exactly the Poisson photon count, so photon statistics can be checked directly.
COUNTING = {"offset_adu": 100, "gain_e_per_adu": 1.0, "read_noise_e": 0.0}


def _single_emitter(x_px: float, y_px: float, photons: float, size: int = 32, **simulation: Any):
    config = build_config(
        {
            "camera": COUNTING,
            "simulation": {"n_particles": 1, "margin_nm": 0, "particle_kind": "point", "states": ["Stat"],
                           "photons_per_frame": photons, "background_photons_per_px": 0.0, **simulation},
        }
    )
    sim = make_simulator(config, "widefield", size_px=size, seed=3)
    a = config.optics.pixel_size_nm
    sim.scene.pos_nm[0, :2] = [(x_px + 0.5) * a, (y_px + 0.5) * a]  # pixel-centre convention
    return sim


def test_stationary_emitter_has_its_psf_width_photons_and_position() -> None:
    x0, y0, photons, frames = 15.3, 12.8, 20000.0, 50
    sim = _single_emitter(x0, y0, photons)
    counts = np.zeros((32, 32))
    for _ in range(frames):
        image, truth = sim.next_frame()
        counts += image.astype(np.float64) - 100
        assert truth["x"][0] == pytest.approx(x0) and truth["y"][0] == pytest.approx(y0)
        assert truth["photons"][0] == pytest.approx(photons)
    n = counts.sum()
    # Total counts ~ Poisson(frames * photons): SD sqrt(1e6) = 1000. 5 SD.
    assert abs(n - frames * photons) < 5 * math.sqrt(frames * photons)
    rows, cols = np.indices(counts.shape)
    mx = (counts * cols).sum() / n
    my = (counts * rows).sum() / n
    # Photon positions binned to pixel centres: variance sigma^2 + 1/12 (Sheppard; exact to 1e-5
    # for sigma = 0.77 px). Centroid SE sqrt(var / n) = 0.0009 px; variance SE var sqrt(2/n). 5 SE.
    sigma_px = 0.21 * 510 / 1.4 / 100
    var = sigma_px**2 + 1 / 12
    assert abs(mx - x0) < 5 * math.sqrt(var / n)
    assert abs(my - y0) < 5 * math.sqrt(var / n)
    vx = (counts * (cols - mx) ** 2).sum() / n
    vy = (counts * (rows - my) ** 2).sum() / n
    assert abs(vx / var - 1) < 5 * math.sqrt(2 / n) * 1.5  # x1.5: kurtosis of the binned profile
    assert abs(vy / var - 1) < 5 * math.sqrt(2 / n) * 1.5
    # Brightest pixel where the truth says: (row 13, column 15) for (x, y) = (15.3, 12.8).
    assert np.unravel_index(np.argmax(counts), counts.shape) == (13, 15)


def test_emitter_on_a_pixel_centre_is_symmetric_about_it() -> None:
    sim = _single_emitter(10.0, 10.0, 50000.0, size=21)
    counts = sum(sim.next_frame()[0].astype(np.float64) - 100 for _ in range(20))
    left, right = counts[10, 9], counts[10, 11]
    up, down = counts[9, 10], counts[11, 10]
    # Poisson counts: the difference of two equal-mean counts has SD sqrt(2 mean). 5 SD.
    assert abs(left - right) < 5 * math.sqrt(left + right)
    assert abs(up - down) < 5 * math.sqrt(up + down)
    assert counts[10, 10] == counts.max()


def test_airy_psf_keeps_photons_and_centre() -> None:
    sim = _single_emitter(12.4, 11.7, 20000.0, size=25, psf_model="airy")
    counts = sum(sim.next_frame()[0].astype(np.float64) - 100 for _ in range(20))
    n = counts.sum()
    assert abs(n - 20 * 20000) < 5 * math.sqrt(20 * 20000)
    rows, cols = np.indices(counts.shape)
    # Truncated Airy variance is about (0.5 px)^2; centroid SE ~ 0.001 px; 0.02 px is generous.
    assert abs((counts * cols).sum() / n - 12.4) < 0.02
    assert abs((counts * rows).sum() / n - 11.7) < 0.02
    # The Airy core is narrower than the 0.21 lambda/NA Gaussian's tails are wide: the peak pixel
    # holds a fraction close to the Gaussian's (both about 0.2 here).
    assert 0.1 < counts.max() / n < 0.4


def test_moving_emitter_is_blurred_along_its_path() -> None:
    # Flow at 100 um/s = 100 nm/ms, 10 ms exposure: a 10 px streak along x.
    sim = _single_emitter(8.0, 16.0, 50000.0, size=32, states=["Flow"], flow_speed_um_per_s=100.0,
                          flow_persistence_length_um=1e6, substeps_per_exposure=32)
    sim.scene.heading_rad[0] = 0.0
    image, truth = sim.next_frame()
    counts = image.astype(np.float64) - 100
    n = counts.sum()
    rows, cols = np.indices(counts.shape)
    vx = (counts * (cols - truth["x"][0]) ** 2).sum() / n
    vy = (counts * (rows - truth["y"][0]) ** 2).sum() / n
    var = (0.21 * 510 / 1.4 / 100) ** 2 + 1 / 12
    # A uniform 10 px streak adds L^2 (1 - 1/K^2) / 12 = 8.33 px^2 along x (K = 32 sub-steps).
    # Relative SE of a second moment from n photons: sqrt((kurtosis - 1) / n) <= sqrt(2 / n) * 1.5.
    tol = 5 * math.sqrt(2 / n) * 1.5
    assert vx == pytest.approx(var + 100 / 12 * (1 - 1 / 32**2), rel=tol)
    assert vy == pytest.approx(var, rel=tol)
    # The truth is the exposure-mean position: 8.0 + 10/2 px.
    assert truth["x"][0] == pytest.approx(13.0, abs=1e-6)
    assert truth["speed_um_per_s"][0] == pytest.approx(100.0)


def test_stage_shift_moves_the_field_of_view() -> None:
    config = build_config({"simulation": {"states": ["Stat"], "margin_nm": 3000}})
    sim = make_simulator(config, "widefield", size_px=64, n_particles=30, seed=1)
    _, before = sim.next_frame()
    sim.set_stage_position_nm(1500.0, -700.0)  # +15 px in x, -7 px in y at 100 nm/px
    _, after = sim.next_frame()
    common, i, j = np.intersect1d(before["particle"], after["particle"], return_indices=True)
    assert common.size > 20
    assert np.allclose(after["x"][j] - before["x"][i], -15.0)
    assert np.allclose(after["y"][j] - before["y"][i], 7.0)


@pytest.mark.parametrize("kind", ["widefield", "scanning"])
def test_same_seed_same_movie_and_truth(kind: str) -> None:
    config = build_config({"simulation": {"blink_off_mean_ms": 50.0, "bleach_half_life_ms": 2000.0}})
    movie_a, truth_a = simulate_stack(config, kind, 3, size_px=24, n_particles=4, seed=11)
    movie_b, truth_b = simulate_stack(config, kind, 3, size_px=24, n_particles=4, seed=11)
    movie_c, _ = simulate_stack(config, kind, 3, size_px=24, n_particles=4, seed=12)
    assert movie_a.dtype == np.uint16 and movie_a.shape == (3, 24, 24)
    assert np.array_equal(movie_a, movie_b)
    assert np.array_equal(truth_a, truth_b)
    assert not np.array_equal(movie_a, movie_c)


@pytest.mark.parametrize("sigma_px", [0.5, 0.765, 2.0])
def test_tabulated_pixel_profile_matches_the_exact_erf_difference(sigma_px: float) -> None:
    from scipy.special import ndtr

    from scopestream.sim_camera._widefield import _PixelProfile

    profile = _PixelProfile(sigma_px)
    d = np.random.default_rng(7).uniform(-3.0, 20.0, size=(50, 8))  # emitters, px from pixel 0
    n_px = 24
    x = np.arange(n_px) - d[..., None]  # pixel centre minus emitter
    exact = ndtr((x + 0.5) / sigma_px) - ndtr((x - 0.5) / sigma_px)
    got = profile.profiles(d, n_px)
    # The table is exact (to float32 precision) at positions rounded to h = 1/phases px ...
    d_rounded = np.rint(d * profile.phases) / profile.phases
    x_rounded = np.arange(n_px) - d_rounded[..., None]
    exact_rounded = ndtr((x_rounded + 0.5) / sigma_px) - ndtr((x_rounded - 0.5) / sigma_px)
    assert np.abs(got - exact_rounded).max() <= 1e-7  # the table is float32
    # ... so it errs against the unrounded position by at most (h/2) max|g'| <= (h/2) phi(0)/sigma.
    h = 1.0 / profile.phases
    bound = h / 2 / (math.sqrt(2 * math.pi) * sigma_px) + 1e-7
    assert np.abs(got - exact).max() <= bound
    # Emitters far outside the padded table still come out (as zeros where g vanishes).
    far = profile.profiles(np.array([[-200.0, 300.0]]), n_px)
    assert far.shape == (1, 2, n_px) and not far.any()
