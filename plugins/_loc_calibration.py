"""Calibration of ``localize``'s reported uncertainties for moving (motion-blurred) particles.

``localize`` reports the Mortensen et al. (2010) bound of a fixed-width Gaussian fit. A particle
that moves during the exposure makes a wider, asymmetric spot, and the fit's error grows in two
ways (measured against the widefield simulator's exact truth by
``benchmarks/calibrate_localization.py``; 500-4000 photons, background 10 photons/px, PSF SD
0.77 px, D 0-0.8 px^2/frame, ~1500 spots per row):

- the photon noise acts on a wider spot: variance factor ``1 + a u``;
- the fitted centre of an asymmetric blurred spot departs from the exposure-mean position by an
  amount that does not shrink with photons: added variance ``b s^2 u^4``;

with ``u = D t_E / s^2`` (D px^2/frame, t_E the exposure in frames, s the PSF SD px). Fitted:
``a = 0.269``, ``b = 0.00094``; after the correction the normalized errors have variance 0.94-1.06
over the whole table (1.13 at u = 1.0, 1000 photons), against 1.0-7.6 before it. Without motion
the reported uncertainties are right (variance 1.03-1.06, i.e. the MLE at 1.01-1.03x the bound).

``a u`` is linear in D, so the diffusion likelihood takes it exactly (``gamma = a t_E / s^2``,
see :func:`scopestream.plugins._diffusion_mle.build_model`); the small ``u^4`` term is added at
the current estimate of D.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLUR_VARIANCE_FACTOR", "BLUR_ADDED_VARIANCE", "blur_gamma", "added_variance_px2", "calibrated_variance_px2"]

#: ``a``: variance factor per unit u (photon-noise part).
BLUR_VARIANCE_FACTOR = 0.269
#: ``b``: added variance per s^2 u^4 (model-mismatch part).
BLUR_ADDED_VARIANCE = 0.00094


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
