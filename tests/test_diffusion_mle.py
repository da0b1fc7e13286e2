"""The maximum-likelihood diffusion estimator, its Cramér-Rao bound, the calibration of the
localization uncertainties, and the online change points, against simulated truth."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import cholesky_banded, solveh_banded
from scipy.spatial import cKDTree

from scopestream.daemon._config import build_config
from scopestream.plugins._changepoints import REGIME_LABELS, OnlineChangePoints, segment_properties
from scopestream.plugins._diffusion_mle import (
    METHOD_CODE,
    blur_coefficient,
    build_model,
    displacement_series,
    estimate_batch,
    evaluate,
    fit_mle,
)
from scopestream.plugins._loc_calibration import calibrated_variance_px2
from scopestream.plugins.localize import Localizer, LocalizeSettings
from scopestream.sim_camera import simulate_stack

sys.path.insert(0, str(Path(__file__).parent))
from brownian_tracks import blurred_brownian  # noqa: E402

SUBSTEPS = 40


def _tracks(seed: int, m: int, n_frames: int, d: float, sigma: float, exposure: float = 1.0):
    pos = blurred_brownian(
        np.random.default_rng(seed), n_tracks=m, n_frames=n_frames, d_px2_per_frame=d,
        exposure_fraction=exposure, sigma_loc_px=sigma, substeps=SUBSTEPS,
    )
    frames = np.tile(np.arange(n_frames), (m, 1))
    return frames, pos[:, :, 0], pos[:, :, 1]


def _blur(exposure: float) -> float:
    # The test tracks average SUBSTEPS sampled positions over the exposure.
    n_exp = max(1, int(round(exposure * SUBSTEPS)))
    return blur_coefficient(n_exp / SUBSTEPS, 1.0, n_exp)


@pytest.mark.parametrize("kind", ["known", "scaled", "common"])
def test_likelihood_gradient_and_fisher_match_a_dense_computation(kind: str) -> None:
    rng = np.random.default_rng(1)
    m, L = 4, 25
    frames = np.tile(np.arange(L), (m, 1))
    frames[1, 5] = -1  # a gap
    frames[2, 10:14] = -1  # a longer gap
    x = rng.normal(size=(m, L)).cumsum(1)
    y = rng.normal(size=(m, L)).cumsum(1)
    x[3, 7] = np.nan  # a NaN localization counts as missing
    sig = rng.uniform(0.1, 0.5, (m, L))
    series = displacement_series(frames, x, y, sig)
    assert series.n.tolist() == [24, 23, 20, 23]
    model = build_model(series, 1 / 6, kind, gamma_per_px2_per_frame=0.3 if kind == "known" else 0.0)  # type: ignore[arg-type]
    theta = np.tile([0.7, 1.3] if kind != "known" else [0.7], (m, 1))
    ll, grad, fisher = evaluate(model, theta)
    for i in range(m):
        n = int(model.n[i])

        def sigma(t: np.ndarray, i: int = i, n: int = n) -> np.ndarray:
            a = (t[:, None] * model.Ma[:, i, :n]).sum(0) + model.Ca[i, :n]
            b = (t[:, None] * model.Mb[:, i, :n]).sum(0) + model.Cb[i, :n]
            return np.diag(a) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)

        def loglik(t: np.ndarray, i: int = i, n: int = n) -> float:
            s = sigma(t)
            ab = np.zeros((2, n))
            ab[0, 1:], ab[1] = np.diag(s, 1), np.diag(s)
            logdet = 2.0 * np.log(cholesky_banded(ab)[1]).sum()  # scipy's banded Cholesky as the oracle
            d = np.column_stack([model.dx[i, :n], model.dy[i, :n]])
            return float(-logdet - 0.5 * (d * solveh_banded(ab, d)).sum())

        t = theta[i]
        assert ll[i] == pytest.approx(loglik(t), rel=1e-10)
        h = 1e-6
        numeric = [(loglik(t + h * e) - loglik(t - h * e)) / (2 * h) for e in np.eye(t.size)]
        assert np.allclose(grad[i], numeric, rtol=1e-5, atol=1e-6)
        inv = np.linalg.inv(sigma(t))
        mats = [sigma(e) - sigma(0 * e) for e in np.eye(t.size)]
        # Two axes, each (1/2) tr(S^-1 M_p S^-1 M_q).
        dense = np.array([[np.trace(inv @ a @ inv @ b) for b in mats] for a in mats])
        assert np.allclose(fisher[i], dense, rtol=1e-9)


@pytest.mark.parametrize(("n_steps", "d", "sigma", "exposure"), [(50, 0.1, 0.1, 1.0), (20, 0.01, 0.2, 1.0), (100, 0.05, 0.3, 0.0)])
def test_known_sigma_mle_is_unbiased_at_the_cramer_rao_bound(n_steps: int, d: float, sigma: float, exposure: float) -> None:
    m = 1500
    frames, x, y = _tracks(2, m, n_steps + 1, d, sigma, exposure)
    series = displacement_series(frames, x, y, np.full(x.shape, sigma))
    res = fit_mle(build_model(series, _blur(exposure), "known"))
    assert res.converged.mean() > 0.99 and (res.D >= 0).all()
    sd_bound = float(np.sqrt(np.mean(res.D_crlb_var)))
    # Mean of m estimates: SE = SD / sqrt(m); 4 SE.
    assert res.D.mean() == pytest.approx(d, abs=4 * res.D.std() / np.sqrt(m))
    # The spread equals the bound: sample SD has relative SE ~ sqrt((1 + kurtosis/2) / (2m)),
    # excess kurtosis ~1 for these small-N estimators: 4 SE ~ 9 %. (A bound clipped at D = 0
    # can only lower the spread; at these x = sigma^2/D the clipping is rare.)
    assert res.D.std() / sd_bound == pytest.approx(1.0, abs=4 * np.sqrt(1.5 / (2 * m)))


def test_fisher_information_equals_the_variance_of_the_score() -> None:
    # At the true D, E[score] = 0 and var(score) = I(D): the information identity, checked on
    # 3000 simulated tracks of 30 steps (per-point sigma drawn per spot). var of m squared
    # normal-ish scores has relative SE sqrt(2/m) ~ 2.6 %: 4 SE.
    m, n = 3000, 31
    rng = np.random.default_rng(5)
    d = 0.05
    frames, x, y = _tracks(6, m, n, d, 0.0)
    sig = rng.uniform(0.05, 0.3, x.shape)
    x = x + rng.normal(0, 1, x.shape) * sig
    y = y + rng.normal(0, 1, y.shape) * sig
    model = build_model(displacement_series(frames, x, y, sig), _blur(1.0), "known")
    _, grad, fisher = evaluate(model, (d / model.scale)[:, None])
    score = grad[:, 0] / model.scale  # per px^2/frame
    info = fisher[:, 0, 0] / model.scale**2
    assert score.mean() == pytest.approx(0.0, abs=4 * score.std() / np.sqrt(m))
    assert np.mean(score**2) / np.mean(info) == pytest.approx(1.0, abs=4 * np.sqrt(2 / m))


def test_immobile_particle_has_d_compatible_with_zero() -> None:
    # D = 0, noise only: every estimate is a number >= 0 (never negative, never an error) and
    # compatible with 0: D <= 2 D_err for ~97.7 % of tracks if D_hat / err were half-normal; we
    # ask for 95 %.
    m = 1000
    frames, x, y = _tracks(7, m, 40, 0.0, 0.1)
    series = displacement_series(frames, x, y, np.full(x.shape, 0.1))
    est = estimate_batch(series, 1 / 6, "mle", exposure_frames=1.0, psf_sigma_px=1.0)
    assert np.isfinite(est.D).all() and (est.D >= 0).all()
    assert (est.method == METHOD_CODE["mle"]).mean() > 0.99
    assert np.isfinite(est.D_err).all() and (est.D_err > 0).all()
    assert np.mean(est.D <= 2 * est.D_err) >= 0.95


def test_nan_localizations_and_gaps_leave_the_mle_unbiased() -> None:
    m, d, sigma = 1000, 0.1, 0.1
    frames, x, y = _tracks(8, m, 51, d, sigma)
    rng = np.random.default_rng(9)
    x[rng.random(x.shape) < 0.1] = np.nan  # 10 % of the localizations failed
    frames[rng.random(x.shape) < 0.05] = -1  # 5 % missed frames
    series = displacement_series(frames, x, y, np.full(x.shape, sigma))
    assert (series.gap > 1).any()
    est = estimate_batch(series, _blur(1.0), "mle", exposure_frames=1.0, psf_sigma_px=1.0, calibrate=False)
    assert est.D.mean() == pytest.approx(d, abs=4 * est.D.std() / np.sqrt(m))
    assert np.mean(est.D_err) == pytest.approx(est.D.std(), rel=0.1)


def test_calibration_check_and_missing_uncertainties() -> None:
    m, d, sigma = 800, 0.05, 0.15
    frames, x, y = _tracks(10, m, 61, d, sigma)
    blur = _blur(1.0)
    kw = {"exposure_frames": 1.0, "psf_sigma_px": 1.0, "calibrate": False}
    # Reported uncertainties 1.5x too small (variance 2.25x): the check rejects them; 'mle' fits
    # their scale and stays unbiased, 'auto' uses the CVE.
    wrong = displacement_series(frames, x, y, np.full(x.shape, sigma / 1.5))
    mle = estimate_batch(wrong, blur, "mle", **kw)  # type: ignore[arg-type]
    assert (mle.method == METHOD_CODE["mle_scaled"]).all()
    assert mle.D.mean() == pytest.approx(d, abs=4 * mle.D.std() / np.sqrt(m))
    auto = estimate_batch(wrong, blur, "auto", **kw)  # type: ignore[arg-type]
    assert (auto.method == METHOD_CODE["cve"]).all() and np.isnan(auto.D_crlb_var).all()
    # Right uncertainties pass the check (a track fails at p < 0.001 per test: allow 1 %).
    right = estimate_batch(displacement_series(frames, x, y, np.full(x.shape, sigma)), blur, "auto", **kw)  # type: ignore[arg-type]
    assert (right.method == METHOD_CODE["mle"]).mean() > 0.99
    # No uncertainties: the joint MLE of D and one sigma^2 (Berglund), unbiased.
    none = estimate_batch(displacement_series(frames, x, y, None), blur, "mle", **kw)  # type: ignore[arg-type]
    assert (none.method == METHOD_CODE["mle_joint"]).all()
    assert none.D.mean() == pytest.approx(d, abs=4 * none.D.std() / np.sqrt(m))
    assert np.sqrt(np.nanmedian(none.sigma2)) == pytest.approx(sigma, rel=0.1)
    # The known-sigma bound is tighter than the joint one (the point of using the uncertainties;
    # at sigma^2/(D dt) = 0.45 and 60 steps the SD ratio computes to ~0.83).
    assert np.nanmedian(right.D_crlb_var) < 0.75 * np.nanmedian(none.D_crlb_var)


def test_blur_calibration_of_localize_uncertainties_on_the_simulator() -> None:
    # 1000-photon point emitters diffusing at 0.6 um^2/s through a 10 ms exposure (u = D t_E /
    # s^2 ~ 1): localize's uncertainties understate the error (var(z) ~ 1.8 measured); the
    # calibrated variances bring var(z) to 1 within 4 SE (SE of a variance from n values:
    # var sqrt(2/n)), plus the 6 % residual the calibration table shows.
    cfg = build_config({
        "acquisition": {"exposure_ms": 10, "frame_interval_ms": 10}, "optics": {"pixel_size_nm": 100},
        "simulation": {"particle_kind": "point", "states": ["RanW"], "D_um2_per_s": 0.6, "photons_per_frame": 1000,
                       "background_photons_per_px": 10, "substeps_per_exposure": 32, "margin_nm": 0.0},
    })
    movie, truth = simulate_stack(cfg, "widefield", n_frames=40, size_px=96, n_particles=30, seed=3)
    loc = Localizer(LocalizeSettings(), cfg)
    err, unc = [], []
    for f in range(movie.shape[0]):
        spots = loc.localize(movie[f], f)
        t = truth[(truth["frame"] == f) & truth["visible"]]
        nd, _ = cKDTree(np.c_[t["x"], t["y"]]).query(np.c_[t["x"], t["y"]], k=2)
        t = t[(t["x"] > 5) & (t["x"] < 90) & (t["y"] > 5) & (t["y"] < 90) & (nd[:, 1] > 6)]
        dist, j = cKDTree(np.c_[spots.x, spots.y]).query(np.c_[t["x"], t["y"]], distance_upper_bound=1.0)
        ok = np.isfinite(dist)
        err += [spots.x[j[ok]] - t["x"][ok], spots.y[j[ok]] - t["y"][ok]]
        unc += [spots.uncertainty_px[j[ok]]] * 2
    e, u = np.concatenate(err), np.concatenate(unc)
    assert e.size > 1000
    raw = np.mean((e / u) ** 2)
    fixed = np.mean(e**2 / calibrated_variance_px2(u, 0.6, 1.0, loc.sigma_px))
    se = np.sqrt(2 / e.size)
    assert raw > 1.3
    assert fixed == pytest.approx(1.0, abs=4 * se + 0.06)


def _two_state(seed: int, m: int, n: int, change: int, d1: float, d2: float, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = np.concatenate([rng.normal(0, np.sqrt(2 * d1), (m, change, 2)), rng.normal(0, np.sqrt(2 * d2), (m, n - change, 2))], 1)
    return np.cumsum(steps, axis=1) + rng.normal(0, sigma, (m, n, 2))


@pytest.mark.parametrize(("d1", "d2"), [(0.02, 0.2), (0.2, 0.02)])
def test_a_known_change_point_is_found_within_the_expected_delay(d1: float, d2: float) -> None:
    # A tenfold change of D at displacement 80 of 160. The posterior needs a few displacements of
    # evidence: at ratio 10 each new displacement carries ~0.5-1 nat (half the log-ratio of the
    # variances and more), so crossing the 0.9 threshold against the 1/100 hazard takes
    # ~log(900)/0.7 ~ 10 steps at most; we ask for 90 % of changes found within the AnDi gate
    # (10 steps), a median delay <= 10, and < 0.3 false changes per track.
    m, n, cp = 200, 160, 80
    pos = _two_state(11, m, n + 1, cp, d1, d2, 0.05)
    d = np.diff(pos, axis=1)
    det = OnlineChangePoints()
    det.add_rows(m)
    found: dict[int, tuple[int, int]] = {}
    false = 0
    for k in range(n):
        ev = det.update(np.arange(m), d[:, k, 0], d[:, k, 1])
        for r, c in zip(ev.rows.tolist(), ev.change_step.tolist(), strict=True):
            if abs(c - cp) <= 10 and r not in found:
                found[r] = (c, k - cp)
            else:
                false += 1
    assert len(found) >= 0.9 * m
    assert np.median([delay for _, delay in found.values()]) <= 10
    assert np.sqrt(np.mean([(c - cp) ** 2 for c, _ in found.values()])) <= 3
    assert false / m < 0.3


def test_segment_regimes() -> None:
    rng = np.random.default_rng(12)
    m, n = 200, 60
    frames = np.tile(np.arange(n), (m, 1))
    still = rng.normal(0, 0.05, (m, n, 2))  # immobile: noise only
    free = np.cumsum(rng.normal(0, np.sqrt(2 * 0.2), (m, n, 2)), axis=1) + rng.normal(0, 0.05, (m, n, 2))
    flow = np.arange(n)[None, :, None] * np.array([0.8, 0.3]) + rng.normal(0, 0.1, (m, n, 2))
    for pos, expected in ((still, "immobile"), (free, "free"), (flow, "directed")):
        series = displacement_series(frames, pos[:, :, 0], pos[:, :, 1], np.full((m, n), 0.05))
        est = estimate_batch(series, 0.0, "mle", exposure_frames=0.0, psf_sigma_px=1.0)
        alpha, regime = segment_properties(frames, pos[:, :, 0], pos[:, :, 1], est.sigma2, est.D, est.D_err, 1e-4)
        assert np.mean(np.asarray(REGIME_LABELS)[regime] == expected) > 0.85, expected
        if expected == "free":
            assert np.median(alpha) == pytest.approx(1.0, abs=0.1)


def test_grouped_batch_gives_each_group_what_a_separate_batch_gives() -> None:
    # Three batches in one call: right uncertainties, uncertainties 1.5x too small (the pooled
    # check rejects the whole group), and 8 % too small (the pooled kappa correction refits the
    # group). Each group must come out as its own call (to rounding: only the padding width of
    # the vectorized recursion differs), so batching the change-point segments of many frames
    # does not change the statistics.
    blur = _blur(1.0)
    kw = {"exposure_frames": 1.0, "psf_sigma_px": 1.0}
    parts = []
    for seed, m, n_frames, factor in ((20, 40, 41, 1.0), (21, 30, 61, 1.5), (22, 200, 31, 1.08)):
        frames, x, y = _tracks(seed, m, n_frames, 0.05, 0.15)
        parts.append(displacement_series(frames, x, y, np.full(x.shape, 0.15 / factor)))
    alone = [estimate_batch(p, blur, "auto", **kw) for p in parts]  # type: ignore[arg-type]
    assert (alone[1].method == METHOD_CODE["cve"]).all()  # the pooled check rejected group 1
    width = max(p.dx.shape[1] for p in parts)

    def pad(a: np.ndarray, value: float) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

    merged = type(parts[0])(
        *(np.concatenate([pad(getattr(p, f), v) for p in parts]) for f, v in (
            ("dx", 0.0), ("dy", 0.0), ("gap", 0), ("s_start", np.nan), ("s_end", np.nan))),
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("n", "frame_start", "frame_end")),
    )
    groups = np.repeat(np.arange(3), [p.n.size for p in parts])
    together = estimate_batch(merged, blur, "auto", groups=groups, **kw)  # type: ignore[arg-type]
    for g, ref in enumerate(alone):
        sel = groups == g
        np.testing.assert_array_equal(together.method[sel], ref.method)
        for f in ("D", "D_err", "D_crlb_var", "sigma2"):
            np.testing.assert_allclose(getattr(together, f)[sel], getattr(ref, f), rtol=1e-9, equal_nan=True)
    # Merged without groups, group 1's miscalibration spreads to the others: the labels matter.
    pooled = estimate_batch(merged, blur, "auto", **kw)  # type: ignore[arg-type]
    assert not np.array_equal(pooled.method, together.method)


def test_compiled_likelihood_gives_the_numpy_code_to_rounding() -> None:
    pytest.importorskip("numba")
    import scopestream.plugins._diffusion_mle as mle

    rng = np.random.default_rng(3)
    m, L = 7, 40
    frames = np.tile(np.arange(L), (m, 1))
    frames[2, 10:15] = -1
    x, y = rng.normal(size=(m, L)).cumsum(1), rng.normal(size=(m, L)).cumsum(1)
    series = displacement_series(frames, x, y, rng.uniform(0.1, 0.4, (m, L)))
    for kind in ("known", "scaled", "common"):
        model = build_model(series, 0.12, kind, 0.05)  # type: ignore[arg-type]
        theta = rng.uniform(0.5, 1.5, (m, model.n_params))
        assert mle._compiled_recursion() is not None
        compiled = evaluate(model, theta)
        saved = list(mle._KERNEL)
        mle._KERNEL[:] = [None]  # the numpy loop
        try:
            reference = evaluate(model, theta)
        finally:
            mle._KERNEL[:] = saved
        # Same operations in the same order; only log may differ in the last bit.
        for a, b in zip(compiled, reference, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)
