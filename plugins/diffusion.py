"""Diffusion coefficient per track, online: rolling windows and whole tracks.

Default estimator: the covariance-based estimator (CVE) of Vestergaard, Blainey & Flyvbjerg
(2014), per axis, from successive displacements ``d_n`` over the frame interval dt:

    D = <d_n^2> / (2 dt) + <d_n d_(n+1)> / dt
    sigma^2 = R <d_n^2> + (2R - 1) <d_n d_(n+1)>
    var(D) = D^2 [(6 + 4 e + 2 e^2) / N + 4 (1 + e)^2 / N^2],  e = sigma^2 / (D dt) - 2R

with the motion-blur coefficient ``R = exposure / (6 frame interval)`` (uniform illumination
during the exposure, ``acquisition.exposure_ms`` / ``acquisition.frame_interval_ms``). It is
unbiased under blur and localization noise. x and y are averaged (the variance halves).
Displacements are taken only between consecutive frames, and covariances only between
consecutive displacements, so gap-closed tracks stay unbiased. D may come out negative for a
nearly immobile particle (the estimator is unbiased, not clipped); sigma_loc is reported only
when its variance estimate is positive.

Alternative (``method="msd"``): an ordinary least-squares fit of the 2-D MSD at lags 1..p,
``MSD(n) = 4 D dt (n - 2R) + 4 sigma^2``, with the number of points p chosen from the reduced
localization error ``x = sigma^2 / (D dt)`` as Michalet (2010) / Michalet & Berglund (2012)
recommend, iterated from p = 2 (we use their long-track approximation p = 2 + 1.6 x^0.51,
capped at ``msd_max_lag`` and half the number of steps). Its reported error is the CVE formula
at the fitted values (a lower bound for the fit).

Units: D in um^2/s (``optics.pixel_size_nm``, ``acquisition.frame_interval_ms``), sigma_loc in
nm. A track with fewer than ``min_steps`` displacements (or no covariance pair) has D undefined:
``None``, never a number.

State is kept in arrays over open tracks (running sums for the whole track, a ring buffer of
the last positions for the rolling window and the MSD lags): the per-frame work is vectorized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import DiffusionEstimates, DiffusionUpdate, Products, TrackUpdate
from scopestream.daemon._stage import Emission, RunContext, StagePlugin
from scopestream.daemon._tables import as_table

__all__ = [
    "DiffusionSettings",
    "DiffusionBody",
    "DiffusionEstimates",
    "DiffusionEstimator",
    "DiffusionUpdate",
    "DiffusionStage",
    "cve_from_sums",
    "cve_variance",
    "estimate_bodies",
    "estimate_diffusion",
    "PLUGIN",
]


class DiffusionSettings(BaseModel):
    """Settings of the ``diffusion`` stage (configuration section ``diffusion``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    method: Literal["cve", "msd"] = Field(
        "cve", description="'cve': covariance-based estimator (Vestergaard et al. 2014); 'msd': MSD fit with the optimal number of points (Michalet & Berglund 2012)."
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


class DiffusionBody(BaseModel):
    """Body of a ``diffusion`` event: one estimate for one track over a span of frames."""

    model_config = ConfigDict(frozen=True)

    particle: int = Field(description="Track id (as in the 'track' topic).")
    frame_start: int = Field(description="First frame of the span (daemon frame_seq).")
    frame_end: int = Field(description="Last frame of the span (daemon frame_seq).")
    D_um2_per_s: float | None = Field(description="Diffusion coefficient, um^2/s; None when the span is too short.")
    D_err_um2_per_s: float | None = Field(description="Its standard error (theory, at the estimate), um^2/s; None when undefined.")
    sigma_loc_nm: float | None = Field(description="Estimated static localization error (one axis, SD), nm; None when undefined or its variance estimate is not positive.")
    n_steps: int = Field(description="Number of frame-to-frame displacements used.")
    window: Literal["rolling", "track"] = Field(description="'rolling': the last window_frames frames; 'track': the whole track.")
    method: Literal["cve", "msd"] = Field(description="Estimator used.")


def estimate_bodies(est: DiffusionEstimates, method: Literal["cve", "msd"]) -> list[DiffusionBody]:
    """One event body per estimate (NaN -> None)."""
    def opt(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    return [
        DiffusionBody(
            particle=int(p), frame_start=int(fs), frame_end=int(fe), D_um2_per_s=opt(d), D_err_um2_per_s=opt(e),
            sigma_loc_nm=opt(s), n_steps=int(n), window=est.window, method=method,
        )
        for p, fs, fe, d, e, s, n in zip(
            est.particle, est.frame_start, est.frame_end, est.D_um2_per_s, est.D_err_um2_per_s,
            est.sigma_loc_nm, est.n_steps, strict=True,
        )
    ]


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


class DiffusionEstimator:
    """Per-track diffusion state and estimates, fed one :class:`TrackUpdate` per frame.

    Parameters
    ----------
    settings
        The stage settings.
    config
        Pixel size, exposure and frame interval come from here.
    """

    def __init__(self, settings: DiffusionSettings, config: ScopestreamConfig | None = None) -> None:
        config = config if config is not None else ScopestreamConfig()
        self.settings = settings
        acq = config.acquisition
        self.blur = (
            settings.blur_coefficient if settings.blur_coefficient is not None
            else acq.exposure_ms / (6.0 * acq.frame_interval_ms)
        )
        px_um = config.optics.pixel_size_nm / 1000.0
        self._px2_per_frame_to_um2_per_s = px_um**2 / (acq.frame_interval_ms / 1000.0)
        self._px_to_nm = config.optics.pixel_size_nm
        self._lags = settings.msd_max_lag if settings.method == "msd" else 1
        self._ring_len = max(settings.window_frames, self._lags + 1)
        self._step = settings.step_frames if settings.step_frames is not None else max(1, settings.window_frames // 2)
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
        self.ring_frame = np.empty((n, L), dtype=np.int64)
        self.msd_sum = np.empty((n, K))
        self.msd_n = np.empty((n, K), dtype=np.int64)
        self.next_rolling = np.empty(n, dtype=np.int64)

    _FIELDS = (
        "ids", "first_frame", "last_frame", "last_pos", "last_disp", "last_disp_frame", "sum_sq", "n_sq",
        "sum_cov", "n_cov", "ring", "ring_frame", "msd_sum", "msd_n", "next_rolling",
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
        fresh.ids[:] = new_ids
        fresh.first_frame[:] = frame
        fresh.last_frame[:] = -(10**12)
        fresh.last_pos[:] = 0.0
        fresh.last_disp[:] = 0.0
        fresh.ring[:] = 0.0
        fresh.last_disp_frame[:] = -(10**12)
        fresh.sum_sq[:] = 0.0
        fresh.n_sq[:] = 0
        fresh.sum_cov[:] = 0.0
        fresh.n_cov[:] = 0
        fresh.ring_frame[:] = -(10**12)
        fresh.msd_sum[:] = 0.0
        fresh.msd_n[:] = 0
        fresh.next_rolling[:] = frame + self.settings.window_frames - 1
        for name in self._FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(fresh, name)]))
        if n and self.ids.size > n and new_ids.min() <= self.ids[: self.ids.size - n].max():
            order = np.argsort(self.ids, kind="stable")
            for name in self._FIELDS:
                setattr(self, name, getattr(self, name)[order])

    def _remove(self, slots: np.ndarray) -> None:
        keep = np.ones(self.ids.size, dtype=bool)
        keep[slots] = False
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name)[keep])

    def update(self, upd: TrackUpdate) -> tuple[DiffusionEstimates | None, DiffusionEstimates | None]:
        """Add one frame's track positions; returns (rolling estimates due, whole-track
        estimates of the tracks that ended), each None when there is none."""
        f = int(upd.frame_seq)
        ids = np.asarray(upd.particle, dtype=np.int64)
        if ids.size:
            known = np.isin(ids, self.ids)
            if not known.all():
                self._add_tracks(np.unique(ids[~known]), f)
            slot = np.searchsorted(self.ids, ids)
            pos = np.column_stack([upd.x, upd.y]).astype(np.float64)
            consecutive = self.last_frame[slot] == f - 1
            disp = pos - self.last_pos[slot]
            sq = np.where(consecutive, (disp * disp).sum(axis=1), 0.0)
            self.sum_sq[slot] += sq
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
            self.ring_frame[slot, j] = f
            self.last_pos[slot] = pos
            self.last_frame[slot] = f
        rolling = None
        if self.settings.rolling and ids.size:
            due = slot[self.next_rolling[slot] <= f]
            if due.size:
                rolling = self._window_estimates(due, f)
                self.next_rolling[due] = f + self._step
        ended = None
        if upd.ended:
            gone = np.asarray(upd.ended, dtype=np.int64)
            gone = gone[np.isin(gone, self.ids)]
            if gone.size:
                slots = np.searchsorted(self.ids, gone)
                ended = self._track_estimates(slots)
                self._remove(slots)
        return rolling, ended

    def finish(self) -> DiffusionEstimates | None:
        """Whole-track estimates of every open track (run end); clears the state."""
        if self.ids.size == 0:
            return None
        out = self._track_estimates(np.arange(self.ids.size))
        self._alloc(0)
        return out

    # -- estimates ------------------------------------------------------------------------

    def _track_estimates(self, slots: np.ndarray) -> DiffusionEstimates:
        s = self.settings
        if s.method == "cve":
            d, err, sig2 = cve_from_sums(self.sum_sq[slots], self.n_sq[slots], self.sum_cov[slots], self.n_cov[slots], self.blur, s.min_steps)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                msd = self.msd_sum[slots] / self.msd_n[slots]
            d, err, sig2 = self._msd_estimates(msd, self.msd_n[slots], self.n_sq[slots], self.n_cov[slots])
        return self._pack(self.ids[slots], self.first_frame[slots], self.last_frame[slots], self.n_sq[slots], d, err, sig2, "track")

    def _window_estimates(self, slots: np.ndarray, f: int) -> DiffusionEstimates:
        s = self.settings
        w = s.window_frames
        frames = f - w + 1 + np.arange(w)
        j = frames % self._ring_len
        pos = self.ring[slots][:, j]  # (m, W, 2)
        valid = self.ring_frame[slots][:, j] == frames[None, :]
        step_ok = valid[:, 1:] & valid[:, :-1]
        disp = np.where(step_ok[:, :, None], pos[:, 1:] - pos[:, :-1], 0.0)
        sq = (disp * disp).sum(axis=2)
        n_sq = step_ok.sum(axis=1)
        pair_ok = step_ok[:, 1:] & step_ok[:, :-1]
        n_cov = pair_ok.sum(axis=1)
        if s.method == "cve":
            cov = np.where(pair_ok, (disp[:, 1:] * disp[:, :-1]).sum(axis=2), 0.0)
            d, err, sig2 = cve_from_sums(sq.sum(axis=1), n_sq, cov.sum(axis=1), n_cov, self.blur, s.min_steps)
        else:
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
        return self._pack(self.ids[slots], first, np.full(slots.size, f), n_sq, d, err, sig2, "rolling")

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
        self, ids: np.ndarray, first: np.ndarray, last: np.ndarray, n_steps: np.ndarray,
        d: np.ndarray, err: np.ndarray, sig2: np.ndarray, window: Literal["rolling", "track"],
    ) -> DiffusionEstimates:
        k = self._px2_per_frame_to_um2_per_s
        with np.errstate(invalid="ignore"):
            sigma_nm = np.where(sig2 > 0, np.sqrt(np.where(sig2 > 0, sig2, 0.0)) * self._px_to_nm, np.nan)
        return DiffusionEstimates(
            particle=np.asarray(ids, dtype=np.int64), frame_start=np.asarray(first, dtype=np.int64),
            frame_end=np.asarray(last, dtype=np.int64), n_steps=np.asarray(n_steps, dtype=np.int64),
            D_um2_per_s=d * k, D_err_um2_per_s=err * k, sigma_loc_nm=sigma_nm, window=window,
        )


# -- stage ----------------------------------------------------------------------------------


class DiffusionStage:
    """The ``diffusion`` stage: consumes the :class:`TrackUpdate`, produces a
    :class:`DiffusionUpdate` and publishes ``diffusion`` events (rolling estimates when due;
    whole-track estimates when a track ends and at run end)."""

    name = "diffusion"

    def __init__(self, config: ScopestreamConfig, settings: DiffusionSettings) -> None:
        self._config = config
        self._estimator = DiffusionEstimator(settings, config)
        self._last_frame: tuple[int, float | None] | None = None

    def setup(self, context: RunContext) -> None:
        """Nothing to prepare: the estimator's arrays grow with the open tracks."""

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Add this frame's track positions; emit estimates that are due."""
        upd = products.require(TrackUpdate, self.name)
        self._last_frame = (frame.seq, frame.t_acquired)
        rolling, ended = self._estimator.update(upd)
        out = tuple(e for e in (rolling, ended) if e is not None)
        products.put(DiffusionUpdate(frame.seq, out))
        return self._emissions(out, frame.seq, frame.t_acquired)

    def _emissions(self, estimates: Sequence[DiffusionEstimates], frame_seq: int | None, t: float | None) -> list[Emission]:
        method = self._estimator.settings.method
        return [
            Emission("diffusion", body, frame_seq=frame_seq, t_acquired=t)
            for est in estimates for body in estimate_bodies(est, method)
        ]

    def teardown(self) -> Sequence[Emission]:
        """Whole-track estimates of the tracks still open at run end."""
        final = self._estimator.finish()
        if final is None:
            return []
        seq, t = self._last_frame if self._last_frame is not None else (None, None)
        return self._emissions([final], seq, t)


PLUGIN = StagePlugin(
    name="diffusion",
    settings_model=DiffusionSettings,
    build=DiffusionStage,
    topics={"diffusion": DiffusionBody},
    consumes=(TrackUpdate,),
    produces=(DiffusionUpdate,),
    tables={"diffusion": "diffusion.csv"},
    description="Diffusion coefficient per track (covariance-based estimator, or optimal MSD fit), rolling and whole-track.",
)


# -- batch API ------------------------------------------------------------------------------


def estimate_diffusion(tracks: Any, config: ScopestreamConfig | None = None, **settings: Any) -> Any:
    """Diffusion coefficient of every track in a table, like ``trackpy.imsd``/``emsd`` but per
    track and blur-corrected.

    Parameters
    ----------
    tracks
        A pandas DataFrame or mapping of 1-D arrays with columns ``frame``, ``particle``, ``x``,
        ``y`` (px), e.g. from :func:`scopestream.plugins.track.link`.
    config
        Pixel size, exposure and frame interval; default: the default configuration.
    **settings
        Fields of :class:`DiffusionSettings`; ``rolling=True`` adds rolling-window rows.

    Returns
    -------
    table
        Columns ``particle, frame_start, frame_end, D_um2_per_s, D_err_um2_per_s, sigma_loc_nm,
        n_steps, window`` (NaN where undefined): a pandas DataFrame when pandas is installed,
        else a dict of 1-D numpy arrays. One ``window == "track"`` row per particle.
    """
    try:
        merged = DiffusionSettings.model_validate({"rolling": False, **settings})
    except ValidationError as exc:
        raise ValueError("invalid diffusion settings: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (given {e.get('input')!r})" for e in exc.errors()
        )) from None
    est = DiffusionEstimator(merged, config)
    cols = {name: np.asarray(tracks[name]) for name in ("frame", "particle", "x", "y")}
    order = np.lexsort((cols["particle"], cols["frame"]))
    frame = cols["frame"][order].astype(np.int64)
    particle = cols["particle"][order].astype(np.int64)
    x = cols["x"][order].astype(np.float64)
    y = cols["y"][order].astype(np.float64)
    results: list[DiffusionEstimates] = []
    bounds = np.flatnonzero(np.r_[True, frame[1:] != frame[:-1], True]) if frame.size else np.array([0])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        upd = TrackUpdate(int(frame[a]), particle[a:b], x[a:b], y[a:b], [], [])
        rolling, _ = est.update(upd)
        if rolling is not None:
            results.append(rolling)
    final = est.finish()
    if final is not None:
        results.append(final)
    names = ("particle", "frame_start", "frame_end", "D_um2_per_s", "D_err_um2_per_s", "sigma_loc_nm", "n_steps")
    table: dict[str, np.ndarray] = {
        n: np.concatenate([getattr(r, n) for r in results]) if results else np.empty(0) for n in names
    }
    table["window"] = np.concatenate([np.full(len(r), r.window) for r in results]) if results else np.empty(0, dtype="<U7")
    return as_table(table)
