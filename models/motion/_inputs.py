"""What the motion-state networks read: one MUSICAL image and one track-feature vector per window.

Training (:mod:`scopestream.models.motion._data`) and serving (the ``motion`` stage) both call
:func:`window_inputs`, so the networks see identical inputs in both. A window is what the engine's
:class:`~scopestream.daemon._products.TrackWindow` holds: the region's pixels ``(K, h, w)`` in
camera values and the track's positions ``(K, 2)`` (x, y px, NaN where the track had no detection).

Image branch: :func:`scopestream.plugins.musical.musical_image` of the region (the same code the
live ``musical`` stage runs; the region divided by its own maximum, threshold and alpha as in
:class:`InputSpec`), then ``log10(image / max + 1e-6) / 6 + 1`` clipped to [0, 1] (the indicator
spans many decades at alpha 4: a log keeps the faint ring of a Circ orbit visible next to its
brightest sub-pixel).

Feature branch (:data:`FEATURE_NAMES`): translation- and rotation-invariant numbers from the
positions, in nm and frames so that the pixel size may differ from training:
CVE diffusion coefficient and localization variance (Vestergaard et al. 2014), MSD at several lags
and its exponent, radius of gyration, confinement radius, ring-ness, straightness, turning angle,
angular speed about the centroid, velocity autocorrelation, detected fraction, window length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["FEATURE_NAMES", "InputSpec", "WindowInputs", "prepare_image", "track_features", "window_inputs"]

FEATURE_NAMES: tuple[str, ...] = (
    "detected_fraction",
    "log_k_frames",
    "log_step_nm",
    "log_cve_D_nm2_per_frame",
    "log_cve_sigma2_nm2",
    "log_msd1_nm2",
    "log_msd4_nm2",
    "log_msd16_nm2",
    "msd_exponent",
    "log_msd_ratio_16_1",
    "log_radius_gyration_nm",
    "log_confinement_radius_nm",
    "ringness",
    "straightness",
    "log_end_to_end_nm",
    "mean_cos_turn",
    "abs_mean_sin_turn",
    "abs_mean_angular_speed_rad",
    "angular_consistency",
    "velocity_autocorr_1",
    "velocity_autocorr_2",
    "velocity_autocorr_5",
)
"""Names of the track features, in the order of :func:`track_features`' output."""

_LOG_EPS = 1.0  # nm or nm²: added before log10 so that zero motion stays finite


@dataclass(frozen=True)
class InputSpec:
    """How a window becomes network inputs; stored in the model card and checked when loading.

    Attributes
    ----------
    region_px
        Side of the square region around the track, px (the live ``musical`` stage's ``region_px``).
    subpixels
        MUSICAL sub-pixels per pixel; the image is ``region_px · subpixels`` square.
    wavelength_nm, na, pixel_size_nm
        Optics of MUSICAL's PSF model and of the nm conversion of the features.
    threshold_log10, alpha
        MUSICAL threshold and indicator exponent.
    """

    region_px: int = 25
    subpixels: int = 4
    wavelength_nm: float = 510.0
    na: float = 1.4
    pixel_size_nm: float = 100.0
    threshold_log10: float = -1.0
    alpha: float = 4.0

    @property
    def image_px(self) -> int:
        """Side of the network's image input, sub-pixels."""
        return self.region_px * self.subpixels

    def to_dict(self) -> dict[str, float | int]:
        """Plain data for the model card."""
        return asdict(self)


@dataclass(frozen=True)
class WindowInputs:
    """The inputs of one window: ``image`` float32 ``(S, S)`` in [0, 1]; ``features`` float32 ``(F,)``."""

    image: np.ndarray
    features: np.ndarray


def prepare_image(musical: np.ndarray) -> np.ndarray:
    """A MUSICAL indicator image -> the network's image input (float32 in [0, 1]).

    Raises
    ------
    ValueError
        If the image has no positive finite value.
    """
    img = np.asarray(musical, dtype=np.float64)
    peak = float(np.max(img)) if img.size else 0.0
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(f"MUSICAL image has no positive finite value (max {peak})")
    out = np.log10(np.clip(img / peak, 0.0, 1.0) + 1e-6) / 6.0 + 1.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _slog(value: float) -> float:
    """log10(1 + |v|) with the sign of v (finite for any finite v)."""
    return math.copysign(math.log10(1.0 + abs(value)), value)


def _msd(p: np.ndarray, lag: int) -> float:
    if lag >= p.shape[0]:
        return math.nan
    d = p[lag:] - p[:-lag]
    ok = np.isfinite(d[:, 0])
    if ok.sum() < 1:
        return math.nan
    return float(np.mean(np.sum(d[ok] ** 2, axis=1)))


def track_features(positions_px: np.ndarray, pixel_size_nm: float, blur_r: float = 1.0 / 6.0) -> np.ndarray:
    """Track features of one window (:data:`FEATURE_NAMES`), float32, always finite.

    Parameters
    ----------
    positions_px
        ``(K, 2)`` x, y in camera pixels, NaN in frames without a detection.
    pixel_size_nm
        Sample-plane pixel size, nm.
    blur_r
        Motion-blur coefficient R of the CVE (``exposure / (6 · frame interval)``; 1/6 for a
        continuously exposed camera).

    Returns
    -------
    (F,) float32
        Undefined quantities (too few detections) are 0, the value of a motionless track.
    """
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] < 2:
        raise ValueError(f"positions must be (K >= 2, 2), got shape {pos.shape}")
    k = pos.shape[0]
    p = pos * float(pixel_size_nm)
    valid = np.isfinite(p).all(axis=1)
    p[~valid] = np.nan
    n_valid = int(valid.sum())
    f: dict[str, float] = dict.fromkeys(FEATURE_NAMES, 0.0)
    f["detected_fraction"] = n_valid / k
    f["log_k_frames"] = math.log10(k)
    if n_valid >= 3:
        d = p[1:] - p[:-1]
        okd = np.isfinite(d[:, 0])
        steps = d[okd]
        if steps.shape[0] >= 1:
            lengths = np.hypot(steps[:, 0], steps[:, 1])
            f["log_step_nm"] = math.log10(_LOG_EPS + float(lengths.mean()))
            # CVE per axis, averaged (frame interval = 1 frame).
            sq = float(np.mean(steps**2))
            both = okd[1:] & okd[:-1]
            cov = float(np.mean(d[1:][both] * d[:-1][both])) if both.any() else 0.0
            f["log_cve_D_nm2_per_frame"] = _slog(sq / 2.0 + cov)
            f["log_cve_sigma2_nm2"] = _slog(blur_r * sq + (2 * blur_r - 1) * cov)
            if both.any():
                a, b = d[:-1][both], d[1:][both]
                la, lb = np.hypot(a[:, 0], a[:, 1]), np.hypot(b[:, 0], b[:, 1])
                nz = (la > 0) & (lb > 0)
                if nz.any():
                    cos = np.sum(a[nz] * b[nz], axis=1) / (la[nz] * lb[nz])
                    sin = (a[nz, 0] * b[nz, 1] - a[nz, 1] * b[nz, 0]) / (la[nz] * lb[nz])
                    f["mean_cos_turn"] = float(cos.mean())
                    f["abs_mean_sin_turn"] = abs(float(sin.mean()))
            denom = float(np.mean(np.sum(steps**2, axis=1)))
            if denom > 0:
                for lag, name in ((1, "velocity_autocorr_1"), (2, "velocity_autocorr_2"), (5, "velocity_autocorr_5")):
                    if lag < d.shape[0]:
                        prod = np.sum(d[lag:] * d[:-lag], axis=1)
                        okp = np.isfinite(prod)
                        if okp.any():
                            f[name] = float(prod[okp].mean()) / denom
        msd = {lag: _msd(p, lag) for lag in (1, 2, 4, 8, 16)}
        for lag, name in ((1, "log_msd1_nm2"), (4, "log_msd4_nm2"), (16, "log_msd16_nm2")):
            if math.isfinite(msd[lag]):
                f[name] = math.log10(_LOG_EPS + msd[lag])
        lags = [lag for lag, v in msd.items() if math.isfinite(v) and v > 0 and lag <= max(1, k // 4)]
        if len(lags) >= 2:
            x = np.log10(lags)
            y = np.log10([msd[lag] for lag in lags])
            f["msd_exponent"] = float(np.polyfit(x, y, 1)[0])
        if math.isfinite(msd[16]) and math.isfinite(msd[1]):
            f["log_msd_ratio_16_1"] = math.log10((_LOG_EPS + msd[16]) / (_LOG_EPS + msd[1]))
        q = p[valid]
        c = q.mean(axis=0)
        r = np.hypot(q[:, 0] - c[0], q[:, 1] - c[1])
        f["log_radius_gyration_nm"] = math.log10(_LOG_EPS + float(np.sqrt(np.mean(r**2))))
        f["log_confinement_radius_nm"] = math.log10(_LOG_EPS + float(r.max()))
        f["ringness"] = float(r.std() / r.mean()) if r.mean() > 0 else 0.0
        path = float(np.sum(np.hypot(steps[:, 0], steps[:, 1]))) if steps.shape[0] else 0.0
        end = float(np.hypot(*(q[-1] - q[0])))
        f["log_end_to_end_nm"] = math.log10(_LOG_EPS + end)
        f["straightness"] = end / path if path > 0 else 0.0
        phi = np.arctan2(p[:, 1] - c[1], p[:, 0] - c[0])
        dphi = np.angle(np.exp(1j * (phi[1:] - phi[:-1])))
        okphi = np.isfinite(dphi)
        if okphi.any():
            mean_abs = float(np.mean(np.abs(dphi[okphi])))
            mean = float(np.mean(dphi[okphi]))
            f["abs_mean_angular_speed_rad"] = abs(mean)
            f["angular_consistency"] = abs(mean) / mean_abs if mean_abs > 0 else 0.0
    out = np.array([f[name] for name in FEATURE_NAMES], dtype=np.float32)
    out[~np.isfinite(out)] = 0.0
    return out


def window_inputs(pixels: np.ndarray, positions_px: np.ndarray, spec: InputSpec) -> WindowInputs:
    """The network inputs of one window (image and features).

    Parameters
    ----------
    pixels
        ``(K, h, w)`` region in camera values; ``h = w = spec.region_px``.
    positions_px
        ``(K, 2)`` the track's x, y, px, NaN where it had no detection.
    spec
        How to compute them (the model card's).

    Raises
    ------
    ValueError
        Naming the problem: wrong shape, NaN or infinite pixels, a constant region, no detection.
    """
    from scopestream.plugins.musical import musical_image

    data = np.asarray(pixels)
    if data.ndim != 3 or data.shape[1:] != (spec.region_px, spec.region_px):
        raise ValueError(
            f"window pixels must be (K, {spec.region_px}, {spec.region_px}) for this model, got {data.shape}"
        )
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.shape != (data.shape[0], 2):
        raise ValueError(f"window positions must be ({data.shape[0]}, 2), got {pos.shape}")
    if not np.isfinite(pos).all(axis=1).any():
        raise ValueError("the window has no detection of its track (all positions NaN)")
    result = musical_image(
        data, wavelength_nm=spec.wavelength_nm, na=spec.na, pixel_size_nm=spec.pixel_size_nm,
        subpixels=spec.subpixels, threshold=spec.threshold_log10, alpha=spec.alpha,
    )
    return WindowInputs(prepare_image(result.image), track_features(pos, spec.pixel_size_nm))
