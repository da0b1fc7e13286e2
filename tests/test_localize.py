"""Localization against exact ground truth (pixel-integrated Gaussian spots, Poisson noise)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from scopestream.daemon import Frame, Products, installed_stage_plugins
from scopestream.daemon._config import build_config
from scopestream.plugins._gaussian_mle import (
    _border_background,
    fisher_crlb_px,
    fit_mle,
    mortensen_mle_variance_px2,
    radial_symmetry_centres,
)
from scopestream.plugins.localize import (
    Localizations,
    Localizer,
    LocalizeSettings,
    LocalizeStage,
    _enforce_separation,
    locate,
)

sys.path.insert(0, str(Path(__file__).parent))
from spot_images import random_positions, render_spots, to_adu  # noqa: E402

SIGMA = 1.3


def _roi_stack(rng: np.random.Generator, n: int, photons: float, bg: float, roi: int = 7):
    c = (roi - 1) / 2
    tx = c + rng.uniform(-0.5, 0.5, n)
    ty = c + rng.uniform(-0.5, 0.5, n)
    stack = np.stack([render_spots((roi, roi), [tx[i]], [ty[i]], photons, SIGMA, bg) for i in range(n)])
    return rng.poisson(stack).astype(float), tx, ty


def test_mortensen_formula_matches_numeric_fisher_bound() -> None:
    # Mortensen's closed form is the Fisher bound of the pixelated Gaussian up to ~1 %.
    for n_ph, bg in ((1000, 100), (200, 100), (5000, 10)):
        numeric = fisher_crlb_px(n_ph, bg, SIGMA)
        closed = float(np.sqrt(mortensen_mle_variance_px2(n_ph, bg, SIGMA)))
        assert closed == pytest.approx(numeric, rel=0.02)
    # SCIENCE.md: 0.104 px at sigma 1.3 px, N 1000, b 100.
    assert fisher_crlb_px(1000, 100, SIGMA) == pytest.approx(0.104, abs=0.001)


def test_mle_reaches_the_cramer_rao_bound_without_bias() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    rois, tx, ty = _roi_stack(rng, n, 1000.0, 100.0)
    fit = fit_mle(rois, SIGMA)
    crlb = fisher_crlb_px(1000, 100, SIGMA, roi_px=7)
    err = np.concatenate([fit.x_px - tx, fit.y_px - ty])
    rmse = float(np.sqrt(np.mean(err**2)))
    # The sample RMSE of 2n errors has relative SE 1/sqrt(2*2n); allow the MLE's 1.05x target
    # plus 3 SE.
    assert rmse <= crlb * (1.05 + 3 / np.sqrt(4 * n))
    assert rmse >= crlb * (1 - 3 / np.sqrt(4 * n))  # cannot beat the bound
    # Bias: |mean| within 3 SE of the mean (SE = rmse/sqrt(n)) and <= 0.01 px.
    for e in (fit.x_px - tx, fit.y_px - ty):
        assert abs(e.mean()) <= max(3 * rmse / np.sqrt(n), 0.01)
    # Photons and background unbiased to a few standard errors.
    assert fit.photons.mean() == pytest.approx(1000, rel=0.02)
    assert fit.background.mean() == pytest.approx(100, rel=0.01)
    # The reported per-spot bound equals the numeric one.
    assert np.median(fit.crlb_x_px) == pytest.approx(crlb, rel=0.05)


def test_radial_symmetry_is_close_to_the_bound() -> None:
    rng = np.random.default_rng(8)
    rois, tx, ty = _roi_stack(rng, 2000, 1000.0, 100.0)
    xr, yr = radial_symmetry_centres(rois)
    rmse = float(np.sqrt(np.mean(np.concatenate([xr - tx, yr - ty]) ** 2)))
    assert rmse <= 1.15 * fisher_crlb_px(1000, 100, SIGMA)


def _frame(rng, n_spots=60, shape=(256, 256), photons=1500.0, bg=50.0):
    x, y = random_positions(rng, n_spots, shape, 0.0, 10.0)
    expected = render_spots(shape, x, y, photons, SIGMA, bg)
    return to_adu(rng, expected), x, y


def _match(lx, ly, tx, ty, r=1.5):
    d, j = cKDTree(np.column_stack([lx, ly])).query(np.column_stack([tx, ty]))
    return d < r, j


def test_locate_finds_every_spot_once() -> None:
    rng = np.random.default_rng(1)
    img, tx, ty = _frame(rng)
    table = locate(img, psf_sigma_px=SIGMA)
    hit, j = _match(table.x.values, table.y.values, tx, ty)
    assert hit.all()  # includes spots on the image edge (margin 0)
    # No duplicates (each true spot matched once) and at most one 5-sigma noise peak.
    assert np.unique(j[hit]).size == len(tx)
    assert len(table) <= len(tx) + 1
    # Reported uncertainty vs actual error: chi^2 per coordinate ~ 1.
    err = np.concatenate([table.x.values[j] - tx, table.y.values[j] - ty])
    unc = np.concatenate([table.uncertainty_px.values[j]] * 2)
    assert np.mean((err / unc) ** 2) == pytest.approx(1.0, abs=0.35)


def test_no_detections_in_pure_noise() -> None:
    rng = np.random.default_rng(2)
    img = to_adu(rng, np.full((256, 256), 100.0))
    # At threshold 5 SD the chance per local maximum is ~3e-7 (Gaussian tail): none expected.
    assert len(locate(img, psf_sigma_px=SIGMA)) == 0


def test_uneven_background_does_not_create_false_spots() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256]
    background = 20.0 + 300.0 * xx / 255.0 + 100 * np.exp(-((yy - 128) ** 2 + (xx - 60) ** 2) / (2 * 40.0**2))
    x, y = random_positions(rng, 40, (256, 256), 5.0, 12.0)
    img = to_adu(rng, render_spots((256, 256), x, y, 3000.0, SIGMA, background))
    table = locate(img, psf_sigma_px=SIGMA)
    hit, _ = _match(table.x.values, table.y.values, x, y)
    assert hit.mean() >= 0.95
    assert len(table) <= len(x) + 1


def test_camera_model_converts_adu_to_photons() -> None:
    rng = np.random.default_rng(4)
    cfg = build_config({"camera": {"offset_adu": 400, "gain_e_per_adu": 2.0, "read_noise_e": 0.0}})
    x, y = random_positions(rng, 30, (128, 128), 6.0, 14.0)
    img = to_adu(rng, render_spots((128, 128), x, y, 2000.0, SIGMA, 30.0), offset_adu=400, gain_e_per_adu=2.0)
    table = locate(img, cfg, psf_sigma_px=SIGMA)
    assert table.photons.mean() == pytest.approx(2000, rel=0.03)
    assert table.background.mean() == pytest.approx(30, rel=0.05)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((64, 64), np.uint16),
        np.full((64, 64), 300, np.uint16),
        np.full((64, 64), 65535, np.uint16),
    ],
    ids=["zeros", "constant", "saturated"],
)
def test_degenerate_frames_give_no_localizations(image: np.ndarray) -> None:
    assert len(locate(image, psf_sigma_px=SIGMA)) == 0


def test_nan_pixels_are_tolerated_and_all_nan_rejected() -> None:
    rng = np.random.default_rng(5)
    img, tx, ty = _frame(rng, n_spots=20, shape=(128, 128))
    f = img.astype(np.float32)
    f[5:8, 100:103] = np.nan
    table = locate(f, psf_sigma_px=SIGMA)
    hit, _ = _match(table.x.values, table.y.values, tx, ty)
    assert hit.mean() >= 0.9
    with pytest.raises(ValueError, match="no finite pixel"):
        locate(np.full((32, 32), np.nan), psf_sigma_px=SIGMA)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 0)), "empty"),
        (np.zeros((3, 4, 5, 6)), "2-D"),
        (np.zeros((32, 32), dtype=complex), "dtype"),
        (np.zeros((4, 4), np.uint16), "smaller than the fitting region"),
    ],
)
def test_bad_images_raise_clear_errors(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        locate(image, psf_sigma_px=SIGMA)


def test_impossible_settings_name_the_key() -> None:
    with pytest.raises(ValueError, match="threshold_snr"):
        locate(np.zeros((32, 32), np.uint16), threshold_snr=-1)
    with pytest.raises(ValueError, match="roi_px"):
        LocalizeSettings(roi_px=1)


def test_stage_publishes_localizations_and_product() -> None:
    assert installed_stage_plugins()["localize"].topics["localizations"].__name__ == "LocalizationsBody"
    rng = np.random.default_rng(6)
    img, tx, ty = _frame(rng, n_spots=10, shape=(96, 96))
    cfg = build_config({"stages": ["localize"], "localize": {"psf_sigma_px": SIGMA}})
    stage = LocalizeStage(cfg, cfg.stage_settings("localize"))  # type: ignore[arg-type]
    products = Products()
    (em,) = stage.process(Frame(seq=3, image=img, t_acquired=1.0), products)
    locs = products.get(Localizations)
    assert isinstance(locs, Localizations) and len(locs) == 10 and locs.frame_seq == 3
    assert em.topic == "localizations" and em.body.count == 10 and em.frame_seq == 3  # type: ignore[attr-defined]
    assert set(em.arrays) == {"x", "y", "photons", "background", "sigma", "uncertainty_px"}
    assert all(a.dtype == np.float64 and a.shape == (10,) for a in em.arrays.values())
    with pytest.raises(ValueError, match="frame 4"):
        stage.process(Frame(seq=4, image=np.zeros((2, 2), np.uint16), t_acquired=1.0), products)


def test_fit_sigma_recovers_the_psf_width() -> None:
    rng = np.random.default_rng(9)
    rois, _, _ = _roi_stack(rng, 500, 3000.0, 20.0)
    fit = fit_mle(rois, 1.0, fit_sigma=True)
    assert np.median(fit.sigma_px) == pytest.approx(SIGMA, rel=0.02)


def test_detection_peaks_sit_on_the_spot_pixel() -> None:
    # High SNR (N 5000, b 10) and true positions within 0.3 px of a pixel centre: the box-filtered
    # band-pass peaks at the nearest pixel (its value there exceeds the neighbours' by far more
    # than the noise), so every detection must be exactly (round(y), round(x)). (Within 1 px of
    # the border the mirrored copy of a spot adds to the edge pixel's box, so the margin is 2 px.)
    rng = np.random.default_rng(11)
    x, y = random_positions(rng, 40, (200, 200), 2.0, 10.0)
    x = np.round(x) + rng.uniform(-0.3, 0.3, x.size)
    y = np.round(y) + rng.uniform(-0.3, 0.3, y.size)
    img = to_adu(rng, render_spots((200, 200), x, y, 5000.0, SIGMA, 10.0))
    loc = Localizer(LocalizeSettings(psf_sigma_px=SIGMA))
    padded, _ = loc._padded_frame(img)
    rows, cols, _ = loc.detect(padded, 200, 200)
    found = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert found == set(zip(np.round(y).astype(int).tolist(), np.round(x).astype(int).tolist(), strict=True))


def test_default_stopping_rule_is_close_to_the_converged_fit() -> None:
    # Fisher scoring contracts the remaining error ~10x per step near the optimum, so stopping
    # when the RMS step is below tol leaves ~0.1 tol RMS; allow 0.2 tol RMS and 2 tol at most
    # (the largest single last step allowed is 10 tol).
    rng = np.random.default_rng(12)
    rois, _, _ = _roi_stack(rng, 1000, 1000.0, 100.0)
    tol = LocalizeSettings().tolerance_px
    quick = fit_mle(rois, SIGMA, tolerance_px=tol)
    full = fit_mle(rois, SIGMA, tolerance_px=1e-10, max_iterations=100)
    dev = np.concatenate([quick.x_px - full.x_px, quick.y_px - full.y_px])
    assert np.sqrt(np.mean(dev**2)) <= 0.2 * tol
    assert np.abs(dev).max() <= 2 * tol
    # The Cramér-Rao bounds from the solve equal the inverse Fisher information.
    assert np.median(full.crlb_x_px) == pytest.approx(fisher_crlb_px(1000, 100, SIGMA, roi_px=7), rel=0.05)


def test_a_spot_pinned_at_the_region_edge_does_not_hold_the_others_to_max_iterations() -> None:
    # A region whose spot lies outside it: the fit runs into the region's edge and keeps
    # proposing the same outward step there. The stopping rule looks at the moves made, so the
    # other spots stop as they would alone: with 4 or 12 iterations allowed, the same result
    # (before, every spot of such a frame went on to max_iterations).
    rng = np.random.default_rng(21)
    rois, _, _ = _roi_stack(rng, 200, 1000.0, 100.0)
    outside = rng.poisson(render_spots((7, 7), [-1.6], [3.0], 1000.0, SIGMA, 100.0)).astype(float)
    stack = np.concatenate([rois, outside[None]])
    short = fit_mle(stack, SIGMA, max_iterations=4)
    long = fit_mle(stack, SIGMA, max_iterations=12)
    assert not long.converged[-1] and long.x_px[-1] == -0.5  # pinned at the edge, rejected
    np.testing.assert_array_equal(short.x_px[:-1], long.x_px[:-1])
    np.testing.assert_array_equal(short.photons[:-1], long.photons[:-1])


def test_border_background_is_the_median_of_the_border() -> None:
    rng = np.random.default_rng(22)
    for roi in (3, 5, 7):
        rois = rng.poisson(50.0, (40, roi, roi)).astype(float)
        rois[3, 0, 1] = np.nan
        bg, signal = _border_background(rois)
        border = np.ones((roi, roi), bool)
        border[1:-1, 1:-1] = False
        expected = np.median(rois[:, border], axis=1)
        np.testing.assert_array_equal(bg, expected)  # NaN where a border pixel is NaN
        np.testing.assert_array_equal(signal, rois.reshape(40, -1).sum(axis=1) - expected * roi * roi)


def test_saturated_and_nan_regions_are_dropped_and_counted() -> None:
    rng = np.random.default_rng(13)
    x, y = np.array([20.0, 60.0, 100.0]), np.array([30.0, 64.0, 90.0])
    expected = render_spots((128, 128), x, y, np.array([2000.0, 2e6, 2000.0]), SIGMA, 20.0)
    img = to_adu(rng, expected).astype(np.float32)  # the 2e6-photon spot saturates (65535 ADU)
    img[90, 101] = np.nan  # inside the third spot's region
    loc = Localizer(LocalizeSettings(psf_sigma_px=SIGMA))
    locs = loc.localize(img)
    assert len(locs) == 1 and abs(locs.x[0] - 20.0) < 0.2 and abs(locs.y[0] - 30.0) < 0.2
    assert locs.diagnostics["rejected_saturated"] == 1


@pytest.mark.parametrize("min_separation_px", [1.0, 2.5, 3.0, 4.0, 6.0])
def test_enforce_separation_matches_the_pairwise_rule(min_separation_px: float) -> None:
    # Brute force: of every pair closer than the separation (Chebyshev), drop the fainter (on a
    # tie the later one). The fast path (sorted keys, separation <= 4) and the k-d tree path
    # must both give exactly this.
    rng = np.random.default_rng(14)
    rows = rng.integers(0, 40, 300)
    cols = rng.integers(0, 40, 300)
    _, first = np.unique(rows * 40 + cols, return_index=True)
    order = np.sort(first)
    rows, cols = rows[order], cols[order]
    values = rng.integers(0, 5, rows.size).astype(float)  # ties on purpose
    d = np.maximum(np.abs(rows[:, None] - rows[None, :]), np.abs(cols[:, None] - cols[None, :]))
    i, j = np.nonzero(np.triu(d < min_separation_px - 1e-9, k=1))
    drop = np.zeros(rows.size, bool)
    drop[np.where(values[j] <= values[i], j, i)] = True
    r, c, _ = _enforce_separation(rows, cols, values, min_separation_px)
    assert set(zip(r.tolist(), c.tolist(), strict=True)) == set(zip(rows[~drop].tolist(), cols[~drop].tolist(), strict=True))


def _simulator_z2(d_um2_per_s: float, photons: float, pixel_nm: float, n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Squared errors (x and y pooled) and reported uncertainties of isolated spots of the widefield
    simulator (exact exposure-mean truth), as benchmarks/calibrate_localization.py measures them."""
    from scopestream.sim_camera import simulate_stack

    cfg = build_config({
        "acquisition": {"exposure_ms": 10, "frame_interval_ms": 10}, "optics": {"pixel_size_nm": pixel_nm},
        "simulation": {"particle_kind": "point", "states": ["RanW"], "D_um2_per_s": d_um2_per_s,
                       "photons_per_frame": photons, "background_photons_per_px": 10, "substeps_per_exposure": 32,
                       "margin_nm": 0.0},
    })
    movie, truth = simulate_stack(cfg, "widefield", n_frames=n_frames, size_px=96,
                                  n_particles=30 if pixel_nm >= 100 else 12, seed=seed)
    loc = Localizer(LocalizeSettings(), cfg)
    err2, unc = [], []
    for f in range(n_frames):
        spots = loc.localize(movie[f], f)
        t = truth[(truth["frame"] == f) & truth["visible"]]
        nd, _ = cKDTree(np.c_[t["x"], t["y"]]).query(np.c_[t["x"], t["y"]], k=2)
        t = t[(t["x"] > 5) & (t["x"] < 90) & (t["y"] > 5) & (t["y"] < 90) & (nd[:, 1] > max(6.0, 8 * loc.sigma_px))]
        dist, j = cKDTree(np.c_[spots.x, spots.y]).query(np.c_[t["x"], t["y"]], distance_upper_bound=1.0)
        ok = np.isfinite(dist)
        err2 += [(spots.x[j[ok]] - t["x"][ok]) ** 2, (spots.y[j[ok]] - t["y"][ok]) ** 2]
        unc += [spots.uncertainty_px[j[ok]]] * 2
    return np.concatenate(err2), np.concatenate(unc), loc.sigma_px


@pytest.mark.parametrize(
    ("photons", "pixel_nm", "d_um2_per_s"),
    [(200.0, 100.0, 0.0), (5000.0, 100.0, 0.0), (300.0, 60.0, 0.0), (2000.0, 60.0, 0.0), (1000.0, 100.0, 0.2), (500.0, 100.0, 0.4)],
)
def test_reported_uncertainties_are_calibrated_on_the_simulator(photons: float, pixel_nm: float, d_um2_per_s: float) -> None:
    # Normalized errors z = (x_hat - x) / uncertainty against the widefield simulator's truth
    # (seeds other than the calibration run's): still spots take localize's reported uncertainty
    # as it is (the static calibration is inside localize), moving ones the blur-calibrated
    # variance at the true D (1 px^2/frame = 1 um^2/s at 100 nm, 10 ms; t_E = 1 frame). mean z^2
    # = 1 within 3.5 standard errors of the sample mean of z^2 (SE = SD(z^2) / sqrt(n), from
    # the sample: z is heavier-tailed than Gaussian under blur), plus the calibration table's
    # own residual: 1.5 % static (chi2 40 on 21 dof: scatter ~ sqrt(40/21) x its 0.7-1.3 % row
    # SEs), 5 % under blur (the u^4 form leaves 0.95-1.07 in the table at u < 1).
    from scopestream.plugins._loc_calibration import calibrated_variance_px2

    seed = 7000 + int(photons) + int(pixel_nm) + int(100 * d_um2_per_s)
    # Frames for >= ~5000 z values (60 nm pixels: fewer isolated particles per frame).
    n_frames = 300 if d_um2_per_s > 0 else (500 if pixel_nm >= 100 else 1000)
    err2, unc, s = _simulator_z2(d_um2_per_s, photons, pixel_nm, n_frames, seed)
    d_px2 = d_um2_per_s * (100.0 / pixel_nm) ** 2
    z2 = err2 / calibrated_variance_px2(unc, d_px2, 1.0, s)
    assert z2.size > 4000
    se = float(np.std(z2) / np.sqrt(z2.size))
    residual = 0.015 if d_um2_per_s == 0 else 0.05
    print(f"mean z2 {np.mean(z2):.4f} n {z2.size} SE {se:.4f}; reported alone {np.mean(err2 / unc**2):.4f}")
    assert float(np.mean(z2)) == pytest.approx(1.0, abs=3.5 * se + residual)
