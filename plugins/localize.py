"""Spot detection and sub-pixel localization at the Cramér-Rao bound, per frame.

Pipeline for one frame (all vectorized; no Python loop over pixels or spots):

1. Camera model: ADU -> photons, ``(adu - offset_adu) * gain_e_per_adu / em_gain``.
2. Detection: band-pass = Gaussian smoothing at the PSF width (matched filter) minus a box mean
   (the local background; removes uneven illumination). The noise of the band-passed image at
   a pixel is proportional to ``sqrt(local background + read variance)`` (Poisson); the constant
   is measured robustly on every frame (median absolute deviation of the normalized band-pass),
   so a mis-set gain or non-Poisson noise is absorbed. A spot is a local maximum within
   ``min_separation_px`` whose band-pass exceeds ``threshold_snr`` times its local noise.
   There is no fixed spot count.
3. Localization in a ``roi_px`` square around each maximum (shifted inward at the image edges):
   - ``"mle"``: Poisson maximum likelihood of a pixel-integrated Gaussian (x, y, photons,
     background, optionally sigma), batched Fisher scoring / Levenberg-Marquardt
     (:mod:`scopestream.plugins._gaussian_mle`). sCMOS/CCD read noise enters through the
     shift trick of Huang et al. (2013): read-noise variance (photons^2) is added to data and
     model. EMCCD excess noise (F = 2) is not modelled in the likelihood (positions stay
     unbiased); it enters the reported uncertainty.
   - ``"radial_symmetry"``: Parthasarathy (2012), ~10x faster, slightly less precise;
     photons and background from the region (sum minus border median).
   - ``"network"``: detection and localization together by a learned network
     (:mod:`scopestream.plugins._loc_network`; shipped models for the scanning two-photon and the
     widefield camera, ``scopestream train localize``): for scan-blurred and low-signal spots, where
     the still-Gaussian model of the MLE fails. Steps 2 and 4 are the network's (heat-map maxima
     above ``network_threshold``; the predicted standard error). Default with the simulated
     scanning camera.
4. Uncertainty: every localization reports ``uncertainty_px``, the Mortensen et al. (2010)
   bound for the MLE, ``sqrt(F sa^2/N [1 + int_0^1 ln t/(1 + t/tau) dt]^-1)``, evaluated at
   the fitted photons, background (+ read variance) and sigma; for ``"mle"`` times the square
   root of the static calibration factor ``f(q)`` measured against the simulator's truth (the
   fit is above its asymptotic bound for faint spots, :mod:`scopestream.plugins._loc_calibration`),
   so that the normalized errors of still spots have ``mean z^2 = 1``. Motion blur widens
   the error further; the diffusion estimator corrects for it at its D.

Batch API: :func:`locate` (like ``trackpy.locate``). Tables are pandas DataFrames when pandas
can be imported, else dicts of 1-D numpy arrays (pandas is not a dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator
from scipy.spatial import cKDTree

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import LOCALIZATION_COLUMNS, Localizations, Products
from scopestream.daemon._stage import Emission, RunContext, StagePlugin
from scopestream.daemon._tables import as_table
from scopestream.plugins._gaussian_mle import (
    _border_background,
    fit_mle,
    mortensen_mle_variance_px2,
    radial_symmetry_centres,
)
from scopestream.plugins._loc_calibration import static_variance_factor

__all__ = [
    "LocalizeSettings",
    "LocalizationsBody",
    "Localizations",
    "Localizer",
    "LocalizeStage",
    "as_table",
    "locate",
    "PLUGIN",
]

_COLUMNS = LOCALIZATION_COLUMNS


class LocalizeSettings(BaseModel):
    """Settings of the ``localize`` stage (configuration section ``localize``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    method: Literal["mle", "radial_symmetry", "network"] = Field(
        "mle",
        description=(
            "Estimator: 'mle' (Poisson maximum likelihood, at the Cramér-Rao bound), 'radial_symmetry' (Parthasarathy 2012, "
            "faster) or 'network' (the learned detector/localizer of network_model: scan-blurred and low-signal spots). "
            "Default 'mle', except with the simulated scanning camera (source.mm_config 'simulated-scanning'): 'network'."
        ),
    )
    network_model: str = Field(
        "auto",
        description=(
            "Model folder of method 'network': 'scanning' or 'widefield' (the shipped models/weights/localize_<camera>), "
            "a folder path, or 'auto' ('scanning' with the simulated scanning camera, else 'widefield')."
        ),
    )
    network_threshold: float = Field(
        0.5, ge=0.01, le=1.0, description="Method 'network': smallest heat-map confidence of a detection (0-1)."
    )
    network_refine: Literal["auto", "none", "mle"] = Field(
        "auto",
        description=(
            "Method 'network': 'mle' refines each detection with the Poisson MLE of a still Gaussian spot of psf_sigma_px "
            "started at the network's position (the hybrid: at the Cramér-Rao bound on bright still spots); 'none' keeps the "
            "network's positions (scan-blurred spots); 'auto': 'mle' with a widefield model, 'none' with a scanning one."
        ),
    )
    network_backend: Literal["onnxruntime", "torch", "tensorrt"] = Field(
        "onnxruntime", description="Method 'network': inference backend (TensorRT needs an NVIDIA GPU and the tensorrt package)."
    )
    network_device: str = Field("cpu", description="Method 'network': device of the torch / TensorRT backend ('cpu', 'cuda', 'cuda:1').")
    network_threads: int = Field(1, ge=1, le=64, description="Method 'network': threads of one inference (ONNX Runtime intra-op, torch CPU).")
    network_batch_frames: int = Field(
        8, ge=1, le=64,
        description=(
            "Method 'network': when frames wait for analysis (the daemon is behind), run the network on up to this many "
            "of them in one batch (1: never batch). A live daemon that keeps up runs it frame by frame."
        ),
    )
    psf_sigma_px: float | None = Field(
        None, gt=0.3, le=20,
        description="PSF standard deviation, px; None: 0.21 * optics.wavelength_nm / optics.na / optics.pixel_size_nm.",
    )
    fit_sigma: bool = Field(False, description="Fit the PSF width per spot (MLE only); otherwise it is held at psf_sigma_px.")
    roi_px: int | None = Field(
        None, ge=3, le=41,
        description="Side of the square fitting region, px; None: 2 * round(2.5 * sigma) + 1, at least 5 (costs < 0.5 % in precision against an unbounded region).",
    )
    threshold_snr: float = Field(
        5.0, gt=0, le=1e6,
        description="Detection threshold: band-passed peak over its local noise standard deviation (dimensionless).",
    )
    min_separation_px: float = Field(
        3.0, ge=1, le=1000,
        description="Two maxima closer than this (Chebyshev distance, px) count as one spot; the brighter is kept.",
    )
    max_iterations: int = Field(12, ge=1, le=200, description="Iteration cap of the MLE fit.")
    tolerance_px: float = Field(
        3e-2, gt=0, le=10,
        description=(
            "MLE stops when the RMS position step over the frame's spots is below this and none is above 10x this, px "
            "(the error left is ~10x smaller than the last step)."
        ),
    )
    min_photons: float = Field(0.0, ge=0, le=1e12, description="Drop localizations with fewer fitted photons.")
    max_spots: int = Field(100_000, ge=1, le=10_000_000, description="At most this many spots per frame (the brightest are kept).")
    exclude_saturated: bool = Field(
        True, description="Drop spots whose region holds a pixel at or above camera.saturation_adu (their fit would be biased)."
    )

    @model_validator(mode="before")
    @classmethod
    def _network_on_scanning_camera(cls, data: Any, info: ValidationInfo) -> Any:
        """With the simulated scanning camera, 'network' is the default method (scan blur breaks the
        still-Gaussian spot the MLE assumes)."""
        source = (info.context or {}).get("source")
        if (
            isinstance(data, dict)
            and "method" not in data
            and source is not None
            and source.kind == "micromanager"
            and source.mm_config == "simulated-scanning"
        ):
            return {**data, "method": "network"}
        return data


class LocalizationsBody(BaseModel):
    """Body of a ``localizations`` event; the table travels as arrays ``x, y, photons,
    background, sigma, uncertainty_px`` (1-D float64, one element per spot)."""

    model_config = ConfigDict(frozen=True)

    frame_seq: int = Field(description="The frame's daemon sequence number.")
    count: int = Field(description="Number of localizations (length of every array).")
    method: str = Field(description="Estimator used: 'mle', 'radial_symmetry' or 'network'.")
    candidates: int = Field(description="Local maxima above threshold (network: heat-map maxima above network_threshold) before quality checks.")
    rejected_saturated: int = Field(description="Spots dropped because their region held a saturated pixel.")
    rejected_fit: int = Field(description="Spots dropped because the fit left the region or had too few photons.")
    noise_scale: float = Field(
        description="Measured band-pass noise over the Poisson prediction (1 for a well-calibrated camera; dimensionless)."
    )


class Localizer:
    """Detection and localization with fixed camera and optics parameters.

    Parameters
    ----------
    settings
        The stage settings.
    config
        The configuration (camera model and optics); default: the default configuration.
    calibrated
        Report the statically calibrated uncertainty (method ``"mle"``); False: the raw
        Mortensen bound (what the calibration run, ``benchmarks/calibrate_localization.py``,
        measures against).
    """

    def __init__(
        self, settings: LocalizeSettings, config: ScopestreamConfig | None = None, *, calibrated: bool = True
    ) -> None:
        self.calibrated = calibrated
        config = config if config is not None else ScopestreamConfig()
        cam = config.camera
        self.settings = settings
        self._offset_adu = float(cam.offset_adu)
        self._photons_per_adu = float(cam.gain_e_per_adu) / float(cam.em_gain)
        self._read_variance = (float(cam.read_noise_e) / float(cam.em_gain)) ** 2
        self._excess_noise = 2.0 if cam.em_gain > 1.0 else 1.0
        self._saturation_adu = float(cam.saturation_adu)
        #: The camera offset in photons.
        self.offset_photons = self._offset_adu * self._photons_per_adu
        optics = config.optics
        self.sigma_px = (
            settings.psf_sigma_px
            if settings.psf_sigma_px is not None
            else max(0.21 * optics.wavelength_nm / optics.na / optics.pixel_size_nm, 0.5)
        )
        self.roi_px = settings.roi_px if settings.roi_px is not None else max(5, 2 * round(2.5 * self.sigma_px) + 1)
        # Detection boxes: smoothing side ~2.2 sigma (odd, >= 3); background side 3x that.
        self._smooth_px = max(3, 2 * int(round(1.1 * self.sigma_px)) + 1)
        self._pad_px = 3 * self._smooth_px // 2 + 1
        self._buf: np.ndarray | None = None
        self._work: dict[str, np.ndarray] = {}

    # -- detection ----------------------------------------------------------------------

    def _padded_frame(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The frame in ADU as float32 (a reused mirror-padded buffer) and the mask of
        non-finite pixels (or None). Photons are ``adu * photons_per_adu - offset_photons``;
        the conversion is applied where absolute levels matter (thresholds, local background,
        fit regions), not to every pixel."""
        h, w = image.shape
        p = self._pad_px
        if self._buf is None or self._buf.shape != (h + 2 * p, w + 2 * p):
            self._buf = np.empty((h + 2 * p, w + 2 * p), dtype=np.float32)
        buf = self._buf
        inner = buf[p : p + h, p : p + w]
        # float32 arithmetic throughout; a plain cast is the cheapest pass over the frame.
        np.copyto(inner, image, casting="unsafe")
        bad = None
        if image.dtype.kind == "f":
            finite = np.isfinite(inner)
            if not finite.all():
                if not finite.any():
                    raise ValueError("no finite pixel in the frame")
                bad = ~finite
                inner[bad] = np.median(inner[finite])
        # Mirror the border (like scipy.ndimage mode 'mirror') so spots at the edge are found.
        if h > p and w > p:
            buf[:p, p : p + w] = inner[p:0:-1]
            buf[p + h :, p : p + w] = inner[h - 2 : h - 2 - p : -1]
            buf[:, :p] = buf[:, 2 * p : p : -1]
            buf[:, p + w :] = buf[:, p + w - 2 : w - 2 : -1]
        else:
            buf[...] = np.pad(inner, p, mode="edge")
        return buf, bad

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A reused float32 work array (allocated once per frame shape)."""
        buf = self._work.get(name)
        if buf is None or buf.shape != shape:
            buf = np.empty(shape, dtype=np.float32)
            self._work[name] = buf
        return buf

    def _band_pass(self, padded: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Band-pass and local background sums of a padded photon image.

        Smoothing: a box of side s (about 2.2 sigma, odd) - 85-90 % of the matched-filter SNR
        for a Gaussian PSF. Background: the box of side 3 s around it, the sum of the 3 x 3
        small boxes on a grid of step s, so both cost a few additions per pixel: 10 passes over
        the frame, into reused buffers. Every pass works on the flattened padded frame (a
        shift by one column is a shift by one element, by one row a shift by the padded
        width), which keeps the additions on long contiguous runs; the padding (at least
        ``s + s // 2`` px) keeps every box inside its own row.

        Returns
        -------
        band
            Padded-frame array (same shape as ``padded``) holding ``9 * box_s - box_3s`` (sums,
            photons; the band-pass mean difference times ``9 s^2``) on the image pixels and
            -inf elsewhere.
        box9
            Padded-frame array holding the sum over the box of side 3 s on the image rows; the
            local background is ``box9 / (9 s^2)``.
        """
        s = self._smooth_px
        half = s // 2
        p = self._pad_px
        wp = padded.shape[1]
        size = padded.size
        pf = padded.reshape(-1)
        # Three work buffers (fewer passes through the cache): c3 and later v9 share one, the
        # band-pass is written over b3.
        c3 = v9 = self._buffer("c3_v9", (size,))
        b3 = self._buffer("b3_band", (size,))
        box9 = self._buffer("box9", (size,))
        lo, hi = p * wp, (p + h) * wp  # the image rows (all columns)
        lo_v9, hi_v9 = lo - s, hi + s
        lo_b3, hi_b3 = lo_v9 - s * wp, hi_v9 + s * wp
        lo_c3, hi_c3 = lo_b3 - half, hi_b3 + half
        # c3: vertical sums of s pixels; b3: horizontal sums of c3 (the s x s box).
        np.add(pf[lo_c3 - half * wp : hi_c3 - half * wp], pf[lo_c3 - half * wp + wp : hi_c3 - half * wp + wp], out=c3[lo_c3:hi_c3])
        for k in range(2 - half, half + 1):
            c3[lo_c3:hi_c3] += pf[lo_c3 + k * wp : hi_c3 + k * wp]
        np.add(c3[lo_b3 - half : hi_b3 - half], c3[lo_b3 - half + 1 : hi_b3 - half + 1], out=b3[lo_b3:hi_b3])
        for k in range(2 - half, half + 1):
            b3[lo_b3:hi_b3] += c3[lo_b3 + k : hi_b3 + k]
        # v9, box9: the 3 x 3 grid of s x s boxes (step s), first vertically, then horizontally.
        np.add(b3[lo_v9 - s * wp : hi_v9 - s * wp], b3[lo_v9:hi_v9], out=v9[lo_v9:hi_v9])
        v9[lo_v9:hi_v9] += b3[lo_v9 + s * wp : hi_v9 + s * wp]
        np.add(v9[lo - s : hi - s], v9[lo:hi], out=box9[lo:hi])
        box9[lo:hi] += v9[lo + s : hi + s]
        band = b3
        band[lo:hi] *= np.float32(9.0)
        band[lo:hi] -= box9[lo:hi]
        # Outside the image the band-pass is -inf (never a candidate, never a larger neighbour).
        band[:lo] = -np.inf
        band[hi:] = -np.inf
        band2d = band.reshape(padded.shape)
        band2d[p : p + h, :p] = -np.inf
        band2d[p : p + h, p + w :] = -np.inf
        return band2d, box9.reshape(padded.shape)

    def detect(self, padded: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Rows and columns of the spots in a (padded) photon image, and the noise scale."""
        s = self.settings
        framed, box9 = self._band_pass(padded, h, w)
        p = self._pad_px
        wp = framed.shape[1]
        # framed and box9 hold sums in ADU; framed * to_mean is the band-pass mean difference
        # and box9 * to_mean - offset_photons the local background, in photons (per px).
        to_mean = self._photons_per_adu / (9 * self._smooth_px**2)
        var_floor = self._read_variance + 1.0
        # Robust noise scale on a strided sample of ~4096 pixels (relative standard error of the
        # MAD ~2 %): spots are sparse, so the MAD ignores them.
        st = max(1, int(math.sqrt(h * w / 4096.0)))
        sub_bg = box9[p : p + h : st, p : p + w : st] * np.float32(to_mean) - np.float32(self.offset_photons)
        sub_band = framed[p : p + h : st, p : p + w : st] * np.float32(to_mean)
        normalized = (sub_band / np.sqrt(np.maximum(sub_bg, 0.0) + var_floor)).ravel()
        # The band-pass of any locally linear background has expectation 0, so the MAD is taken
        # about 0 (one median instead of two; within 0.6 % of the MAD about the median on
        # flat, dim and graded test frames).
        scale = 1.4826 * float(_median(np.abs(normalized)))
        if not scale > 0:
            scale = float(normalized.std())
        if not scale > 0 or not np.isfinite(scale):
            return np.empty(0, np.intp), np.empty(0, np.intp), 0.0
        low_bg = max(float(sub_bg.min()), 0.0)
        t_low = s.threshold_snr * scale * math.sqrt(low_bg + var_floor) / to_mean
        # Candidates: pixels above the lowest threshold (outside the image the band is -inf)
        # that are 3x3 local maxima (tested only at these sparse pixels).
        framed_flat = framed.reshape(-1)
        fi = p * wp + np.flatnonzero(framed_flat[p * wp : (p + h) * wp] > t_low)
        if fi.size == 0:
            return np.empty(0, np.intp), np.empty(0, np.intp), scale
        peak = framed_flat[fi]
        # Most pixels above the threshold sit on a spot's flank: the two row neighbours rule
        # them out cheaply, and the full 8-neighbour test runs on the few left.
        flank = (peak >= framed_flat[fi - 1]) & (peak >= framed_flat[fi + 1])
        fi, peak = fi[flank], peak[flank]
        fi = fi[peak >= framed_flat[fi[:, None] + _ring_offsets(wp)].max(axis=1)]
        rows, cols = np.divmod(fi, wp)
        rows -= p
        cols -= p
        values = framed_flat[fi].astype(np.float64) * to_mean
        # The threshold at each maximum, from its local background. Near the border the
        # mirrored padding counts some pixels twice, which raises the band-pass noise there; the
        # exact white-noise variance factor corrects the threshold.
        edge = _edge_variance_factor(rows, cols, h, w, self._smooth_px, self._pad_px)
        local_bg = box9.reshape(-1)[fi].astype(np.float64) * to_mean - self.offset_photons
        noise_var = (np.maximum(local_bg, 0.0) + var_floor) * edge
        keep = values > s.threshold_snr * scale * np.sqrt(noise_var)
        rows, cols, values = rows[keep], cols[keep], values[keep]
        rows, cols, values = _enforce_separation(rows, cols, values, self.settings.min_separation_px)
        if rows.size > s.max_spots:
            top = np.argpartition(-values, s.max_spots - 1)[: s.max_spots]
            rows, cols = rows[top], cols[top]
        return rows, cols, scale

    # -- localization -------------------------------------------------------------------

    def localize(self, image: np.ndarray, frame_seq: int = 0) -> Localizations:
        """Detect and localize the spots of one camera frame (ADU).

        Raises
        ------
        ValueError
            If the image is not a non-empty 2-D real array, or has no finite pixel.
        """
        image = _check_image(image)
        h, w = image.shape
        roi = self.roi_px
        if h < roi or w < roi:
            raise ValueError(f"image {image.shape} is smaller than the fitting region ({roi} px)")
        padded, bad = self._padded_frame(image)
        p = self._pad_px
        frame_adu = padded[p : p + h, p : p + w]
        rows, cols, scale = self.detect(padded, h, w)
        n_cand = int(rows.size)
        half = roi // 2
        oy = np.clip(rows - half, 0, h - roi)
        ox = np.clip(cols - half, 0, w - roi)
        rejected_saturated = 0
        # A frame whose maximum is below the saturation level has no saturated region (one
        # quick reduction instead of a gather of every region).
        check_saturation = self.settings.exclude_saturated and not image.max() < self._saturation_adu
        if n_cand and (check_saturation or bad is not None):
            drop = np.zeros(n_cand, dtype=bool)
            if check_saturation:
                # Only the regions' pixels matter (a gather of n x roi^2 values, not a frame pass).
                regions = sliding_window_view(image, (roi, roi))[oy, ox]
                if bad is not None:
                    regions = np.where(np.isnan(regions), -np.inf, regions)
                drop |= regions.max(axis=(1, 2)) >= self._saturation_adu
                rejected_saturated = int(drop.sum())
            if bad is not None:
                drop |= sliding_window_view(bad, (roi, roi))[oy, ox].any(axis=(1, 2))
            oy, ox = oy[~drop], ox[~drop]
            rows, cols = rows[~drop], cols[~drop]
        rois = sliding_window_view(frame_adu, (roi, roi))[oy, ox].astype(np.float64)
        rois *= self._photons_per_adu
        rois -= self.offset_photons
        if self.settings.method == "mle":
            # Start at the vertex of the parabola through the band-pass peak and its neighbours
            # (within ~0.1 px of the optimum at N = 1000): one to two scoring steps fewer than
            # from the centroid.
            band = self._work["b3_band"].reshape(padded.shape)  # from detect, above
            dx, dy = _peak_offsets(band, rows + self._pad_px, cols + self._pad_px)
            fit = fit_mle(
                rois, self.sigma_px, fit_sigma=self.settings.fit_sigma,
                read_variance=self._read_variance, max_iterations=self.settings.max_iterations,
                tolerance_px=self.settings.tolerance_px, start_xy=(cols - ox + dx, rows - oy + dy),
            )
            x, y, n_ph, bg, sig, ok = fit.x_px, fit.y_px, fit.photons, fit.background, fit.sigma_px, fit.converged
        else:
            x, y = radial_symmetry_centres(rois)
            # Radial symmetry is pulled toward the region's centre: re-centre once on the
            # first estimate and recompute.
            oy = np.clip(np.round(y + oy).astype(np.intp) - half, 0, h - roi)
            ox = np.clip(np.round(x + ox).astype(np.intp) - half, 0, w - roi)
            rois = sliding_window_view(frame_adu, (roi, roi))[oy, ox].astype(np.float64)
            rois *= self._photons_per_adu
            rois -= self.offset_photons
            x, y = radial_symmetry_centres(rois)
            bg, n_ph = _border_background(rois)
            sig = np.full(x.shape, self.sigma_px)
            ok = (x > -0.5) & (x < roi - 0.5) & (y > -0.5) & (y < roi - 0.5) & (n_ph > 0)
        ok &= n_ph >= self.settings.min_photons
        x = x + ox
        y = y + oy
        if np.count_nonzero(ok) > 1:
            # Two regions clipped against the same image edge can converge on one spot.
            ok &= ~_duplicates(x, y, n_ph, ok, 0.5 * self.settings.min_separation_px)
        var = mortensen_mle_variance_px2(
            n_ph[ok], bg[ok] + self._read_variance, sig[ok], excess_noise=self._excess_noise
        )
        if self.calibrated and self.settings.method == "mle":
            var = var * static_variance_factor(var, sig[ok])
        return Localizations(
            frame_seq=frame_seq,
            x=x[ok],
            y=y[ok],
            photons=n_ph[ok],
            background=bg[ok],
            sigma=sig[ok],
            uncertainty_px=np.sqrt(var),
            diagnostics={
                "candidates": n_cand,
                "rejected_saturated": rejected_saturated,
                "rejected_fit": int(ok.size - np.count_nonzero(ok)),
                "noise_scale": scale,
            },
        )


def _peak_offsets(band: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel offsets (x, y) of the parabola vertex through each peak of ``band`` and its
    two neighbours per axis, clipped to +-0.5 px (0 where a neighbour is outside the image)."""
    flat = band.reshape(-1)
    i = rows * band.shape[1] + cols
    centre = flat[i].astype(np.float64)
    out = []
    for step in (1, band.shape[1]):
        lo = flat[i - step].astype(np.float64)
        hi = flat[i + step].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            off = 0.5 * (lo - hi) / (lo - 2.0 * centre + hi)
        off = np.where(np.isfinite(off), off, 0.0)
        out.append(np.clip(off, -0.5, 0.5))
    return out[0], out[1]


def _median(values: np.ndarray) -> Any:
    """Median of a 1-D array without NaN, as ``np.median`` computes it (the mean of the two
    middle values for an even count, in the array's dtype), from one partition (``np.median``
    also partitions to find NaN, which costs ten times more on a few thousand values)."""
    m = values.size // 2
    part = np.partition(values, m)
    if values.size % 2:
        return part[m]
    return (part[:m].max() + part[m]) / part.dtype.type(2)


@lru_cache(maxsize=16)
def _ring_offsets(row_stride: int) -> np.ndarray:
    """Flat-index offsets of the 8 neighbours of a pixel in a C-ordered image."""
    dr, dc = np.divmod(np.arange(9), 3)
    offs = (dr - 1) * row_stride + (dc - 1)
    out = offs[offs != 0]
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def _mirror_dots(n: int, s: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position dot products of the effective 1-D box weights (side s and 3 s) under
    mirror padding by p: (a3.a3, a3.a9, a9.a9) for positions 0..n-1."""
    idx = np.arange(-p, n + p)
    idx = np.abs(idx)
    idx = np.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    h = s // 2
    out = np.empty((3, n))
    for r in range(n):
        a3 = np.bincount(idx[p + r - h : p + r + h + 1], minlength=n).astype(np.float64)
        a9 = np.bincount(idx[p + r - h - s : p + r + h + s + 1], minlength=n).astype(np.float64)
        out[:, r] = (a3 @ a3, a3 @ a9, a9 @ a9)
    out.flags.writeable = False
    return out[0], out[1], out[2]


def _edge_variance_factor(rows: np.ndarray, cols: np.ndarray, h: int, w: int, s: int, p: int) -> np.ndarray:
    """Band-pass noise variance at (row, col) relative to the image interior (white noise)."""
    r33, r39, r99 = _mirror_dots(h, s, p)
    c33, c39, c99 = _mirror_dots(w, s, p)
    a, b, c = float(s * s), float(9 * s * s), float(9 * s * s)

    def var(i33: Any, i39: Any, i99: Any, j33: Any, j39: Any, j99: Any) -> Any:
        return i33 * j33 / (a * a) - 2 * i39 * j39 / (a * b) + i99 * j99 / (b * c)

    mid_r, mid_c = h // 2, w // 2
    interior = var(r33[mid_r], r39[mid_r], r99[mid_r], c33[mid_c], c39[mid_c], c99[mid_c])
    out: np.ndarray = var(r33[rows], r39[rows], r99[rows], c33[cols], c39[cols], c99[cols]) / interior
    return out


def _enforce_separation(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, min_separation_px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of two maxima closer than the separation (Chebyshev distance), drop the fainter (on a
    tie, the later in raster order)."""
    if rows.size < 2:
        return rows, cols, values
    reach = math.floor(min_separation_px - 1e-9)  # largest Chebyshev distance that conflicts
    if reach <= 3:
        # Small windows: look every neighbour offset up in the sorted pixel keys.
        wk = int(cols.max()) + 2 * reach + 1
        key = rows.astype(np.int64) * wk + cols
        order = np.argsort(key)
        sorted_key = key[order]
        dr, dc = np.divmod(np.arange((2 * reach + 1) ** 2), 2 * reach + 1)
        offs = (dr - reach) * wk + (dc - reach)
        offs = offs[offs > 0]  # each unordered pair once
        query = key[:, None] + offs[None, :]
        pos = np.minimum(np.searchsorted(sorted_key, query), key.size - 1)
        hit = sorted_key[pos] == query
        i = np.nonzero(hit)[0]
        j = order[pos[hit]]
    else:
        pts = np.column_stack([rows, cols]).astype(np.float64)
        pairs = cKDTree(pts).query_pairs(min_separation_px - 1e-9, p=np.inf, output_type="ndarray")
        i, j = pairs[:, 0], pairs[:, 1]
    if i.size == 0:
        return rows, cols, values
    j_fainter = (values[j] < values[i]) | ((values[j] == values[i]) & (j > i))
    drop = np.zeros(rows.size, dtype=bool)
    drop[np.where(j_fainter, j, i)] = True
    return rows[~drop], cols[~drop], values[~drop]


def _duplicates(x: np.ndarray, y: np.ndarray, photons: np.ndarray, ok: np.ndarray, radius_px: float) -> np.ndarray:
    """Mask of fits within ``radius_px`` of a brighter valid fit."""
    idx = np.flatnonzero(ok)
    pairs = cKDTree(np.column_stack([x[idx], y[idx]])).query_pairs(radius_px, output_type="ndarray")
    dup = np.zeros(x.size, dtype=bool)
    if pairs.size:
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        dup[np.where(photons[j] <= photons[i], j, i)] = True
    return dup


def _check_image(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image (rows, columns), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("the image is empty")
    if arr.dtype.kind not in "uif":
        raise ValueError(f"expected an integer or floating-point image, got dtype {arr.dtype}")
    return arr


# -- stage ----------------------------------------------------------------------------------


def network_model_dir(settings: LocalizeSettings, config: ScopestreamConfig) -> str:
    """The model folder that ``localize.network_model`` names for this configuration."""
    name = settings.network_model
    if name == "auto":
        src = config.source
        name = "scanning" if src.kind == "micromanager" and src.mm_config == "simulated-scanning" else "widefield"
    if name in ("scanning", "widefield"):
        from scopestream.plugins._loc_network import shipped_model_dir

        return str(shipped_model_dir(name))
    return name


def _network_localizer(settings: LocalizeSettings, config: ScopestreamConfig, sigma_px: float) -> Any:
    """A loaded, warmed-up :class:`~scopestream.plugins._loc_network.NetworkLocalizer` (ValueError naming the folder)."""
    from scopestream.models._card import ModelLoadError
    from scopestream.plugins._loc_network import NetworkLocalizer

    model_dir = network_model_dir(settings, config)
    try:
        return NetworkLocalizer(settings, config.camera, sigma_px, model_dir)
    except ModelLoadError as exc:
        raise ValueError(f"localize.method 'network': {exc}") from None


class LocalizeStage:
    """The ``localize`` stage: produces :class:`Localizations` and publishes them on topic
    ``localizations``."""

    name = "localize"

    def __init__(self, config: ScopestreamConfig, settings: LocalizeSettings) -> None:
        self._config = config
        self._localizer = Localizer(settings, config)
        self._network: Any = None
        self._frame_shape: tuple[int, int] | None = None
        self._ahead: dict[int, dict[str, np.ndarray]] = {}  # frame seq -> network outputs of a look-ahead batch

    @property
    def look_ahead_frames(self) -> int:
        """Frames the network runs on at once when the daemon is behind (1 for the MLE methods)."""
        return int(self._localizer.settings.network_batch_frames) if self._network is not None else 1

    def look_ahead(self, frames: Sequence[Frame]) -> None:
        """Method 'network': run the network once on ``frames`` (the :class:`LooksAhead` role);
        :meth:`process` then decodes each frame's outputs."""
        if self._network is None:
            return
        images = [frame.image for frame in frames]
        for frame, out in zip(frames, self._network.run_batch(images), strict=True):
            if out is not None:
                self._ahead[frame.seq] = out

    def setup(self, context: RunContext) -> None:
        """Method 'network': load and check the model folder and warm the network up on the
        run's frame shape (errors name the folder). Other methods size their buffers on the
        first frame."""
        self._frame_shape = tuple(context.frame_shape_px)  # type: ignore[assignment]
        self._prepare_network()

    def _prepare_network(self) -> None:
        settings = self._localizer.settings
        if settings.method != "network":
            self._network = None
            return
        self._network = _network_localizer(settings, self._config, self._localizer.sigma_px)
        if self._frame_shape is not None and min(self._frame_shape) >= self._network.multiple_px:
            self._network.warm_up(self._frame_shape)

    def apply_settings(self, settings: LocalizeSettings) -> None:
        """Use new settings from the next frame on (a network is loaded here, not on the frame)."""
        old = self._localizer
        self._localizer = Localizer(settings, self._config)
        self._ahead.clear()  # outputs of the old network
        try:
            self._prepare_network()
        except ValueError:
            self._localizer = old
            self._prepare_network()
            raise

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Localize the spots of one frame."""
        try:
            if self._network is not None:
                ahead = self._ahead.pop(frame.seq, None)
                if self._ahead:  # never keep outputs of frames that were not processed after all
                    self._ahead = {seq: out for seq, out in self._ahead.items() if seq > frame.seq}
                locs = self._network.localize(_check_image(frame.image), frame.seq, ahead)
            else:
                locs = self._localizer.localize(frame.image, frame.seq)
        except ValueError as exc:
            products.put(Localizations.empty(frame.seq))
            raise ValueError(f"frame {frame.seq}: {exc}") from None
        products.put(locs)
        d = locs.diagnostics
        body = LocalizationsBody(
            frame_seq=frame.seq,
            count=len(locs),
            method=self._localizer.settings.method,
            candidates=int(d.get("candidates", 0)),
            rejected_saturated=int(d.get("rejected_saturated", 0)),
            rejected_fit=int(d.get("rejected_fit", 0)),
            noise_scale=float(d.get("noise_scale", 0.0)),
        )
        return [Emission("localizations", body, locs.arrays(), frame_seq=frame.seq, t_acquired=frame.t_acquired)]


PLUGIN = StagePlugin(
    name="localize",
    settings_model=LocalizeSettings,
    build=LocalizeStage,
    topics={"localizations": LocalizationsBody},
    produces=(Localizations,),
    runtime_settable=frozenset(
        {"threshold_snr", "min_separation_px", "min_photons", "method", "max_spots", "network_threshold", "network_refine"}
    ),
    tables={"localizations": "localizations.csv"},
    description="Spot detection and Poisson-MLE (or learned network) localization with uncertainties.",
)


# -- batch API ------------------------------------------------------------------------------


def locate(image: np.ndarray, config: ScopestreamConfig | None = None, **settings: Any) -> Any:
    """Detect and localize the spots of one image or a stack, like ``trackpy.locate``.

    Parameters
    ----------
    image
        A 2-D camera frame in ADU (rows, columns), or a 3-D stack (frames, rows, columns).
    config
        Camera and optics parameters; default: the default configuration (offset 100 ADU,
        0.5 e-/ADU, ...). Settings in its ``localize`` section are the starting point.
    **settings
        Fields of :class:`LocalizeSettings` (e.g. ``threshold_snr=6``, ``psf_sigma_px=1.3``).

    Returns
    -------
    table
        Columns ``frame, x, y, photons, background, sigma, uncertainty_px`` (x = column, px):
        a pandas DataFrame when pandas is installed, else a dict of 1-D numpy arrays.

    Raises
    ------
    ValueError
        On invalid settings (the message names the key) or an unusable image.
    """
    config = config if config is not None else ScopestreamConfig()
    base = config.stage_settings("localize") if "localize" in (config.model_extra or {}) else LocalizeSettings()
    try:
        merged = LocalizeSettings.model_validate({**base.model_dump(), **settings})
    except ValidationError as exc:
        raise ValueError(_describe(exc)) from None
    localizer = Localizer(merged, config)
    arr = np.asarray(image)
    frames = arr[None] if arr.ndim == 2 else arr
    if frames.ndim != 3:
        raise ValueError(f"expected a 2-D image or a 3-D stack, got shape {arr.shape}")
    if merged.method == "network":
        network = _network_localizer(merged, config, localizer.sigma_px)
        parts = [network.localize(_check_image(frames[i]), i) for i in range(frames.shape[0])]
    else:
        parts = [localizer.localize(frames[i], i) for i in range(frames.shape[0])]
    columns: dict[str, np.ndarray] = {
        "frame": np.concatenate([np.full(len(p), p.frame_seq, dtype=np.int64) for p in parts])
    }
    for name in _COLUMNS:
        columns[name] = np.concatenate([getattr(p, name) for p in parts])
    return as_table(columns)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(settings)"
        parts.append(f"{loc}: {err['msg']} (given {err.get('input')!r})")
    return "invalid localize settings: " + "; ".join(parts)
