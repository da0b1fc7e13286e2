"""Diffusion coefficient per track, online: rolling windows, whole tracks and segments.

Estimators (``diffusion.method``; per row, the ``method`` column says which one gave it):

- ``cve``: the covariance-based estimator of Vestergaard, Blainey & Flyvbjerg (2014), per axis,
  from successive displacements ``d_n`` over the frame interval dt::

      D = <d_n^2> / (2 dt) + <d_n d_(n+1)> / dt
      sigma^2 = R <d_n^2> + (2R - 1) <d_n d_(n+1)>
      var(D) = D^2 [(6 + 4 e + 2 e^2) / N + 4 (1 + e)^2 / N^2],  e = sigma^2 / (D dt) - 2R

  with the motion-blur coefficient ``R = exposure / (6 frame interval)``. Unbiased under blur and
  localization noise; the right choice when sigma is unknown (within 1-7 % of the bound then).
  Displacements only between consecutive frames, covariances only between consecutive
  displacements, so gap-closed tracks stay unbiased. D may come out negative for a nearly
  immobile particle (unbiased, not clipped).
- ``msd``: an ordinary least-squares fit of the 2-D MSD at lags 1..p,
  ``MSD(n) = 4 D dt (n - 2R) + 4 sigma^2``, p chosen from the reduced localization error
  (Michalet & Berglund 2012); its reported error is the CVE formula at the fitted values.
- ``mle``: the exact Gaussian likelihood of the displacements with blur (Berglund 2010) and the
  per-spot uncertainties that ``localize`` reports (Relich et al. 2016), calibrated for blur
  (:mod:`scopestream.plugins._loc_calibration`), maximized over D >= 0; ``D_crlb_um2_per_s`` is
  the Cramér-Rao bound (from the Fisher information at the estimate) and ``D_err`` equals it. A
  calibration check (score test of the variances' scale, per track and pooled) sends tracks
  whose uncertainties fail it to the MLE with a free scale (``mle_scaled``); tracks without
  uncertainties to the joint MLE of D and one common sigma^2 (``mle_joint``). See
  :func:`scopestream.plugins._diffusion_mle.estimate_batch`.
- ``auto`` (default): ``mle`` where every point has an uncertainty and the check passes, else
  ``cve``.

Rolling estimates are computed for every track at once on a common cadence (every
``step_frames`` frames, over the last ``window_frames`` frames), so the likelihood work runs as
one vectorized batch, never per track in Python. Whole-track estimates come when a track ends:
the CVE from running sums over the whole track; the MLE from its last ``history_frames`` frames.
Only estimates that exist are published: once per frame, one ``diffusion`` message whose rows
travel as arrays.

Change points (``change_points``, default on): a causal segmentation of every track by Bayesian
online change-point detection on the displacements (:mod:`scopestream.plugins._changepoints`).
When a change is declared, topic ``diffusion_change`` carries the particle, the frame of the
change, the frame it was declared in and the segments before and after it; every segment that
ends (by a change or with its track) is published on ``diffusion_segments`` (``analyze``: ``segments.csv``) with D, its error,
the anomalous exponent alpha and the regime (``immobile, confined, free, directed``, the AnDi 2
states). The segments are estimated in batches: every ``segment_batch_frames`` frames, all the
segments closed since, in one vectorized pass in which each frame's segments keep their own
pooled calibration check (the rows equal per-frame estimation to rounding); the messages go out
then.

Units: D in um^2/s (``optics.pixel_size_nm``, ``acquisition.frame_interval_ms``), sigma_loc in
nm. A span with fewer than ``min_steps`` displacements has no estimate (no row). The estimator
code is pure functions and :class:`DiffusionEstimator` (arrays over open tracks); the stage class
only moves products and emissions.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import (
    ESTIMATE_FIELDS,
    DiffusionEstimates,
    DiffusionUpdate,
    Products,
    TrackUpdate,
)
from scopestream.daemon._stage import Emission, RunContext, StagePlugin
from scopestream.daemon._tables import as_table
from scopestream.plugins._changepoints import REGIME_LABELS, OnlineChangePoints, segment_properties
from scopestream.plugins._diffusion_mle import (
    METHOD_CODE,
    METHOD_LABELS,
    blur_coefficient,
    displacement_series,
    estimate_batch,
    warm_up_kernel,
)

__all__ = [
    "DiffusionSettings",
    "DiffusionBody",
    "DiffusionChangeBody",
    "DiffusionSegmentsBody",
    "ChangeEstimates",
    "DiffusionEstimates",
    "DiffusionEstimator",
    "DiffusionUpdate",
    "DiffusionStage",
    "cve_from_sums",
    "cve_variance",
    "estimate_diffusion",
    "PLUGIN",
]


WINDOW_LABELS: tuple[str, ...] = ("rolling", "track", "stack")


class DiffusionSettings(BaseModel):
    """Settings of the ``diffusion`` stage (configuration section ``diffusion``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    method: Literal["cve", "msd", "mle", "auto", "network"] = Field(
        "auto",
        description=(
            "'cve': covariance-based estimator (Vestergaard et al. 2014); 'msd': MSD fit with the optimal number of "
            "points (Michalet & Berglund 2012); 'mle': maximum likelihood with blur and the per-spot uncertainties "
            "(Berglund 2010, Relich et al. 2016), with its Cramér-Rao bound; 'auto': 'mle' where every point has a "
            "calibrated uncertainty, else 'cve'; 'network': the track rows as 'auto' and, beside them, the image-stack network's "
            "estimate of every track window (rows with method 'network', window 'stack'; needs the shipped weights and onnxruntime)."
        ),
    )
    window_frames: int = Field(50, ge=3, le=10_000, description="Length of the rolling window, frames.")
    step_frames: int | None = Field(
        None, ge=1, le=100_000, description="A rolling estimate is published for a track every this many frames; None: window_frames // 2."
    )
    rolling: bool = Field(True, description="Publish rolling-window estimates (whole-track estimates are always published when a track ends).")
    min_steps: int = Field(3, ge=2, le=100_000, description="Fewest displacements for a defined D; shorter tracks or windows report D = None.")
    msd_max_lag: int = Field(10, ge=2, le=200, description="Largest MSD lag the 'msd' method may use, frames.")
    blur_coefficient: float | None = Field(
        None, ge=0, le=0.25,
        description="Motion-blur coefficient R; None: acquisition.exposure_ms / (6 * acquisition.frame_interval_ms).",
    )
    history_frames: int = Field(
        200, ge=3, le=10_000,
        description="Positions kept per track, frames: the MLE of a whole track and the segments use at most this many last frames.",
    )
    calibrate_uncertainties: bool = Field(
        True,
        description="Correct the per-spot uncertainties for motion blur (localize's fixed-width fit understates them for moving spots); false for uncertainties that already include it.",
    )
    change_points: bool = Field(True, description="Segment every track online (Bayesian change points) and publish diffusion_change / diffusion_segments.")
    hazard_frames: float = Field(100.0, gt=1, le=1e6, description="Expected segment length for the change-point prior, frames.")
    change_threshold: float = Field(
        0.9, gt=0, lt=1, description="Posterior probability of a change after the current segment's start that declares it."
    )
    min_segment_frames: int = Field(4, ge=2, le=1000, description="Fewest displacements in a segment (also the least detection delay).")
    immobile_D_um2_per_s: float = Field(
        0.001, ge=0, le=1e3, description="A segment with D below this is immobile whatever its error, um^2/s."
    )
    network_model_dir: str | None = Field(None, description="method 'network': model folder (card.json + weights); None: the shipped models/weights/diffusion.")
    network_backend: Literal["onnxruntime", "torch", "tensorrt"] = Field("onnxruntime", description="method 'network': inference backend.")
    network_device: str = Field("cpu", description="method 'network': device of the torch / TensorRT backend.")
    network_threads: int = Field(1, ge=1, le=64, description="method 'network': threads of one inference.")
    network_step_frames: int | None = Field(
        None, ge=1, le=100_000, description="method 'network': a window per track every this many frames; None: the model's window length (non-overlapping)."
    )
    network_margin_px: int = Field(8, ge=0, le=1000, description="method 'network': the capture box around a track is the model's region plus this margin on each side, px.")
    network_max_tracks: int = Field(256, ge=1, le=100_000, description="method 'network': tracks buffered for windows at once, at most (more are counted, not cut).")
    network_max_pending: int = Field(8, ge=1, le=1024, description="method 'network': windows in the off-thread service at once, at most; beyond it windows are skipped (or waited for).")
    network_skip_when_busy: bool = Field(True, description="method 'network': skip and count a window when the off-thread service is busy (live); false: wait (analyze).")
    network_min_detected_fraction: float = Field(0.5, ge=0, le=1, description="method 'network': windows in which the track was detected in fewer than this fraction of frames are not sent.")
    segment_batch_frames: int = Field(
        10, ge=1, le=10_000,
        description=(
            "Change points and ended segments are estimated together (one vectorized pass; each frame's own pooled "
            "check as before) every this many frames, and published then; 1: on the frame they occur."
        ),
    )


class DiffusionBody(BaseModel):
    """Body of a ``diffusion`` event: every estimate completed in one frame, one per row of the
    arrays ``particle, frame_start, frame_end, n_steps`` (int64), ``D_um2_per_s,
    D_err_um2_per_s, D_crlb_um2_per_s, sigma_loc_nm`` (float64, NaN where undefined), ``method``
    and ``window`` (uint8 codes into ``labels``)."""

    model_config = ConfigDict(frozen=True)

    frame_seq: int = Field(description="The frame whose processing completed these estimates.")
    count: int = Field(description="Number of estimates (length of every array).")
    method: Literal["cve", "msd", "mle", "auto", "network"] = Field(description="The configured diffusion.method.")
    labels: dict[str, list[str]] = Field(
        description="Category names of the integer arrays: value i of array 'method' means labels['method'][i] (cve, msd, mle, mle_scaled, mle_joint, network); of 'window', labels['window'][i] (rolling: the last window_frames frames; track: the whole track; stack: the image-stack network's window of the model's frames, method 'network')."
    )


class DiffusionChangeBody(BaseModel):
    """Body of a ``diffusion_change`` event: the change points declared since the last one (every
    ``diffusion.segment_batch_frames`` frames), one per row of the arrays ``particle, frame_change,
    frame_declared, before_frame_start, after_n_steps, before_n_steps`` (int64), ``before_D_um2_per_s, before_D_err_um2_per_s, before_alpha, after_D_um2_per_s,
    after_D_err_um2_per_s`` (float64, NaN where undefined), ``before_regime, after_regime``
    (uint8 codes into ``labels``)."""

    model_config = ConfigDict(frozen=True)

    frame_seq: int = Field(description="The frame at which this batch of changes was estimated and published (each row's delay is frame_declared - frame_change).")
    count: int = Field(description="Number of change points (length of every array).")
    labels: dict[str, list[str]] = Field(description="Category names of 'before_regime' and 'after_regime': immobile, confined, free, directed.")


class DiffusionSegmentsBody(BaseModel):
    """Body of a ``diffusion_segments`` event: segments that ended (by a change point, or with their
    track) since the last one (every ``diffusion.segment_batch_frames`` frames), one per row of the arrays ``particle, frame_start, frame_end, n_steps``
    (int64), ``D_um2_per_s, D_err_um2_per_s, alpha`` (float64, NaN where undefined) and
    ``regime`` (uint8 code into ``labels``)."""

    model_config = ConfigDict(frozen=True)

    frame_seq: int = Field(description="The frame at which this batch of segments was estimated and published.")
    count: int = Field(description="Number of segments (length of every array).")
    labels: dict[str, list[str]] = Field(description="Category names of 'regime': immobile, confined, free, directed (AnDi 2; Stat, RCir, RanW, Flow).")


@dataclass(frozen=True)
class ChangeEstimates:
    """Change points declared and segments ended since the last batch (arrays, as on the wire)."""

    changes: dict[str, np.ndarray]
    segments: dict[str, np.ndarray]


def cve_from_sums(
    sum_sq: np.ndarray, n_sq: np.ndarray, sum_cov: np.ndarray, n_cov: np.ndarray, blur: float, min_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CVE from running sums over both axes, in px^2 and frames.

    Parameters
    ----------
    sum_sq, n_sq
        Sum over displacements of ``dx^2 + dy^2``, and the number of displacements.
    sum_cov, n_cov
        Sum over consecutive displacement pairs of ``dx_n dx_(n+1) + dy_n dy_(n+1)``, and the
        number of pairs.
    blur
        Motion-blur coefficient R.
    min_steps
        Fewest displacements for a defined estimate.

    Returns
    -------
    D_px2_per_frame, D_err_px2_per_frame, sigma2_px2
        NaN where undefined (too few steps; error also where D <= 0).
    """
    sum_sq = np.asarray(sum_sq, float)
    n_sq = np.asarray(n_sq, float)
    defined = (n_sq >= min_steps) & (np.asarray(n_cov) >= 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        msq = sum_sq / (2.0 * n_sq)
        cov = np.asarray(sum_cov, float) / (2.0 * np.asarray(n_cov, float))
        d = msq / 2.0 + cov
        sigma2 = blur * msq + (2.0 * blur - 1.0) * cov
        err = np.sqrt(cve_variance(d, sigma2, blur, n_sq))
    d = np.where(defined, d, np.nan)
    err = np.where(defined & (d > 0), err, np.nan)
    sigma2 = np.where(defined, sigma2, np.nan)
    return d, err, sigma2


def cve_variance(
    d_px2_per_frame: np.ndarray | float, sigma2_px2: np.ndarray | float, blur: float, n_steps: np.ndarray | float,
    n_axes: int = 2,
) -> np.ndarray:
    """Theoretical variance of the CVE (Vestergaard et al. 2014), averaged over ``n_axes`` axes.

    ``var = D^2 [(6 + 4 e + 2 e^2)/N + 4 (1 + e)^2 / N^2] / n_axes``, ``e = sigma^2/(D dt) - 2R``,
    with dt = 1 frame.
    """
    d = np.asarray(d_px2_per_frame, float)
    n = np.asarray(n_steps, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.asarray(sigma2_px2, float) / d - 2.0 * blur
        var = d**2 * ((6.0 + 4.0 * eps + 2.0 * eps**2) / n + 4.0 * (1.0 + eps) ** 2 / n**2) / n_axes
    return np.asarray(var)


def msd_optimal_fit(
    msd_px2: np.ndarray, counts: np.ndarray, blur: float, n_steps: np.ndarray, max_lag: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLS fit of the 2-D MSD at lags 1..p with p chosen from the reduced localization error.

    Parameters
    ----------
    msd_px2
        Mean 2-D squared displacement per lag, shape (n_tracks, K) (NaN where no pair).
    counts
        Number of pairs per lag, shape (n_tracks, K).
    blur
        Motion-blur coefficient R.
    n_steps
        Displacements per track (caps p at half of it).
    max_lag
        Largest lag allowed.

    Returns
    -------
    D_px2_per_frame, sigma2_px2, p
        Per track; NaN / 0 where fewer than two usable lags.
    """
    n_tracks, k = msd_px2.shape
    lags = np.arange(1, k + 1, dtype=np.float64)
    cap = np.clip(np.minimum(max_lag, np.floor(np.asarray(n_steps, float) / 2.0)), 2, k).astype(np.int64)
    p = np.full(n_tracks, 2, dtype=np.int64)
    d = sigma2 = np.full(n_tracks, np.nan)
    for _ in range(6):
        use = (lags[None, :] <= p[:, None]) & (counts > 0)
        w = use.astype(np.float64)
        y = np.where(use, msd_px2, 0.0)
        sw = w.sum(1)
        sx = (w * lags).sum(1)
        sy = y.sum(1)
        sxx = (w * lags**2).sum(1)
        sxy = (y * lags).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            det = sw * sxx - sx * sx
            slope = (sw * sxy - sx * sy) / det
            intercept = (sy - slope * sx) / sw
            d = np.where(sw >= 2, slope / 4.0, np.nan)
            sigma2 = np.where(sw >= 2, (intercept + 2.0 * blur * slope) / 4.0, np.nan)
            x = np.where(d > 0, np.maximum(sigma2, 0.0) / d, np.inf)
        new_p = np.clip(np.round(2.0 + 1.6 * np.power(np.minimum(x, 1e6), 0.51)), 2, cap).astype(np.int64)
        if np.array_equal(new_p, p):
            break
        p = new_p
    return d, sigma2, p


@dataclass(frozen=True)
class _SegmentInput:
    """Segments of some tracks awaiting their estimate: (m,) ids, first / last frame, warm-start
    D; (m, L) padded frames, x, y, sigma from the ring when the segments closed."""

    ids: np.ndarray
    first: np.ndarray
    last: np.ndarray
    frames: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sig: np.ndarray
    warm_D: np.ndarray


class DiffusionEstimator:
    """Per-track diffusion state and estimates, fed one :class:`TrackUpdate` per frame.

    All state lives in arrays over open tracks (running sums for the whole-track CVE, a ring of
    the last ``history_frames`` positions, uncertainties and frames, the change-point
    posteriors); the per-frame work is vectorized and the estimates of a frame are one batch.

    Parameters
    ----------
    settings
        The stage settings.
    config
        Pixel size, exposure, frame interval and the PSF width (``localize.psf_sigma_px`` or the
        optics) come from here.
    """

    def __init__(self, settings: DiffusionSettings, config: ScopestreamConfig | None = None) -> None:
        config = config if config is not None else ScopestreamConfig()
        if settings.method == "network":  # the track rows follow 'auto'; the stage adds the network's rows
            settings = settings.model_copy(update={"method": "auto"})
        self.settings = settings
        acq = config.acquisition
        self.blur = (
            settings.blur_coefficient if settings.blur_coefficient is not None
            else blur_coefficient(acq.exposure_ms, acq.frame_interval_ms)
        )
        self.exposure_frames = acq.exposure_ms / acq.frame_interval_ms
        px_um = config.optics.pixel_size_nm / 1000.0
        self._px2_per_frame_to_um2_per_s = px_um**2 / (acq.frame_interval_ms / 1000.0)
        self._px_to_nm = config.optics.pixel_size_nm
        self.psf_sigma_px = _psf_sigma_px(config)
        self._lags = settings.msd_max_lag if settings.method == "msd" else 1
        self._ring_len = max(settings.window_frames, settings.history_frames, self._lags + 1)
        self._step = settings.step_frames if settings.step_frames is not None else max(1, settings.window_frames // 2)
        self._changes = (
            OnlineChangePoints(settings.hazard_frames, settings.change_threshold, settings.min_segment_frames)
            if settings.change_points else None
        )
        self._immobile_px2_per_frame = settings.immobile_D_um2_per_s / self._px2_per_frame_to_um2_per_s
        # Segments that closed (a change, a track end) and await their batch: (before or ended, after).
        self._pending: list[tuple[_SegmentInput, _SegmentInput | None]] = []
        self._alloc(0)

    def _alloc(self, n: int) -> None:
        L, K = self._ring_len, self._lags
        self.ids = np.empty(n, dtype=np.int64)
        self.first_frame = np.empty(n, dtype=np.int64)
        self.last_frame = np.empty(n, dtype=np.int64)
        self.last_pos = np.empty((n, 2))
        self.last_disp = np.empty((n, 2))
        self.last_disp_frame = np.empty(n, dtype=np.int64)
        self.sum_sq = np.empty(n)
        self.n_sq = np.empty(n, dtype=np.int64)
        self.sum_cov = np.empty(n)
        self.n_cov = np.empty(n, dtype=np.int64)
        self.ring = np.empty((n, L, 2))
        self.ring_sigma = np.empty((n, L))
        self.ring_frame = np.empty((n, L), dtype=np.int64)
        self.disp_start = np.empty((n, L), dtype=np.int64)  # start frame of each change-point step
        self.msd_sum = np.empty((n, K))
        self.msd_n = np.empty((n, K), dtype=np.int64)
        self.warm_D = np.empty(n)
        self.seg_first = np.empty(n, dtype=np.int64)  # first frame of the current segment

    _FIELDS = (
        "ids", "first_frame", "last_frame", "last_pos", "last_disp", "last_disp_frame", "sum_sq", "n_sq",
        "sum_cov", "n_cov", "ring", "ring_sigma", "ring_frame", "disp_start", "msd_sum", "msd_n", "warm_D",
        "seg_first",
    )

    @property
    def open_tracks(self) -> int:
        """Tracks with state."""
        return int(self.ids.size)

    def _add_tracks(self, new_ids: np.ndarray, frame: int) -> None:
        n = new_ids.size
        fresh = DiffusionEstimator.__new__(DiffusionEstimator)
        fresh._ring_len, fresh._lags = self._ring_len, self._lags
        fresh._alloc(n)
        never = -(10**12)
        fresh.ids[:] = new_ids
        fresh.first_frame[:] = frame
        fresh.seg_first[:] = frame
        for name in ("last_frame", "last_disp_frame", "ring_frame", "disp_start"):
            getattr(fresh, name)[:] = never
        for name in ("last_pos", "last_disp", "ring", "sum_sq", "sum_cov", "msd_sum"):
            getattr(fresh, name)[:] = 0.0
        for name in ("n_sq", "n_cov", "msd_n"):
            getattr(fresh, name)[:] = 0
        fresh.ring_sigma[:] = np.nan
        fresh.warm_D[:] = np.nan
        for name in self._FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(fresh, name)]))
        if self._changes is not None:
            self._changes.add_rows(n)
        if n and self.ids.size > n and new_ids.min() <= self.ids[: self.ids.size - n].max():
            order = np.argsort(self.ids, kind="stable")
            self._reorder(order)

    def _reorder(self, order: np.ndarray) -> None:
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name)[order])
        if self._changes is not None:
            self._changes.reorder(order)

    def _remove(self, slots: np.ndarray) -> None:
        keep = np.ones(self.ids.size, dtype=bool)
        keep[slots] = False
        self._reorder(np.flatnonzero(keep))

    def update(self, upd: TrackUpdate) -> tuple[DiffusionEstimates | None, ChangeEstimates | None]:
        """Add one frame's track positions.

        Returns
        -------
        estimates, changes
            The estimates completed this frame (rolling windows when due, whole tracks that
            ended) and the change points / ended segments, each None when there is none.
        """
        f = int(upd.frame_seq)
        ids = np.asarray(upd.particle, dtype=np.int64)
        x = np.asarray(upd.x, dtype=np.float64)
        y = np.asarray(upd.y, dtype=np.float64)
        unc = np.asarray(upd.uncertainty_px, dtype=np.float64)
        if unc.shape != ids.shape:
            unc = np.full(ids.shape, np.nan)
        # A NaN position is no detection (the track coasts here).
        finite = np.isfinite(x) & np.isfinite(y)
        if not finite.all():
            ids, x, y, unc = ids[finite], x[finite], y[finite], unc[finite]
        estimates: list[DiffusionEstimates] = []
        slot = np.empty(0, dtype=np.intp)
        if ids.size:
            known = np.isin(ids, self.ids)
            if not known.all():
                self._add_tracks(np.unique(ids[~known]), f)
            slot = np.searchsorted(self.ids, ids)
            pos = np.column_stack([x, y])
            seen = self.last_frame[slot] > -(10**11)
            gap = f - self.last_frame[slot]
            consecutive = gap == 1
            disp = pos - self.last_pos[slot]
            self.sum_sq[slot] += np.where(consecutive, (disp * disp).sum(axis=1), 0.0)
            self.n_sq[slot] += consecutive
            pair = consecutive & (self.last_disp_frame[slot] == f - 1)
            self.sum_cov[slot] += np.where(pair, (disp * self.last_disp[slot]).sum(axis=1), 0.0)
            self.n_cov[slot] += pair
            self.last_disp[slot[consecutive]] = disp[consecutive]
            self.last_disp_frame[slot[consecutive]] = f
            if self.settings.method == "msd":
                L = self._ring_len
                for lag in range(1, self._lags + 1):
                    j = (f - lag) % L
                    valid = self.ring_frame[slot, j] == f - lag
                    d = pos - self.ring[slot, j]
                    self.msd_sum[slot, lag - 1] += np.where(valid, (d * d).sum(axis=1), 0.0)
                    self.msd_n[slot, lag - 1] += valid
            j = f % self._ring_len
            self.ring[slot, j] = pos
            self.ring_sigma[slot, j] = unc
            self.ring_frame[slot, j] = f
            prev_frame = self.last_frame[slot]
            self.last_pos[slot] = pos
            self.last_frame[slot] = f
            if self._changes is not None and seen.any():
                rows = slot[seen]
                step_idx = self._changes.steps[rows]
                self.disp_start[rows, step_idx % self._ring_len] = prev_frame[seen]
                scale = 1.0 / np.sqrt(gap[seen])
                ev = self._changes.update(rows, disp[seen, 0] * scale, disp[seen, 1] * scale)
                if ev.rows.size:
                    change_frame = self.disp_start[ev.rows, ev.change_step % self._ring_len]
                    self._pending.append((
                        self._snapshot(ev.rows, self.seg_first[ev.rows], change_frame),
                        self._snapshot(ev.rows, change_frame, np.full(ev.rows.size, f)),
                    ))
                    self.seg_first[ev.rows] = change_frame
        if self.settings.rolling and slot.size and (f + 1) % self._step == 0:
            est = self._window_estimates(slot, f)
            if len(est):
                estimates.append(est)
        if upd.ended:
            gone = np.asarray(upd.ended, dtype=np.int64)
            gone = gone[np.isin(gone, self.ids)]
            if gone.size:
                slots = np.searchsorted(self.ids, gone)
                est = self._track_estimates(slots)
                if len(est):
                    estimates.append(est)
                if self._changes is not None:
                    self._pending.append((self._snapshot(slots, self.seg_first[slots], self.last_frame[slots]), None))
                self._remove(slots)
        out = DiffusionEstimates.concatenate(estimates) if estimates else None
        changes = None
        if self._pending and (f + 1) % self.settings.segment_batch_frames == 0:
            changes = self._flush_segments()
        return out, changes

    def finish(self) -> tuple[DiffusionEstimates | None, ChangeEstimates | None]:
        """Whole-track estimates and last segments of every open track (run end); clears the state."""
        if self.ids.size == 0:
            changes = self._flush_segments() if self._pending else None
            return None, changes
        slots = np.arange(self.ids.size)
        out = self._track_estimates(slots)
        if self._changes is not None:
            self._pending.append((self._snapshot(slots, self.seg_first, self.last_frame), None))
        changes = self._flush_segments() if self._pending else None
        self._alloc(0)
        if self._changes is not None:
            self._changes.reorder(np.empty(0, dtype=np.intp))
        return (out if len(out) else None), changes

    # -- estimates ------------------------------------------------------------------------

    def _gather(self, slots: np.ndarray, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, ...]:
        """Padded (m, L) frames / x / y / sigma of frames first..last of each track (from the ring)."""
        span = last - first + 1
        L = int(min(self._ring_len, max(int(span.max()) if span.size else 1, 1)))
        frames = last[:, None] - (L - 1) + np.arange(L)[None, :]
        j = frames % self._ring_len
        rows = slots[:, None]
        valid = (self.ring_frame[rows, j] == frames) & (frames >= first[:, None])
        pos = self.ring[rows, j]
        return (
            np.where(valid, frames, -1), np.where(valid, pos[..., 0], np.nan), np.where(valid, pos[..., 1], np.nan),
            np.where(valid, self.ring_sigma[rows, j], np.nan),
        )

    def _batch(self, slots: np.ndarray, first: np.ndarray, last: np.ndarray, method: str) -> tuple[Any, Any]:
        frames, x, y, sig = self._gather(slots, first, last)
        series = displacement_series(frames, x, y, sig)
        est = estimate_batch(
            series, self.blur, method, exposure_frames=self.exposure_frames,  # type: ignore[arg-type]
            psf_sigma_px=self.psf_sigma_px, min_steps=self.settings.min_steps, warm_D=self.warm_D[slots],
            calibrate=self.settings.calibrate_uncertainties,
        )
        return series, est

    def _track_estimates(self, slots: np.ndarray) -> DiffusionEstimates:
        s = self.settings
        if s.method in ("cve", "msd"):
            if s.method == "cve":
                d, err, sig2 = cve_from_sums(self.sum_sq[slots], self.n_sq[slots], self.sum_cov[slots], self.n_cov[slots], self.blur, s.min_steps)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    msd = self.msd_sum[slots] / self.msd_n[slots]
                d, err, sig2 = self._msd_estimates(msd, self.msd_n[slots], self.n_sq[slots], self.n_cov[slots])
            code = np.full(slots.size, METHOD_CODE[s.method], dtype=np.uint8)
            return self._pack(slots, self.first_frame[slots], self.last_frame[slots], self.n_sq[slots], d, err,
                              np.full(slots.size, np.nan), sig2, code, "track")
        last = self.last_frame[slots]
        first = np.maximum(self.first_frame[slots], last - s.history_frames + 1)
        series, est = self._batch(slots, first, last, s.method)
        return self._pack(slots, series.frame_start, series.frame_end, series.n, est.D, est.D_err, est.D_crlb_var,
                          est.sigma2, est.method, "track")

    def _window_estimates(self, slots: np.ndarray, f: int) -> DiffusionEstimates:
        s = self.settings
        w = s.window_frames
        if s.method == "msd":
            frames = f - w + 1 + np.arange(w)
            j = frames % self._ring_len
            pos = self.ring[slots][:, j]  # (m, W, 2)
            valid = self.ring_frame[slots][:, j] == frames[None, :]
            step_ok = valid[:, 1:] & valid[:, :-1]
            n_sq = step_ok.sum(axis=1)
            n_cov = (step_ok[:, 1:] & step_ok[:, :-1]).sum(axis=1)
            k = self._lags
            msd = np.full((slots.size, k), np.nan)
            cnt = np.zeros((slots.size, k), dtype=np.int64)
            for lag in range(1, min(k, w - 1) + 1):
                ok = valid[:, lag:] & valid[:, :-lag]
                dd = np.where(ok[:, :, None], pos[:, lag:] - pos[:, :-lag], 0.0)
                cnt[:, lag - 1] = ok.sum(axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    msd[:, lag - 1] = (dd * dd).sum(axis=(1, 2)) / cnt[:, lag - 1]
            d, err, sig2 = self._msd_estimates(msd, cnt, n_sq, n_cov)
            first = np.where(valid.any(axis=1), frames[np.argmax(valid, axis=1)], f)
            code = np.full(slots.size, METHOD_CODE["msd"], dtype=np.uint8)
            return self._pack(slots, first, np.full(slots.size, f), n_sq, d, err, np.full(slots.size, np.nan), sig2, code, "rolling")
        last = np.full(slots.size, f, dtype=np.int64)
        series, est = self._batch(slots, last - w + 1, last, s.method)
        mle = est.method != METHOD_CODE["cve"]
        self.warm_D[slots[mle]] = est.D[mle]
        return self._pack(slots, series.frame_start, series.frame_end, series.n, est.D, est.D_err, est.D_crlb_var,
                          est.sigma2, est.method, "rolling")

    def _snapshot(self, slots: np.ndarray, first: np.ndarray, last: np.ndarray) -> _SegmentInput:
        """What the estimate of the segments first..last of tracks ``slots`` needs, taken now
        (the ring moves on before the batch runs)."""
        frames, x, y, sig = self._gather(slots, np.asarray(first), np.asarray(last))
        return _SegmentInput(
            self.ids[slots].copy(), np.asarray(first, dtype=np.int64).copy(), np.asarray(last, dtype=np.int64).copy(),
            frames, x, y, sig, self.warm_D[slots].copy(),
        )

    def _flush_segments(self) -> ChangeEstimates:
        """Estimate every pending segment in one vectorized pass and make the change and segment
        rows, in the order the changes and track ends came. Each snapshot is its own group of
        :func:`estimate_batch` (the batch it formed when estimated on its own frame)."""
        pending, self._pending = self._pending, []
        inputs = [p for pair in pending for p in pair if p is not None]
        results = iter(self._segments(inputs))
        change_parts: list[dict[str, np.ndarray]] = []
        segment_parts: list[dict[str, np.ndarray]] = []
        for _, after_in in pending:
            before = next(results)
            segment_parts.append(before)
            if after_in is None:
                continue
            after = next(results)
            change_parts.append({
                "particle": before["particle"], "frame_change": before["frame_end"], "frame_declared": after["frame_end"],
                "before_frame_start": before["frame_start"], "before_n_steps": before["n_steps"],
                "before_D_um2_per_s": before["D_um2_per_s"], "before_D_err_um2_per_s": before["D_err_um2_per_s"],
                "before_alpha": before["alpha"], "before_regime": before["regime"],
                "after_n_steps": after["n_steps"], "after_D_um2_per_s": after["D_um2_per_s"],
                "after_D_err_um2_per_s": after["D_err_um2_per_s"], "after_regime": after["regime"],
            })
        return ChangeEstimates(_concat(change_parts), _concat([_segment_row(p) for p in segment_parts]))

    def _segments(self, inputs: Sequence[_SegmentInput]) -> list[dict[str, np.ndarray]]:
        """D, error, alpha and regime of the segments of each input, computed as one batch."""
        s = self.settings
        method = "cve" if s.method == "msd" else s.method
        width = max(p.frames.shape[1] for p in inputs)
        # Left-pad every input to the widest (no point there; displacement_series left-justifies).
        frames = np.concatenate([np.pad(p.frames, ((0, 0), (width - p.frames.shape[1], 0)), constant_values=-1) for p in inputs])
        x, y, sig = (
            np.concatenate([np.pad(getattr(p, a), ((0, 0), (width - p.frames.shape[1], 0)), constant_values=np.nan) for p in inputs])
            for a in ("x", "y", "sig")
        )
        sizes = [p.ids.size for p in inputs]
        groups = np.repeat(np.arange(len(inputs)), sizes)
        series = displacement_series(frames, x, y, sig)
        est = estimate_batch(
            series, self.blur, method, exposure_frames=self.exposure_frames,  # type: ignore[arg-type]
            psf_sigma_px=self.psf_sigma_px, min_steps=2, warm_D=np.concatenate([p.warm_D for p in inputs]),
            calibrate=self.settings.calibrate_uncertainties, groups=groups,
        )
        alpha, regime = segment_properties(frames, x, y, est.sigma2, est.D, est.D_err, self._immobile_px2_per_frame)
        k = self._px2_per_frame_to_um2_per_s
        out: list[dict[str, np.ndarray]] = []
        start = 0
        for p, size in zip(inputs, sizes, strict=True):
            sl = slice(start, start + size)
            start += size
            out.append({
                "particle": p.ids, "frame_start": p.first, "frame_end": p.last, "n_steps": series.n[sl].astype(np.int64),
                "D_um2_per_s": np.maximum(est.D[sl], 0.0) * k, "D_err_um2_per_s": est.D_err[sl] * k,
                "alpha": alpha[sl], "regime": regime[sl].astype(np.uint8),
            })
        return out

    def _msd_estimates(
        self, msd: np.ndarray, counts: np.ndarray, n_sq: np.ndarray, n_cov: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d, sig2, _ = msd_optimal_fit(msd, counts, self.blur, n_sq, self.settings.msd_max_lag)
        defined = (n_sq >= self.settings.min_steps) & (n_cov >= 1)
        d = np.where(defined, d, np.nan)
        sig2 = np.where(defined, sig2, np.nan)
        err = np.where(d > 0, np.sqrt(cve_variance(d, sig2, self.blur, n_sq)), np.nan)
        return d, err, sig2

    def _pack(
        self, slots: np.ndarray, first: np.ndarray, last: np.ndarray, n_steps: np.ndarray, d: np.ndarray,
        err: np.ndarray, crlb_var: np.ndarray, sig2: np.ndarray, method: np.ndarray, window: str,
    ) -> DiffusionEstimates:
        """Rows with an estimate, in um^2/s and nm."""
        keep = np.isfinite(d)
        k = self._px2_per_frame_to_um2_per_s
        with np.errstate(invalid="ignore"):
            sigma_nm = np.where(sig2 > 0, np.sqrt(np.where(sig2 > 0, sig2, 0.0)) * self._px_to_nm, np.nan)
            crlb = np.sqrt(np.where(crlb_var >= 0, crlb_var, np.nan)) * k
        n = int(keep.sum())
        return DiffusionEstimates(
            particle=self.ids[slots][keep], frame_start=np.asarray(first, dtype=np.int64)[keep],
            frame_end=np.asarray(last, dtype=np.int64)[keep], n_steps=np.asarray(n_steps, dtype=np.int64)[keep],
            D_um2_per_s=(d * k)[keep], D_err_um2_per_s=(err * k)[keep], D_crlb_um2_per_s=crlb[keep],
            sigma_loc_nm=sigma_nm[keep], method=np.asarray(method, dtype=np.uint8)[keep],
            window=np.full(n, WINDOW_LABELS.index(window), dtype=np.uint8),
        )


def _psf_sigma_px(config: ScopestreamConfig) -> float:
    """The PSF SD ``localize`` fits with (its setting, else from the optics, as it computes it)."""
    from scopestream.plugins.localize import LocalizeSettings

    extra = config.__pydantic_extra__ or {}
    settings = config.stage_settings("localize") if "localize" in extra else LocalizeSettings()
    value = getattr(settings, "psf_sigma_px", None)
    if value is not None:
        return float(value)
    optics = config.optics
    return max(0.21 * optics.wavelength_nm / optics.na / optics.pixel_size_nm, 0.5)


_SEGMENT_COLUMNS = ("particle", "frame_start", "frame_end", "D_um2_per_s", "D_err_um2_per_s", "alpha", "regime", "n_steps")


def _segment_row(seg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: seg[name] for name in _SEGMENT_COLUMNS}


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


# -- stage ----------------------------------------------------------------------------------


class DiffusionStage:
    """The ``diffusion`` stage: consumes the :class:`TrackUpdate`, produces a
    :class:`DiffusionUpdate` (this frame's :class:`DiffusionEstimates`, if any), publishes one
    ``diffusion`` message per frame with estimates, and ``diffusion_change`` /
    ``diffusion_segments`` messages when change points are declared or segments end."""

    name = "diffusion"

    def __init__(self, config: ScopestreamConfig, settings: DiffusionSettings) -> None:
        self._config = config
        self._settings = settings
        self._estimator = DiffusionEstimator(settings, config)
        self._last_frame: tuple[int, float | None] | None = None
        self._network: _NetworkWindows | None = None

    def setup(self, context: RunContext) -> None:
        """Compile the likelihood kernel now (numba; from its disk cache after the first run), so
        that the first estimate does not stall the camera path; the arrays grow with the tracks.
        With ``method: network``, load and check the network (a missing model, another version,
        no onnxruntime: a configuration error naming the problem) and warm it up."""
        warm_up_kernel()
        if self._settings.method == "network":
            self._network = _NetworkWindows(self._settings, self._estimator, context)

    def timing_changed(self, context: RunContext) -> Sequence[Emission]:
        """A rate switch (or a new exposure): steps before and after it have different Δt (and
        blur), so no estimate may mix them. The open tracks are closed here with the old timing
        (whole-track estimates and last segments, as at the end of a run) and the tracks go on
        as new ones, estimated with the new frame interval and exposure."""
        est, changes = self._estimator.finish()
        acq = self._config.acquisition.model_copy(
            update={"frame_interval_ms": context.frame_interval_ms, "exposure_ms": context.exposure_ms}
        )
        self._config = self._config.model_copy(update={"acquisition": acq})
        self._estimator = DiffusionEstimator(self._estimator.settings, self._config)
        seq, t = self._last_frame if self._last_frame is not None else (0, None)
        return self._emissions(est, changes, seq, t)

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Add this frame's track positions; emit what completed."""
        upd = products.require(TrackUpdate, self.name)
        self._last_frame = (frame.seq, frame.t_acquired)
        est, changes = self._estimator.update(upd)
        products.put(DiffusionUpdate(frame.seq, () if est is None else (est,)))
        out = self._emissions(est, changes, frame.seq, frame.t_acquired)
        if self._network is not None:
            self._network.submit(frame, upd)
        return out

    def counters(self) -> dict[str, int]:
        """With ``method: network``: windows submitted, estimated, skipped (busy / invalid / failed)."""
        return self._network.counters() if self._network is not None else {}

    def _emissions(
        self, est: DiffusionEstimates | None, changes: ChangeEstimates | None, frame_seq: int, t: float | None
    ) -> list[Emission]:
        out: list[Emission] = []
        if est is not None and len(est):
            body = DiffusionBody(
                frame_seq=frame_seq, count=len(est), method=self._settings.method,
                labels={"method": list(METHOD_LABELS), "window": list(WINDOW_LABELS)},
            )
            out.append(Emission("diffusion", body, est.arrays(), frame_seq=frame_seq, t_acquired=t))
        if changes is not None:
            regimes = list(REGIME_LABELS)
            if changes.changes and len(changes.changes["particle"]):
                body_c = DiffusionChangeBody(
                    frame_seq=frame_seq, count=len(changes.changes["particle"]),
                    labels={"before_regime": regimes, "after_regime": regimes},
                )
                out.append(Emission("diffusion_change", body_c, changes.changes, frame_seq=frame_seq, t_acquired=t))
            if changes.segments and len(changes.segments["particle"]):
                body_s = DiffusionSegmentsBody(
                    frame_seq=frame_seq, count=len(changes.segments["particle"]), labels={"regime": regimes},
                )
                out.append(Emission("diffusion_segments", body_s, changes.segments, frame_seq=frame_seq, t_acquired=t))
        return out

    def teardown(self) -> Sequence[Emission]:
        """Whole-track estimates and last segments of the tracks still open at run end."""
        est, changes = self._estimator.finish()
        seq, t = self._last_frame if self._last_frame is not None else (0, None)
        return self._emissions(est, changes, seq, t)


class _NetworkWindows:
    """``method: network``: cuts the track windows, sends them off the camera path, turns the
    results into ``diffusion`` rows (method ``network``, window ``stack``); see
    :mod:`scopestream.plugins._diffusion_network`."""

    def __init__(self, settings: DiffusionSettings, estimator: DiffusionEstimator, context: RunContext) -> None:
        # Imported here: runs without method 'network' import no model code.
        from scopestream.models._backends import ModelRef
        from scopestream.models._card import ModelLoadError
        from scopestream.plugins._diffusion_network import (
            default_model_dir,
            estimate_stacks,
            load_network,
        )
        from scopestream.plugins.motion import _WindowCutter

        model_dir = Path(settings.network_model_dir) if settings.network_model_dir else default_model_dir()
        self._ref = ModelRef(str(model_dir), settings.network_backend, settings.network_device, settings.network_threads)
        try:
            folder, _ = load_network(self._ref)
        except ModelLoadError as exc:
            raise ValueError(f"diffusion.method 'network': {exc}") from None
        spec = folder.card.input_spec
        trained = float(spec.get("psf_sigma_px", estimator.psf_sigma_px))
        if abs(estimator.psf_sigma_px - trained) > 0.25 * trained:
            raise ValueError(
                f"diffusion.method 'network': the model in {model_dir} was trained for a PSF SD of {trained:.3g} px; this run's "
                f"is {estimator.psf_sigma_px:.3g} px (localize.psf_sigma_px or the optics; more than 25 % off: retrain with "
                "`scopestream train diffusion` for these optics)"
            )
        self._frames = int(spec.get("frames", 16))
        self._region = int(spec.get("region_px", 16))
        step = settings.network_step_frames or self._frames
        self._cutter = _WindowCutter(self._frames, step, self._region, settings.network_margin_px, settings.network_max_tracks)
        self._settings = settings
        self._estimator = estimator
        self._context = context
        self._estimate_stacks = estimate_stacks  # the off-thread job (module-level, picklable)
        self._lock = threading.Lock()  # on_done / on_fail run on the housekeeping thread
        self._counts = {name: 0 for name in (
            "diffusion_network_windows_submitted", "diffusion_network_windows_done", "diffusion_network_windows_busy",
            "diffusion_network_windows_invalid", "diffusion_network_windows_failed",
        )}

    def submit(self, frame: Frame, upd: TrackUpdate) -> None:
        """Cut this frame's completed windows and send each to the off-thread service."""
        windows = self._cutter.update(frame, upd)
        for w in windows.windows:
            detected = np.isfinite(w.positions_px).all(axis=1)
            unusable = (
                w.pixels.shape != (self._frames, self._region, self._region)
                or float(detected.mean()) < self._settings.network_min_detected_fraction
                or (w.pixels.dtype.kind == "f" and not np.isfinite(w.pixels).all())
            )
            if unusable:
                with self._lock:
                    self._counts["diffusion_network_windows_invalid"] += 1
                continue
            key = (w.particle, w.frame_start, w.frame_end, int(detected.sum()))
            accepted = self._context.offload.submit(
                "diffusion", self._estimate_stacks, self._ref, [w.pixels], float(self._estimator.blur),
                on_done=partial(self._on_done, key, frame.t_acquired), on_fail=partial(self._on_fail, key),
                max_in_flight=self._settings.network_max_pending, block=not self._settings.network_skip_when_busy,
            )
            with self._lock:
                self._counts["diffusion_network_windows_submitted" if accepted else "diffusion_network_windows_busy"] += 1

    def _on_done(self, key: tuple[int, int, int, int], t_acquired: float | None, result: Any) -> list[Emission]:
        particle, start, end, detected = key
        k = self._estimator._px2_per_frame_to_um2_per_s
        d = float(np.exp(result.log_D[0])) * k
        err = d * float(np.sqrt(result.var_log_D[0]))
        est = DiffusionEstimates(
            particle=np.array([particle], dtype=np.int64), frame_start=np.array([start], dtype=np.int64),
            frame_end=np.array([end], dtype=np.int64), n_steps=np.array([max(detected - 1, 0)], dtype=np.int64),
            D_um2_per_s=np.array([d]), D_err_um2_per_s=np.array([err]), D_crlb_um2_per_s=np.array([np.nan]),
            sigma_loc_nm=np.array([np.nan]), method=np.array([METHOD_CODE["network"]], dtype=np.uint8),
            window=np.array([WINDOW_LABELS.index("stack")], dtype=np.uint8),
        )
        with self._lock:
            self._counts["diffusion_network_windows_done"] += 1
        body = DiffusionBody(frame_seq=end, count=1, method="network",
                             labels={"method": list(METHOD_LABELS), "window": list(WINDOW_LABELS)})
        return [Emission("diffusion", body, est.arrays(), frame_seq=end, t_acquired=t_acquired)]

    def _on_fail(self, key: tuple[int, int, int, int], reason: str, detail: str) -> list[Emission]:
        invalid = reason == "failed" and detail.startswith("ValueError")
        with self._lock:
            self._counts["diffusion_network_windows_invalid" if invalid else "diffusion_network_windows_failed"] += 1
        return []

    def counters(self) -> dict[str, int]:
        """Window counts and the cutter's re-anchors / tracks not buffered."""
        with self._lock:
            out = dict(self._counts)
        out["diffusion_network_track_reanchors"] = self._cutter.reanchors
        out["diffusion_network_tracks_not_buffered"] = self._cutter.not_buffered
        return out


PLUGIN = StagePlugin(
    name="diffusion",
    settings_model=DiffusionSettings,
    build=DiffusionStage,
    topics={"diffusion": DiffusionBody, "diffusion_change": DiffusionChangeBody, "diffusion_segments": DiffusionSegmentsBody},
    consumes=(TrackUpdate,),
    produces=(DiffusionUpdate,),
    tables={"diffusion": "diffusion.csv", "diffusion_segments": "segments.csv"},
    description="Diffusion coefficient per track (MLE with its Cramér-Rao bound, CVE or MSD), rolling and whole-track; live change points and segments.",
)


# -- batch API ------------------------------------------------------------------------------


def estimate_diffusion(tracks: Any, config: ScopestreamConfig | None = None, **settings: Any) -> Any:
    """Diffusion coefficient of every track in a table, like ``trackpy.imsd``/``emsd`` but per
    track and blur-corrected.

    Parameters
    ----------
    tracks
        A pandas DataFrame or mapping of 1-D arrays with columns ``frame``, ``particle``, ``x``,
        ``y`` (px) and optionally ``uncertainty_px`` (needed by the MLE's known-sigma form; without
        it ``method="mle"`` fits one common sigma^2 and ``"auto"`` uses the CVE).
    config
        Pixel size, exposure and frame interval; default: the default configuration.
    **settings
        Fields of :class:`DiffusionSettings`; ``rolling=True`` adds rolling-window rows. Default
        here: ``method="cve"``, no rolling rows, no change points, ``history_frames`` the
        longest track.

    Returns
    -------
    table
        Columns ``particle, frame_start, frame_end, D_um2_per_s, D_err_um2_per_s,
        D_crlb_um2_per_s, sigma_loc_nm, n_steps, method, window``: a pandas DataFrame when pandas
        is installed, else a dict of 1-D numpy arrays. One ``window == "track"`` row per particle
        with an estimate.
    """
    cols = {name: np.asarray(tracks[name]) for name in ("frame", "particle", "x", "y")}
    try:
        unc_col = np.asarray(tracks["uncertainty_px"], dtype=np.float64)
    except (KeyError, IndexError, ValueError):
        unc_col = np.full(cols["x"].shape, np.nan)
    order = np.lexsort((cols["particle"], cols["frame"]))
    frame = cols["frame"][order].astype(np.int64)
    particle = cols["particle"][order].astype(np.int64)
    x = cols["x"][order].astype(np.float64)
    y = cols["y"][order].astype(np.float64)
    unc = unc_col[order]
    span = 3
    if frame.size:
        _, inv = np.unique(particle, return_inverse=True)
        lo = np.full(inv.max() + 1, np.iinfo(np.int64).max)
        hi = np.full(inv.max() + 1, np.iinfo(np.int64).min)
        np.minimum.at(lo, inv, frame)
        np.maximum.at(hi, inv, frame)
        span = int(max(3, (hi - lo).max() + 1))
    try:
        merged = DiffusionSettings.model_validate(
            {"rolling": False, "method": "cve", "change_points": False, "history_frames": min(span, 10_000), **settings}
        )
    except ValidationError as exc:
        raise ValueError("invalid diffusion settings: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (given {e.get('input')!r})" for e in exc.errors()
        )) from None
    est = DiffusionEstimator(merged, config)
    results: list[DiffusionEstimates] = []
    bounds = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1], True]) if frame.size else np.array([0])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        upd = TrackUpdate(int(frame[a]), particle[a:b], x[a:b], y[a:b], [], [], uncertainty_px=unc[a:b])
        rolling, _ = est.update(upd)
        if rolling is not None:
            results.append(rolling)
    final, _ = est.finish()
    if final is not None:
        results.append(final)
    table: dict[str, np.ndarray] = {}
    if results:
        allrows = DiffusionEstimates.concatenate(results)
        for name in ESTIMATE_FIELDS:
            table[name] = getattr(allrows, name)
        table["method"] = np.asarray(METHOD_LABELS)[allrows.method]
        table["window"] = np.asarray(WINDOW_LABELS)[allrows.window]
    else:
        for name in ESTIMATE_FIELDS:
            table[name] = np.empty(0)
    return as_table(table)
