"""Causal change points of many tracks at once, and what a segment is (D, alpha, regime).

Bayesian online change-point detection (Adams & MacKay 2007) on each track's displacements,
vectorized over tracks: the posterior over the run length r (displacements since the last
change) is updated with every new displacement. Within a run the 2-D displacements are modelled
as Gaussian with an unknown mean (drift, for directed motion) per axis and one unknown
precision shared by the axes (diffusion plus localization noise), under a Normal-Gamma prior; the
predictive of the next displacement is then a bivariate Student t:

    log p(d | run) = log(c alpha / (2 pi beta)) - (alpha + 1) log(1 + c q / (2 beta)),
    c = kappa / (kappa + 1),  q = |d - mu|^2

with the posterior ``kappa = kappa0 + n``, ``mu = sum d / kappa``, ``alpha = alpha0 + n``,
``beta = beta0 + (sum |d|^2 - |sum d|^2 / kappa) / 2``. The prior's scale ``beta0 / alpha0`` is the
track's own mean squared displacement so far (per axis), so the detector is scale-free. The
hazard is constant, ``1 / hazard_frames``; run lengths are truncated at ``max_run`` (longer runs
are lumped into the last bin, whose statistics are those of the last ``max_run`` displacements). Displacements across a gap of g frames are divided by sqrt(g).

Decision rule (causal): with ``s`` the start of the current segment, a change is declared at
step t when the posterior mass of run lengths shorter than ``t - s - guard`` (a change strictly
after the current segment began, at least ``guard`` steps in) exceeds ``threshold``; its position
is the most probable of those run lengths. The delay is the evidence the posterior needs: a few
displacements for a large change of D.

Segments (:func:`segment_properties`): D with its standard error from the diffusion estimators,
the anomalous exponent alpha from a log-log fit of the noise-corrected MSD over the first lags,
and the regime of the AnDi 2 challenge (Muñoz-Gil et al. 2025): ``immobile`` (D compatible with 0,
or below a floor), ``directed`` (alpha >= 1.9, or a drift significant at p < 0.001 with
alpha > 1.2), ``confined`` (alpha <= 0.6), else ``free``. Our motion-state names: immobile = Stat,
confined = RCir, free = RanW, directed = Flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["REGIME_LABELS", "REGIME_STATE_NAMES", "OnlineChangePoints", "ChangeEvents", "segment_properties"]

REGIME_LABELS: tuple[str, ...] = ("immobile", "confined", "free", "directed")
#: The simulators' motion-state names of the regimes.
REGIME_STATE_NAMES = {"immobile": "Stat", "confined": "RCir", "free": "RanW", "directed": "Flow"}


@dataclass(frozen=True)
class ChangeEvents:
    """Changes declared in one update: ``rows`` (indices of the tracks), ``change_step`` (index of
    the first displacement of the new segment), ``previous_start`` (first displacement of the
    segment that ended)."""

    rows: np.ndarray
    change_step: np.ndarray
    previous_start: np.ndarray


class OnlineChangePoints:
    """Run-length posteriors of m tracks (rows), updated one displacement per track at a time.

    Parameters
    ----------
    hazard_frames
        Expected segment length, displacements (constant hazard 1 / hazard_frames).
    threshold
        Posterior probability of a change after the current segment's start that declares it.
    guard
        Fewest displacements in a segment, and before a change can be declared.
    max_run
        Run lengths kept (longer ones are lumped into the last).
    kappa0, alpha0
        Prior strength of the drift (in displacements) and of the variance.
    """

    def __init__(
        self, hazard_frames: float = 100.0, threshold: float = 0.9, guard: int = 4, max_run: int = 64,
        kappa0: float = 0.5, alpha0: float = 1.0,
    ) -> None:
        self.log_h = float(np.log(1.0 / hazard_frames))
        self.log_1mh = float(np.log1p(-1.0 / hazard_frames))
        self.threshold = threshold
        self.guard = guard
        self.max_run = max_run
        self.kappa0 = kappa0
        self.alpha0 = alpha0
        self._alloc(0)

    def _alloc(self, m: int) -> None:
        R = self.max_run
        self.log_p = np.full((m, R), -np.inf)
        self.n = np.zeros((m, R))
        self.sx = np.zeros((m, R))
        self.sy = np.zeros((m, R))
        self.sq = np.zeros((m, R))
        self.steps = np.zeros(m, dtype=np.int64)  # displacements seen
        self.seg_start = np.zeros(m, dtype=np.int64)  # step index where the current segment began
        self.scale_sum = np.zeros(m)

    _FIELDS = ("log_p", "n", "sx", "sy", "sq", "steps", "seg_start", "scale_sum")

    def add_rows(self, k: int) -> None:
        """Append k fresh tracks."""
        fresh = OnlineChangePoints.__new__(OnlineChangePoints)
        fresh.max_run = self.max_run
        fresh._alloc(k)
        fresh.log_p[:, 0] = 0.0
        for name in self._FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(fresh, name)]))

    def reorder(self, order: np.ndarray) -> None:
        """Keep rows ``order`` (a permutation or a subset), in that order."""
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name)[order])

    def update(self, rows: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> ChangeEvents:
        """One new displacement for each of ``rows``; returns the changes declared now."""
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            e = np.empty(0, dtype=np.int64)
            return ChangeEvents(e, e, e)
        # Every track at once (the usual case): views, no gather/scatter copies.
        every = rows.size == self.steps.size and bool((rows == np.arange(rows.size)).all())
        sel: slice | np.ndarray = slice(None) if every else rows
        lp, n, sx, sy, sq = self.log_p[sel], self.n[sel], self.sx[sel], self.sy[sel], self.sq[sel]
        d2 = dx * dx + dy * dy
        self.scale_sum[rows] += d2
        steps = self.steps[sel]
        # Prior scale: the track's mean squared displacement per axis so far (this one included).
        v0 = np.maximum(self.scale_sum[rows] / (2.0 * (steps + 1)), 1e-12)
        kappa = self.kappa0 + n
        alpha = self.alpha0 + n
        beta = self.alpha0 * v0[:, None] + 0.5 * (sq - (sx * sx + sy * sy) / kappa)
        c = kappa / (kappa + 1.0)
        q = (dx[:, None] - sx / kappa) ** 2 + (dy[:, None] - sy / kappa) ** 2
        pred = np.log(c * alpha / (2.0 * np.pi * beta)) - (alpha + 1.0) * np.log1p(c * q / (2.0 * beta))
        joint = lp + pred
        top = joint.max(axis=1, keepdims=True)
        w = np.exp(joint - top)
        total = w.sum(axis=1, keepdims=True)
        # Growth (r -> r + 1, the last bin keeps its mass) and change (-> 0), normalized.
        new = np.empty_like(lp)
        new[:, 1:] = joint[:, :-1] - top - np.log(total) + self.log_1mh
        new[:, -1] = np.logaddexp(new[:, -1], joint[:, -1] - top[:, 0] - np.log(total[:, 0]) + self.log_1mh)
        new[:, 0] = self.log_h
        # Sufficient statistics of each run length after this displacement: the run of length r
        # now holds the last r + 1 displacements (r = 0: this one only).
        for arr, v in ((n, np.ones(rows.size)), (sx, dx), (sy, dy), (sq, d2)):
            arr[:, 1:] = arr[:, :-1]
            arr[:, 0] = 0.0
            arr += np.asarray(v, dtype=np.float64)[:, None]
        self.log_p[sel] = new
        if not every:
            self.n[rows], self.sx[rows], self.sy[rows], self.sq[rows] = n, sx, sy, sq
        t = steps  # index of this displacement
        self.steps[rows] = steps + 1
        # A change after the current segment's start (run shorter than t - start - guard + 1).
        limit = t - self.seg_start[rows] - self.guard + 1
        r_idx = np.arange(self.max_run)[None, :]
        # The last bin lumps every longer run (no change in max_run steps): never 'inside'.
        inside = r_idx < np.minimum(limit, self.max_run - 1)[:, None]
        prob = np.exp(np.where(inside, new, -np.inf)).sum(axis=1)
        fire = (prob > self.threshold) & (limit > 0) & (t + 1 - self.seg_start[rows] >= 2 * self.guard)
        if not fire.any():
            e = np.empty(0, dtype=np.int64)
            return ChangeEvents(e, e, e)
        best = np.argmax(np.where(inside, new, -np.inf), axis=1)[fire]
        where = rows[fire]
        change = t[fire] - best  # first displacement of the new run
        previous = self.seg_start[where].copy()
        self.seg_start[where] = change
        return ChangeEvents(where.astype(np.int64), change.astype(np.int64), previous)


def segment_properties(
    frames: np.ndarray, x: np.ndarray, y: np.ndarray, sigma2_px2: np.ndarray, D_px2_per_frame: np.ndarray,
    D_err_px2_per_frame: np.ndarray, immobile_D_px2_per_frame: float, max_lag: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Anomalous exponent and regime code of m segments.

    Parameters
    ----------
    frames, x, y
        (m, L) padded positions (frames < 0 or NaN: no point), px.
    sigma2_px2
        (m,) localization variance of each segment (NaN: 0), subtracted from the MSD.
    D_px2_per_frame, D_err_px2_per_frame
        (m,) the segments' D and its standard error.
    immobile_D_px2_per_frame
        D below which a segment is immobile whatever its error.
    max_lag
        Largest MSD lag of the alpha fit (also at most a third of the segment).

    Returns
    -------
    alpha, regime
        (m,) alpha in [0, 2] (NaN with fewer than 2 usable lags) and codes into
        :data:`REGIME_LABELS`.
    """
    frames = np.asarray(frames, dtype=np.int64)
    m, L = frames.shape
    ok = (frames >= 0) & np.isfinite(x) & np.isfinite(y)
    count = ok.sum(axis=1)
    top = int(min(max_lag, max(L - 1, 1)))
    lags = np.arange(1, top + 1)
    msd = np.full((m, top), np.nan)
    for i, lag in enumerate(lags):
        pair = ok[:, lag:] & ok[:, :-lag] & ((frames[:, lag:] - frames[:, :-lag]) == lag)
        d2 = (x[:, lag:] - x[:, :-lag]) ** 2 + (y[:, lag:] - y[:, :-lag]) ** 2
        cnt = pair.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            msd[:, i] = np.where(cnt > 0, np.where(pair, d2, 0.0).sum(axis=1) / cnt, np.nan)
    noise = 4.0 * np.nan_to_num(np.asarray(sigma2_px2, dtype=np.float64))
    use_lag = lags[None, :] <= np.maximum(count // 3, 2)[:, None]
    corrected = msd - noise[:, None]
    good = use_lag & np.isfinite(corrected) & (corrected > 0)
    lx = np.log(lags)[None, :] * good
    ly = np.where(good, np.log(np.where(good, corrected, 1.0)), 0.0)
    k = good.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (k * (lx * ly).sum(1) - lx.sum(1) * ly.sum(1)) / (k * (lx * lx).sum(1) - lx.sum(1) ** 2)
    alpha = np.where(k >= 2, np.clip(slope, 0.0, 2.0), np.nan)
    # Drift: mean one-frame displacement against its spread (chi-square with 2 dof).
    one = ok[:, 1:] & ok[:, :-1] & ((frames[:, 1:] - frames[:, :-1]) == 1)
    dx = np.where(one, x[:, 1:] - x[:, :-1], 0.0)
    dy = np.where(one, y[:, 1:] - y[:, :-1], 0.0)
    n1 = one.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = dx.sum(1) / n1, dy.sum(1) / n1
        var = (np.where(one, (dx - mx[:, None]) ** 2 + (dy - my[:, None]) ** 2, 0.0).sum(1)) / (2.0 * np.maximum(n1 - 1, 1))
        drift_chi2 = n1 * (mx * mx + my * my) / var
    D = np.asarray(D_px2_per_frame, dtype=np.float64)
    err = np.asarray(D_err_px2_per_frame, dtype=np.float64)
    regime = np.full(m, REGIME_LABELS.index("free"), dtype=np.uint8)
    a = np.nan_to_num(alpha, nan=1.0)
    regime[a <= 0.6] = REGIME_LABELS.index("confined")
    directed = (a >= 1.9) | ((np.nan_to_num(drift_chi2) > 13.8) & (a > 1.2))
    regime[directed] = REGIME_LABELS.index("directed")
    immobile = ~directed & ((np.nan_to_num(D, nan=0.0) <= 2.0 * np.nan_to_num(err, nan=np.inf)) | (np.nan_to_num(D) < immobile_D_px2_per_frame))
    regime[immobile] = REGIME_LABELS.index("immobile")
    return alpha, regime
