"""Calibration of ``localize``'s reported uncertainties, static and for moving (motion-blurred) particles.

The numbers are a table, ``_loc_calibration.json`` beside this module, written by the
calibration run against the widefield simulator's exact truth::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibrate_localization.py --write

(never typed in by hand; the JSON keeps the command, the date, the rows measured and the fits'
chi-square). Two parts:

- **static**: the Poisson MLE of a fixed-width Gaussian is above its asymptotic (Mortensen)
  bound by a factor that grows as the spot gets fainter: ``f(q) = c0 + c1 q`` with
  ``q = var_raw / (s^2 + 1/12)`` (the raw variance over the pixelated PSF variance, ~ 1 /
  effective photons). ``localize`` (method ``mle``) reports ``sqrt(f(q) var_raw)``:
  :func:`static_variance_factor`.
- **blur**: a particle that moves during the exposure makes a wider, asymmetric spot, and the
  fit's error grows in two ways: the photon noise acts on a wider spot (variance factor
  ``1 + a u``) and the fitted centre of an asymmetric blurred spot departs from the
  exposure-mean position by an amount that does not shrink with photons (added variance
  ``b s^2 u^4``), with ``u = D t_E / s^2`` (D px^2/frame, t_E the exposure in frames, s the PSF
  SD px). ``localize`` does not know D; the diffusion MLE applies these at its D
  (:func:`calibrated_variance_px2` of the reported, statically calibrated, uncertainty).

``a u`` is linear in D, so the diffusion likelihood takes it exactly (``gamma = a t_E / s^2``,
see :func:`scopestream.plugins._diffusion_mle.build_model`); the small ``u^4`` term is added at
the current estimate of D.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = [
    "TABLE_PATH",
    "STATIC_C0",
    "STATIC_C1",
    "BLUR_VARIANCE_FACTOR",
    "BLUR_ADDED_VARIANCE",
    "static_variance_factor",
    "blur_gamma",
    "added_variance_px2",
    "calibrated_variance_px2",
]

#: The calibration table (written by ``benchmarks/calibrate_localization.py --write``).
TABLE_PATH = Path(__file__).resolve().with_name("_loc_calibration.json")
_TABLE = json.loads(TABLE_PATH.read_text())

#: ``c0``, ``c1``: the static variance factor ``f(q) = c0 + c1 q``.
STATIC_C0 = float(_TABLE["static"]["c0"])
STATIC_C1 = float(_TABLE["static"]["c1"])
#: ``a``: variance factor per unit u (photon-noise part).
BLUR_VARIANCE_FACTOR = float(_TABLE["blur"]["a"])
#: ``b``: added variance per s^2 u^4 (model-mismatch part).
BLUR_ADDED_VARIANCE = float(_TABLE["blur"]["b"])


def static_variance_factor(raw_variance_px2: np.ndarray, psf_sigma_px: np.ndarray | float) -> np.ndarray:
    """``f(q) = c0 + c1 q``, ``q = raw / (s^2 + 1/12)``: the fit's variance over its Mortensen bound.

    Parameters
    ----------
    raw_variance_px2
        The Mortensen bound of each spot (one axis), px^2.
    psf_sigma_px
        The PSF SD of the fit, px.
    """
    sa2 = np.asarray(psf_sigma_px, dtype=np.float64) ** 2 + 1.0 / 12.0
    return STATIC_C0 + STATIC_C1 * np.asarray(raw_variance_px2, dtype=np.float64) / sa2


def blur_gamma(exposure_frames: float, psf_sigma_px: float) -> float:
    """``gamma`` such that the photon-noise variance is ``reported^2 (1 + gamma D)``, per px^2/frame."""
    return BLUR_VARIANCE_FACTOR * exposure_frames / psf_sigma_px**2


def added_variance_px2(D_px2_per_frame: np.ndarray | float, exposure_frames: float, psf_sigma_px: float) -> np.ndarray:
    """The photon-independent variance ``b s^2 u^4`` at D (0 for D <= 0 or NaN)."""
    d = np.nan_to_num(np.maximum(np.asarray(D_px2_per_frame, dtype=np.float64), 0.0))
    u = d * exposure_frames / psf_sigma_px**2
    return np.asarray(BLUR_ADDED_VARIANCE * psf_sigma_px**2 * u**4)


def calibrated_variance_px2(
    uncertainty_px: np.ndarray, D_px2_per_frame: np.ndarray | float, exposure_frames: float, psf_sigma_px: float
) -> np.ndarray:
    """The calibrated localization variance of spots of a particle with diffusion coefficient D.

    Parameters
    ----------
    uncertainty_px
        What ``localize`` reported (one axis, SD).
    D_px2_per_frame
        The particle's diffusion coefficient (broadcast against ``uncertainty_px``).
    exposure_frames
        Exposure time over frame interval.
    psf_sigma_px
        The PSF SD ``localize`` fitted with.
    """
    d = np.nan_to_num(np.maximum(np.asarray(D_px2_per_frame, dtype=np.float64), 0.0))
    unc = np.asarray(uncertainty_px, dtype=np.float64)
    return unc**2 * (1.0 + blur_gamma(exposure_frames, psf_sigma_px) * d) + added_variance_px2(d, exposure_frames, psf_sigma_px)
