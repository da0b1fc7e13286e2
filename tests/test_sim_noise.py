"""Camera noise model of the simulated cameras: background statistics, exact sampling, saturation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from scopestream.daemon._config import ConfigError, build_config
from scopestream.sim_camera import make_simulator, physics_from_config
from scopestream.sim_camera._noise import CameraNoise, poisson


def _empty_scene(camera: dict, background: float = 10.0, size: int = 64):
    config = build_config(
        {"camera": camera, "simulation": {"n_particles": 0, "margin_nm": 0, "background_photons_per_px": background}}
    )
    return make_simulator(config, "widefield", size_px=size, seed=1)


def _stack(sim, n: int) -> np.ndarray:
    return np.stack([sim.next_frame()[0] for _ in range(n)]).astype(np.float64)


def test_scmos_background_mean_and_variance_match_the_model() -> None:
    camera = {"offset_adu": 100, "gain_e_per_adu": 0.5, "read_noise_e": 1.5, "em_gain": 1}
    values = _stack(_empty_scene(camera), 20)
    lam, g, sd = 10.0, 0.5, 1.5
    mean = 100 + lam / g  # 120 ADU
    var = (lam + sd**2) / g**2 + 1 / 12  # shot + read noise, plus uniform rounding error (Sheppard)
    n = values.size  # 81920 independent pixels
    # Standard error of the mean sqrt(var/n) ~ 0.024 ADU; of the variance ~ var*sqrt(2/n) ~ 0.24
    # (near-Gaussian values: Poisson(10) excess kurtosis 0.1 is negligible here). 5 SE each.
    assert abs(values.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(values.var() - var) < 5 * var * np.sqrt(2 / n)


def test_emccd_background_has_excess_noise_factor_two() -> None:
    camera = {"offset_adu": 100, "gain_e_per_adu": 20, "read_noise_e": 30, "em_gain": 100}
    values = _stack(_empty_scene(camera, background=5.0, size=48), 20)
    lam, g, em, sd = 5.0, 20.0, 100.0, 30.0
    mean = 100 + lam * em / g  # 125 ADU
    var = (2 * lam * em**2 + sd**2) / g**2 + 1 / 12  # excess noise factor F = 2
    n = values.size
    # Gamma-Poisson values are skewed: Var(sample variance) = (mu4 - var^2)/n with mu4 about
    # 3 var^2 (1 + 2/lam); so SE ~ var * sqrt((2 + 6/lam)/n). 5 SE.
    assert abs(values.mean() - mean) < 5 * np.sqrt(var / n)
    assert abs(values.var() - var) < 5 * var * np.sqrt((2 + 6 / lam) / n)


def test_table_sampler_draws_exactly_the_background_distribution() -> None:
    camera = {"offset_adu": 50, "gain_e_per_adu": 1.0, "read_noise_e": 0.8}
    sim = _empty_scene(camera, background=3.0, size=64)
    values, pmf = sim.noise.background_adu_pmf()
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    counts = np.bincount(_stack(sim, 30).astype(np.int64).ravel() - values[0], minlength=len(values))
    expected = pmf * counts.sum()
    keep = expected > 20  # pool rare values so the chi-square approximation holds
    observed = np.append(counts[keep], counts[~keep].sum())
    expect = np.append(expected[keep], expected[~keep].sum())
    # A correct sampler fails this at the 1e-4 level only once in 10^4 runs (fixed seed here).
    assert chisquare(observed, expect).pvalue > 1e-4


def test_fast_poisson_matches_poisson_moments() -> None:
    rng = np.random.default_rng(3)
    for lam in (1e-3, 0.3, 0.49, 0.7, 5.0, 11.9, 40.0):  # below 0.5: drawn as one split process
        draws = poisson(rng, np.full(200_000, lam))
        n = draws.size
        # Mean lam, variance lam; SE of the mean sqrt(lam/n), of the variance ~ lam*sqrt(2/n + 1/(lam n)).
        assert abs(draws.mean() - lam) < 5 * np.sqrt(lam / n)
        assert abs(draws.var() - lam) < 5 * lam * np.sqrt(2 / n + 1 / (lam * n))


def test_bright_spots_clip_at_saturation_and_are_counted() -> None:
    config = build_config(
        {
            "camera": {"saturation_adu": 4000, "gain_e_per_adu": 1.0},
            "simulation": {"n_particles": 3, "margin_nm": 0, "particle_kind": "point", "states": ["Stat"],
                           "photons_per_frame": 1e6},
        }
    )
    sim = make_simulator(config, "widefield", size_px=32)
    image, _ = sim.next_frame()
    assert image.max() == 4000
    assert sim.last_saturated_px == int(np.count_nonzero(image == 4000)) > 0


@pytest.mark.parametrize(
    ("camera", "simulation", "key"),
    [
        ({"saturation_adu": 70000}, {}, "camera.saturation_adu"),
        ({"offset_adu": 500, "saturation_adu": 400}, {}, "camera.offset_adu"),
        ({"gain_e_per_adu": 0.01}, {"background_photons_per_px": 1000}, "simulation.background_photons_per_px"),
    ],
)
def test_impossible_camera_settings_are_refused(camera: dict, simulation: dict, key: str) -> None:
    # With a simulated camera as the source, validating the configuration already refuses them ...
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({"camera": camera, "simulation": simulation})
    # ... and the simulators do, for a configuration whose source is something else.
    config = build_config({"camera": camera, "simulation": simulation, "source": {"kind": "file", "file_path": "x.tif"}})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        physics_from_config(config)


def test_noise_model_uses_the_simulation_generator_only() -> None:
    """Same seed, same noise: the noise model draws from the generator it is given."""
    physics = physics_from_config(build_config({}))
    a = np.empty((16, 16), np.uint16)
    b = np.empty((16, 16), np.uint16)
    idx, sig = np.array([3, 40]), np.array([50.0, 0.2])
    CameraNoise(physics, np.random.default_rng(5)).render(a, idx, sig)
    CameraNoise(physics, np.random.default_rng(5)).render(b, idx, sig)
    assert np.array_equal(a, b)


def test_split_poisson_draws_are_independent_across_pixels() -> None:
    # Means below 0.5 are drawn as one Poisson total split by pixel; independence shows in the total:
    # Var(sum) = sum(lam) (a fixed or mis-drawn total would give 0 or something else) and in a
    # zero covariance between two pixels.
    rng = np.random.default_rng(5)
    lam = np.linspace(0.01, 0.45, 40)
    draws = np.array([poisson(rng, lam) for _ in range(20_000)])
    n = draws.shape[0]
    total = draws.sum(axis=1)
    s = lam.sum()
    # SE of a sample variance of a Poisson(s) ~ s * sqrt(2/n + 1/(s n)).
    assert abs(total.var() - s) < 5 * s * np.sqrt(2 / n + 1 / (s * n))
    assert abs(total.mean() - s) < 5 * np.sqrt(s / n)
    # Covariance of the two largest-mean pixels: SE ~ sqrt(lam_a lam_b / n).
    a, b = draws[:, -1], draws[:, -2]
    assert abs(np.cov(a, b)[0, 1]) < 5 * np.sqrt(lam[-1] * lam[-2] / n)


def test_repeated_signal_pixels_add_their_photons() -> None:
    # Overlapping PSF patches hand the noise model one entry per patch: pixel 5 gets three
    # entries (0.2 + 3 + 30 photons, both Poisson paths), pixel 20 one entry of the same 33.2.
    # Both must follow the model for 10 background + 33.2 signal photons; a pixel that kept only
    # one entry's draw would be off by several standard errors.
    physics = physics_from_config(build_config({}))
    noise = CameraNoise(physics, np.random.default_rng(11))
    idx, sig = np.array([5, 5, 5, 20]), np.array([0.2, 3.0, 30.0, 33.2])
    frame = np.empty((8, 8), np.uint16)
    n = 20_000
    values = np.empty((n, 2))
    for i in range(n):
        noise.render(frame, idx, sig)
        values[i] = frame.reshape(-1)[[5, 20]]
    g, sd, lam = physics.gain_e_per_adu, physics.read_noise_e, physics.sim.background_photons_per_px + 33.2
    mean = physics.offset_adu + lam / g
    var = (lam + sd**2) / g**2 + 1 / 12
    for column in values.T:
        # SE of the mean sqrt(var/n); of the variance ~ var*sqrt(2/n) (near-Gaussian values). 5 SE.
        assert abs(column.mean() - mean) < 5 * np.sqrt(var / n)
        assert abs(column.var() - var) < 5 * var * np.sqrt(2 / n)
