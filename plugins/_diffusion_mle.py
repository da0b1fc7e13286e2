"""Maximum-likelihood diffusion coefficient of many tracks at once, with motion blur, gaps and a
localization error per point; its Fisher information and Cramér-Rao bound.

Model (Berglund 2010, PRE 82 011917; per-point errors: Relich et al. 2016, PRE 93 042401). A
track's measured positions ``x_0 .. x_n`` (per axis, px) are exposure-averaged positions plus
independent Gaussian errors of variance ``s_i`` (``s_i = sigma_i^2``). Its displacements
``d_k = x_(k+1) - x_k`` over ``g_k`` frames (1 without a gap) are jointly Gaussian with a
tridiagonal covariance (units px^2 and frames, D in px^2/frame)::

    Var d_k          = 2 D (g_k - 2R) + s_k + s_(k+1)
    Cov(d_k, d_(k+1)) = 2 D R - s_(k+1)

with the blur coefficient ``R`` (``exposure / (6 frame interval)`` for a uniformly lit
exposure; 0 stroboscopic). With one ``s`` and no gaps the matrix is Toeplitz (the sine basis
diagonalizes it); with ``s_i`` per point it is not, but it stays tridiagonal, so its LDL^T
(banded Cholesky) factorization costs O(n).

Every covariance used here is *linear in the parameters*: ``Sigma = sum_p theta_p M_p + C`` with
fixed tridiagonal ``M_p`` and ``C``:

- ``known``: theta = (D,); ``M_0 = A + gamma S``, ``C = S`` (S from the reported sigma_i; gamma the
  blur inflation of the variances per unit D, see :mod:`scopestream.plugins._loc_calibration`).
- ``scaled``: theta = (D, kappa); ``M_0 = A``, ``M_1 = S`` (the reported variances are right up
  to a common factor kappa).
- ``common``: theta = (D, s); ``M_0 = A``, ``M_1 = B`` with B the structure of one common
  variance (diagonal 2, off-diagonal -1): Berglund's joint estimate.

One pass of the LDL^T recursion along the displacements, vectorized over tracks (padded to the
longest), carries forward-mode derivatives of the pivots: it returns the log-likelihood (both
axes), its gradient, and the Fisher information ``I_pq = (1/2) tr(Sigma^-1 M_p Sigma^-1 M_q)``
per axis, exactly (``-d^2 log det Sigma / d theta_p d theta_q``, because Sigma is linear).
The maximum is found by Fisher scoring, projected onto D >= 0 (the MLE of an immobile
particle is D = 0, not a negative number), with step halving when the likelihood drops; a few
iterations from a moment estimate or from the previous estimate of the same track (warm
start). The bound ``(I^-1)_DD`` is evaluated at the estimate.

Units inside: px and frames. Each track is rescaled by its mean squared displacement so that
the parameters are O(1) whatever the pixel size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "DisplacementSeries",
    "TridiagonalModel",
    "MLEResult",
    "displacement_series",
    "build_model",
    "evaluate",
    "fit_mle",
    "score_test_kappa",
    "blur_coefficient",
    "BatchEstimates",
    "METHOD_LABELS",
    "METHOD_CODE",
    "estimate_batch",
    "cve_series",
    "warm_up_kernel",
]

Kind = Literal["known", "scaled", "common"]


def blur_coefficient(exposure_ms: float, frame_interval_ms: float, substeps: int | None = None) -> float:
    """Motion-blur coefficient R of a uniformly lit exposure.

    ``R = t_E / (6 dt)``; a camera that samples the position at ``substeps`` equally spaced
    instants (midpoints of equal slices) of the exposure instead of integrating continuously
    has ``R = t_E (1 - 1/substeps^2) / (6 dt)`` (Berglund's ``R = (1/dt) int S(t)(1 - S(t)) dt``
    with S the cumulative exposure weight, a staircase here).
    """
    r = exposure_ms / (6.0 * frame_interval_ms)
    if substeps is not None:
        r *= 1.0 - 1.0 / substeps**2
    return float(r)


@dataclass(frozen=True)
class DisplacementSeries:
    """Displacements of m tracks, left-justified and padded to n.

    Attributes
    ----------
    dx, dy
        (m, n) displacements, px; 0 in the padding.
    gap
        (m, n) frames spanned by each displacement (1 without a gap); 0 in the padding.
    s_start, s_end
        (m, n) localization variances of the displacement's first and last point, px^2 (NaN
        where unknown).
    n
        (m,) number of displacements of each track.
    frame_start, frame_end
        (m,) first and last frame with a position.
    """

    dx: np.ndarray
    dy: np.ndarray
    gap: np.ndarray
    s_start: np.ndarray
    s_end: np.ndarray
    n: np.ndarray
    frame_start: np.ndarray
    frame_end: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """(m, n) True on real displacements."""
        return np.arange(self.dx.shape[1])[None, :] < self.n[:, None]

    def sigma_known(self) -> np.ndarray:
        """(m,) True where every point of the track has a finite, positive variance."""
        ok = np.isfinite(self.s_start) & (self.s_start > 0) & np.isfinite(self.s_end) & (self.s_end > 0)
        return (ok | ~self.valid).all(axis=1) & (self.n > 0)


def displacement_series(
    frames: np.ndarray, x: np.ndarray, y: np.ndarray, sigma_px: np.ndarray | None = None
) -> DisplacementSeries:
    """Displacements between consecutive observed points of padded tracks.

    Parameters
    ----------
    frames
        (m, L) frame numbers, increasing along each row where valid; negative = no point.
    x, y
        (m, L) positions, px; a point whose x or y is NaN counts as missing.
    sigma_px
        (m, L) localization uncertainty (one axis, SD), px; None or NaN where unknown.

    Returns
    -------
    DisplacementSeries
        With n = L - 1 columns (possibly zero tracks or columns).
    """
    frames = np.asarray(frames, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, L = x.shape
    sig = np.full((m, L), np.nan) if sigma_px is None else np.asarray(sigma_px, dtype=np.float64)
    ok = (frames >= 0) & np.isfinite(x) & np.isfinite(y)
    # Left-justify the valid points of each row (stable: keeps their order).
    order = np.argsort(~ok, axis=1, kind="stable")
    ok_c = np.take_along_axis(ok, order, 1)
    f_c = np.take_along_axis(frames, order, 1)
    x_c = np.take_along_axis(x, order, 1)
    y_c = np.take_along_axis(y, order, 1)
    s_c = np.take_along_axis(sig, order, 1) ** 2
    count = ok_c.sum(axis=1)
    n = np.maximum(count - 1, 0)
    width = max(L - 1, 0)
    valid = np.arange(width)[None, :] < n[:, None]
    dx = np.where(valid, x_c[:, 1:] - x_c[:, :-1], 0.0)
    dy = np.where(valid, y_c[:, 1:] - y_c[:, :-1], 0.0)
    gap = np.where(valid, f_c[:, 1:] - f_c[:, :-1], 0)
    s_start = np.where(valid, s_c[:, :-1], np.nan)
    s_end = np.where(valid, s_c[:, 1:], np.nan)
    first = np.where(count > 0, f_c[:, 0], -1)
    last = np.where(count > 0, np.take_along_axis(f_c, np.maximum(count - 1, 0)[:, None], 1)[:, 0], -1)
    return DisplacementSeries(dx, dy, gap, s_start, s_end, n, first, last)


@dataclass(frozen=True)
class TridiagonalModel:
    """``Sigma(theta) = sum_p theta_p M_p + C``, tridiagonal, for m tracks of n displacements.

    ``Ma`` (P, m, n) / ``Mb`` (P, m, n) are the diagonals / super-diagonals (``Mb[..., k]`` couples
    k and k + 1; the last column and the padding are 0) of the M_p; ``Ca``, ``Cb`` (m, n) of C
    (``Ca`` is 1 in the padding so that padded pivots are 1). ``dx``, ``dy`` (m, n) are the data,
    rescaled by ``scale`` (m,) px^2: parameters are in units of ``scale`` (D per frame).
    """

    kind: Kind
    Ma: np.ndarray
    Mb: np.ndarray
    Ca: np.ndarray
    Cb: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    n: np.ndarray
    scale: np.ndarray
    blur: float = 0.0

    @property
    def n_params(self) -> int:
        return int(self.Ma.shape[0])

    def take(self, rows: np.ndarray) -> TridiagonalModel:
        """The model of a subset of the tracks."""
        return TridiagonalModel(
            self.kind, self.Ma[:, rows], self.Mb[:, rows], self.Ca[rows], self.Cb[rows], self.dx[rows],
            self.dy[rows], self.n[rows], self.scale[rows], self.blur,
        )


def build_model(
    series: DisplacementSeries, blur: float, kind: Kind, gamma_per_px2_per_frame: float = 0.0,
) -> TridiagonalModel:
    """The covariance model of each track's displacements.

    Parameters
    ----------
    series
        The displacements.
    blur
        Motion-blur coefficient R (0 to 1/4).
    kind
        ``"known"`` (variances as given), ``"scaled"`` (given variances times a free factor) or
        ``"common"`` (one free variance for every point; the given ones are ignored).
    gamma_per_px2_per_frame
        ``known`` only: the true variance of a point is the given one times ``1 + gamma D``
        (blur inflation of the localization error; 0 for none).
    """
    valid = series.valid
    m, n = series.dx.shape
    vf = valid.astype(np.float64)
    pair = valid[:, 1:] & valid[:, :-1] if n else np.zeros((m, 0), dtype=bool)
    a_diag = 2.0 * (series.gap - 2.0 * blur) * vf
    a_off = np.zeros((m, n))
    a_off[:, :-1] = 2.0 * blur * pair
    if kind == "common":
        s_diag = 2.0 * vf
        s_off = np.zeros((m, n))
        s_off[:, :-1] = -1.0 * pair
    else:
        s_start = np.where(valid, series.s_start, 0.0)
        s_end = np.where(valid, series.s_end, 0.0)
        s_diag = s_start + s_end
        s_off = np.zeros((m, n))
        s_off[:, :-1] = np.where(pair, -s_end[:, :-1], 0.0)
    # Rescale each track: displacements by sqrt(scale), variances and D by scale.
    with np.errstate(invalid="ignore", divide="ignore"):
        msq = ((series.dx**2 + series.dy**2) * vf).sum(axis=1) / (2.0 * np.maximum(series.n, 1))
    scale = np.where(np.isfinite(msq) & (msq > 0), msq, 1.0)
    root = np.sqrt(scale)[:, None]
    dx, dy = series.dx / root, series.dy / root
    pad = (~valid).astype(np.float64)
    if kind == "known":
        s_diag_n, s_off_n = s_diag / scale[:, None], s_off / scale[:, None]
        g = gamma_per_px2_per_frame * scale[:, None]  # gamma in rescaled units of D
        Ma = (a_diag + g * s_diag_n)[None]
        Mb = (a_off + g * s_off_n)[None]
        Ca, Cb = s_diag_n + pad, s_off_n
    else:
        div = 1.0 if kind == "common" else scale[:, None]
        Ma = np.stack([a_diag, s_diag / div])
        Mb = np.stack([a_off, s_off / div])
        Ca, Cb = pad, np.zeros((m, n))
    return TridiagonalModel(kind, Ma, Mb, Ca, Cb, dx, dy, series.n.copy(), scale, float(blur))


def evaluate(model: TridiagonalModel, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-likelihood (both axes, without the 2 pi constant), gradient and Fisher information.

    Parameters
    ----------
    model
        The model of m tracks with P parameters.
    theta
        (m, P) parameters (rescaled units).

    Returns
    -------
    loglik, grad, fisher
        (m,), (m, P), (m, P, P). ``loglik`` is -inf where Sigma is not positive definite.
    """
    P = model.n_params
    m, n = model.dx.shape
    th = np.asarray(theta, dtype=np.float64).T[:, :, None]  # (P, m, 1)
    a_all = (th * model.Ma).sum(axis=0) + model.Ca  # (m, n)
    b_all = (th * model.Mb).sum(axis=0) + model.Cb
    # The recursion runs along the displacements (vectorized over tracks) and only stores the
    # pivots d_k, their derivatives and the forward-substituted data z_k; the sums that make the
    # likelihood, gradient and information are taken over all k at once afterwards.
    kernel = _compiled_recursion()
    if kernel is not None:
        loglik = np.empty(m)
        grad = np.empty((m, P))
        fisher = np.empty((m, P, P))
        kernel(
            np.ascontiguousarray(a_all), np.ascontiguousarray(b_all), np.ascontiguousarray(model.Ma),
            np.ascontiguousarray(model.Mb), np.ascontiguousarray(model.dx), np.ascontiguousarray(model.dy),
            loglik, grad, fisher,
        )
        return loglik, grad, fisher
    D = np.empty((n, m))
    Dp = np.empty((n, P, m))
    Dpq = np.empty((n, P, P, m))
    Z = np.empty((n, 2, m))
    Zp = np.empty((n, P, 2, m))
    if n:
        aT = np.ascontiguousarray(a_all.T)
        bT = np.ascontiguousarray(b_all.T)
        maT = np.ascontiguousarray(np.moveaxis(model.Ma, 2, 0))  # (n, P, m)
        mbT = np.ascontiguousarray(np.moveaxis(model.Mb, 2, 0))
        data = np.stack([model.dx.T, model.dy.T], axis=1)  # (n, 2, m)
        d = D[0] = aT[0]
        dp = Dp[0] = maT[0]
        dpq = Dpq[0] = 0.0
        z = Z[0] = data[0]
        zp = Zp[0] = 0.0
        dpq, zp = Dpq[0], Zp[0]
        for k in range(1, n):
            b = bT[k - 1]
            mb = mbT[k - 1]
            r = b / d
            rp = (mb - r * dp) / d  # (P, m)
            r2 = r * r
            d = D[k] = aT[k] - r * b
            dp = Dp[k] = maT[k] - 2.0 * r * mb + r2 * dp
            dpq = Dpq[k] = r2 * dpq - 2.0 * D[k - 1] * rp[:, None, :] * rp[None, :, :]
            zp = Zp[k] = -rp[:, None, :] * z[None] - r * zp
            z = Z[k] = data[k] - r * z
    bad = ~(D > 0).all(axis=0)
    dd = np.where(D > 0, D, 1.0)
    inv = 1.0 / dd  # (n, m)
    logdet = np.log(dd).sum(axis=0)
    dpi = Dp * inv[:, None, :]  # (n, P, m)
    g_logdet = dpi.sum(axis=0)
    h_logdet = (Dpq * inv[:, None, None, :]).sum(axis=0) - np.einsum("kpm,kqm->pqm", dpi, dpi)
    zz = (Z * Z).sum(axis=1)  # (n, m)
    q = (zz * inv).sum(axis=0)
    g_q = 2.0 * ((Z[:, None] * Zp).sum(axis=2) * inv[:, None, :]).sum(axis=0) - ((zz * inv)[:, None, :] * dpi).sum(axis=0)
    loglik = np.where(bad, -np.inf, -logdet - 0.5 * q)
    grad = (-g_logdet - 0.5 * g_q).T
    fisher = np.moveaxis(-h_logdet, 2, 0)
    return loglik, grad, fisher


def _evaluate_compiled(
    a_all: np.ndarray, b_all: np.ndarray, Ma: np.ndarray, Mb: np.ndarray, dx: np.ndarray, dy: np.ndarray,
    loglik: np.ndarray, grad: np.ndarray, fisher: np.ndarray,
) -> None:  # pragma: no cover - compiled by numba; the numpy code of evaluate is the reference
    """:func:`evaluate` as scalar loops, one track at a time (compiled with numba): the same
    recursion, the same operations in the same order (no fast-math), the sums over k taken in
    order as numpy's reductions along the outer axis take them; results agree with the numpy
    code to rounding (``log`` may differ in the last bit)."""
    P, m, n = Ma.shape
    dp = np.empty(P)
    dpq = np.empty((P, P))
    zp = np.empty((P, 2))
    rp = np.empty(P)
    g_logdet = np.empty(P)
    h_a = np.empty((P, P))
    h_b = np.empty((P, P))
    gq_a = np.empty(P)
    gq_b = np.empty(P)
    for j in range(m):
        bad = False
        logdet = 0.0
        q = 0.0
        g_logdet[:] = 0.0
        h_a[:] = 0.0
        h_b[:] = 0.0
        gq_a[:] = 0.0
        gq_b[:] = 0.0
        d = 0.0
        z0 = 0.0
        z1 = 0.0
        for k in range(n):
            if k == 0:
                d = a_all[j, 0]
                for p in range(P):
                    dp[p] = Ma[p, j, 0]
                    for p2 in range(P):
                        dpq[p, p2] = 0.0
                    zp[p, 0] = 0.0
                    zp[p, 1] = 0.0
                z0 = dx[j, 0]
                z1 = dy[j, 0]
            else:
                b = b_all[j, k - 1]
                d_prev = d
                r = b / d_prev
                for p in range(P):
                    rp[p] = (Mb[p, j, k - 1] - r * dp[p]) / d_prev
                r2 = r * r
                d = a_all[j, k] - r * b
                for p in range(P):
                    dp[p] = Ma[p, j, k] - 2.0 * r * Mb[p, j, k - 1] + r2 * dp[p]
                    for p2 in range(P):
                        dpq[p, p2] = r2 * dpq[p, p2] - 2.0 * d_prev * rp[p] * rp[p2]
                    zp[p, 0] = -rp[p] * z0 - r * zp[p, 0]
                    zp[p, 1] = -rp[p] * z1 - r * zp[p, 1]
                z0 = dx[j, k] - r * z0
                z1 = dy[j, k] - r * z1
            if d > 0:
                dd = d
            else:
                bad = True
                dd = 1.0
            inv = 1.0 / dd
            logdet += np.log(dd)
            zz = z0 * z0 + z1 * z1
            q += zz * inv
            for p in range(P):
                dpi_p = dp[p] * inv
                g_logdet[p] += dpi_p
                for p2 in range(P):
                    h_a[p, p2] += dpq[p, p2] * inv
                    h_b[p, p2] += dpi_p * (dp[p2] * inv)
                gq_a[p] += (z0 * zp[p, 0] + z1 * zp[p, 1]) * inv
                gq_b[p] += (zz * inv) * dpi_p
        loglik[j] = -np.inf if bad else -logdet - 0.5 * q
        for p in range(P):
            grad[j, p] = -g_logdet[p] - 0.5 * (2.0 * gq_a[p] - gq_b[p])
            for p2 in range(P):
                fisher[j, p, p2] = -(h_a[p, p2] - h_b[p, p2])


_KERNEL: list[object] = []


def _compiled_recursion() -> Callable[..., None] | None:
    """:func:`_evaluate_compiled` compiled with numba (cached on disk), or None without numba
    (then :func:`evaluate` runs its numpy code: the same results to rounding, several times slower)."""
    if not _KERNEL:
        try:
            import numba
        except ImportError:
            _KERNEL.append(None)
        else:
            _KERNEL.append(numba.njit(cache=True, nogil=True)(_evaluate_compiled))
    return _KERNEL[0]  # type: ignore[return-value]


def warm_up_kernel() -> None:
    """Compile (or load from the disk cache) the likelihood kernel with a two-step track."""
    if _compiled_recursion() is None:
        return
    series = displacement_series(np.arange(3)[None], np.zeros((1, 3)), np.arange(3.0)[None], np.full((1, 3), 0.1))
    evaluate(build_model(series, 0.1, "known"), np.ones((1, 1)))


@dataclass(frozen=True)
class MLEResult:
    """Maximum-likelihood estimates of m tracks, in px^2/frame and px^2.

    Attributes
    ----------
    D
        (m,) diffusion coefficient, px^2/frame (>= 0; NaN where no displacement).
    second
        (m,) the second parameter: kappa (``scaled``), the common variance s in px^2
        (``common``), NaN (``known``).
    D_crlb_var
        (m,) Cramér-Rao bound on var(D) at the estimate, (px^2/frame)^2.
    loglik
        (m,) maximized log-likelihood.
    iterations
        (m,) scoring iterations used.
    converged
        (m,) bool.
    """

    D: np.ndarray
    second: np.ndarray
    D_crlb_var: np.ndarray
    loglik: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray


def _start(model: TridiagonalModel) -> np.ndarray:
    """Moment estimates (CVE-like, per unit scale) as starting values."""
    valid = np.arange(model.dx.shape[1])[None, :] < model.n[:, None]
    sq = ((model.dx**2 + model.dy**2) * valid).sum(axis=1) / (2.0 * np.maximum(model.n, 1))  # = 1 by scaling
    pair = valid[:, 1:] & valid[:, :-1]
    cov = ((model.dx[:, 1:] * model.dx[:, :-1] + model.dy[:, 1:] * model.dy[:, :-1]) * pair).sum(axis=1)
    cov = cov / (2.0 * np.maximum(pair.sum(axis=1), 1))
    d_cve = np.clip(sq / 2.0 + cov, 0.05 * sq, None)
    if model.kind == "known":
        # Subtract the noise part of the mean squared displacement.
        noise = (model.Ca * valid).sum(axis=1) / np.maximum(model.n, 1)
        gapsum = (model.Ma[0] * valid).sum(axis=1) / np.maximum(model.n, 1)
        d0 = np.clip((sq - noise) / np.maximum(gapsum, 1e-9), 0.05 * sq, None)
        return d0[:, None]
    s_cve = np.clip(model.blur * sq + (2.0 * model.blur - 1.0) * cov, 0.05 * sq, None)
    second = np.ones_like(d_cve) if model.kind == "scaled" else s_cve
    return np.column_stack([d_cve, second])


def fit_mle(
    model: TridiagonalModel, start: np.ndarray | None = None, *, max_iterations: int = 40, rtol: float = 1e-4,
    d_floor: float = 0.0,
) -> MLEResult:
    """Fisher scoring for the parameters of every track, D projected onto D >= 0.

    Parameters
    ----------
    model
        From :func:`build_model`.
    start
        (m,) starting D in px^2/frame (warm start, e.g. the track's previous estimate); NaN or
        None: a moment estimate.
    max_iterations
        Cap on scoring iterations (step halvings count).
    rtol
        Stop when every parameter step is below ``rtol`` times (|parameter| + its standard error).
    d_floor
        Lower bound of D / scale (0: D >= 0, as published; ``-inf``: unconstrained as long as
        Sigma stays positive definite, for the bias study in ``benchmarks/bench_diffusion_mle.py``).
    """
    m = model.dx.shape[0]
    P = model.n_params
    theta = _start(model)
    if start is not None:
        warm = np.asarray(start, dtype=np.float64) / model.scale
        use = np.isfinite(warm) & (warm >= 0)
        theta[use, 0] = np.maximum(warm[use], 1e-3)
    # D >= 0; the second parameter (kappa, or a common variance) may go negative as long as
    # Sigma stays positive definite (-inf likelihood beyond): like the CVE's sigma^2, it is then
    # unbiased, and so is D (a bound at 0 biases D by ~8 % at 20 steps).
    floor = np.zeros(P)
    floor[0] = d_floor
    if P == 2:
        floor[1] = -np.inf
    loglik = np.full(m, -np.inf)
    fisher = np.zeros((m, P, P))
    iterations = np.zeros(m, dtype=np.int64)
    converged = model.n == 0
    active = np.flatnonzero(~converged)
    prev_theta = theta.copy()
    prev_ll = np.full(m, -np.inf)
    for _ in range(max_iterations):
        if active.size == 0:
            break
        sub = model.take(active)
        ll, g, info = evaluate(sub, theta[active])
        iterations[active] += 1
        worse = ll < prev_ll[active] - 1e-10 * np.abs(prev_ll[active])
        if worse.any():
            # Step halving toward the last accepted point.
            w = active[worse]
            theta[w] = 0.5 * (theta[w] + prev_theta[w])
        ok = ~worse
        acc = active[ok]
        loglik[acc], fisher[acc] = ll[ok], info[ok]
        prev_theta[acc], prev_ll[acc] = theta[acc], ll[ok]
        gi, ii = g[ok], info[ok]
        # Fisher scoring step; a singular information (e.g. no data) gives no step.
        reg = ii + np.eye(P) * (1e-12 * np.abs(ii).max(axis=(1, 2)) + 1e-300)[:, None, None]
        # Active set: a parameter at its bound whose score points outward stays there, and the
        # step is solved for the others only.
        pinned = (theta[acc] <= floor * (1.0 + 1e-9)) & (gi <= 0)
        free = ~pinned
        red = np.where(free[:, :, None] & free[:, None, :], reg, np.eye(P)[None] * (~free)[:, :, None])
        step = np.linalg.solve(red, np.where(free, gi, 0.0)[:, :, None])[:, :, 0]
        new = np.maximum(theta[acc] + step, floor)
        se = np.sqrt(np.abs(np.diagonal(np.linalg.inv(reg), axis1=1, axis2=2)))
        small = (np.abs(new - theta[acc]) <= rtol * (np.abs(theta[acc]) + se)).all(axis=1)
        theta[acc] = new
        converged[acc[small]] = True
        still = ~converged[active]
        active = active[still]
    # The estimate is the last accepted point; its information gives the bound.
    theta = prev_theta
    done = model.n > 0
    if done.any():
        rows = np.flatnonzero(done)
        ll, _, info = evaluate(model.take(rows), theta[rows])
        loglik[rows], fisher[rows] = ll, info
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.linalg.pinv(fisher)
    crlb = inv[:, 0, 0] * model.scale**2
    D = np.where(done, theta[:, 0] * model.scale, np.nan)
    if P == 2:
        second = theta[:, 1] * (model.scale if model.kind == "common" else 1.0)
    else:
        second = np.full(m, np.nan)
    crlb = np.where(done & np.isfinite(crlb) & (crlb > 0), crlb, np.nan)
    return MLEResult(D, np.where(done, second, np.nan), crlb, loglik, iterations, converged)


def score_test_kappa(
    series: DisplacementSeries, blur: float, D_px2_per_frame: np.ndarray, gamma: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rao score statistic for "the given variances are right" (kappa = 1) at the known-sigma MLE.

    With ``Sigma = D (A + gamma S) + kappa S``, the statistic ``U_k^2 / (I_kk - I_kD^2 / I_DD)``
    (U_k the score for kappa at kappa = 1, the information with D profiled out) is chi-square with
    one degree of freedom when the variances are calibrated.

    Returns
    -------
    score, information
        (m,) ``U_k`` and ``I_kk - I_kD^2 / I_DD`` (NaN where undefined): the statistic is
        ``score^2 / information``; over many tracks ``sum(score) / sqrt(sum(information))`` is a
        standard normal (the pooled check).
    """
    base = build_model(series, blur, "known", gamma)
    # Same Sigma, with kappa as a second parameter: theta = (D, 1), M_1 = S, C = padding only.
    valid = series.valid
    s_a = base.Ca - (~valid)
    model = TridiagonalModel(
        "scaled", np.concatenate([base.Ma, s_a[None]]), np.concatenate([base.Mb, base.Cb[None]]),
        (~valid).astype(np.float64), np.zeros_like(base.Cb), base.dx, base.dy, base.n, base.scale, base.blur,
    )
    theta = np.column_stack([np.asarray(D_px2_per_frame, float) / base.scale, np.ones(base.n.size)])
    score = np.full(base.n.size, np.nan)
    information = np.full(base.n.size, np.nan)
    rows = np.flatnonzero((base.n > 0) & np.isfinite(theta[:, 0]))
    if rows.size == 0:
        return score, information
    _, g, info = evaluate(model.take(rows), theta[rows])
    with np.errstate(invalid="ignore", divide="ignore"):
        # At an interior MLE the D score is 0; at D = 0 keep the efficient score anyway.
        score[rows] = g[:, 1] - info[:, 1, 0] / info[:, 0, 0] * g[:, 0]
        information[rows] = info[:, 1, 1] - info[:, 1, 0] ** 2 / info[:, 0, 0]
    return score, information


# -- the estimators of a batch of tracks -------------------------------------------------------

#: Labels of the per-row method codes (``method`` arrays of the ``diffusion`` topic).
METHOD_LABELS: tuple[str, ...] = ("cve", "msd", "mle", "mle_scaled", "mle_joint", "network")
METHOD_CODE = {name: i for i, name in enumerate(METHOD_LABELS)}
#: chi-square(1) quantile at p = 0.001: the score test's rejection threshold for kappa = 1.
SCORE_TEST_THRESHOLD = 10.828
#: The pooled check rejects a batch only when the variances' scale is off by more than this.
POOLED_KAPPA_TOLERANCE = 0.25


@dataclass(frozen=True)
class BatchEstimates:
    """Estimates of m tracks (px^2/frame, px^2); NaN where undefined.

    ``D_crlb_var`` is the Cramér-Rao bound on var(D), (px^2/frame)^2. ``method`` holds codes into :data:`METHOD_LABELS`; ``kappa_stat`` the score statistic of the
    calibration check (NaN where not computed).
    """

    D: np.ndarray
    D_err: np.ndarray
    D_crlb_var: np.ndarray
    sigma2: np.ndarray
    method: np.ndarray
    kappa_stat: np.ndarray


def cve_series(series: DisplacementSeries, blur: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CVE of each track from its one-frame displacements and consecutive pairs of them.

    Returns D, sigma^2 (px^2/frame, px^2), the number of one-frame displacements and of pairs.
    """
    one = series.valid & (series.gap == 1)
    sq = ((series.dx**2 + series.dy**2) * one).sum(axis=1)
    n_sq = one.sum(axis=1)
    pair = one[:, 1:] & one[:, :-1]
    cov = ((series.dx[:, 1:] * series.dx[:, :-1] + series.dy[:, 1:] * series.dy[:, :-1]) * pair).sum(axis=1)
    n_cov = pair.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        msq = sq / (2.0 * n_sq)
        c = cov / (2.0 * n_cov)
    d = msq / 2.0 + c
    s2 = blur * msq + (2.0 * blur - 1.0) * c
    return d, s2, n_sq, n_cov


def cve_variance_px(d: np.ndarray, s2: np.ndarray, blur: float, n: np.ndarray) -> np.ndarray:
    """Variance of the two-axis CVE (Vestergaard et al. 2014), dt = 1 frame."""
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = s2 / d - 2.0 * blur
        return np.asarray(d**2 * ((6.0 + 4.0 * eps + 2.0 * eps**2) / n + 4.0 * (1.0 + eps) ** 2 / n**2) / 2.0)


def estimate_batch(
    series: DisplacementSeries,
    blur: float,
    method: Literal["cve", "mle", "auto"],
    *,
    exposure_frames: float,
    psf_sigma_px: float,
    min_steps: int = 3,
    warm_D: np.ndarray | None = None,
    calibrate: bool = True,
    groups: np.ndarray | None = None,
) -> BatchEstimates:
    """Diffusion estimates of a batch of tracks, by the chosen rule.

    - ``cve``: the covariance-based estimator (one-frame displacements), its theoretical SD.
    - ``mle``: tracks whose every point has a reported uncertainty: the known-sigma MLE with the
      calibrated variances (:mod:`scopestream.plugins._loc_calibration`); then the calibration
      check, a Rao score test of "the variances are right" (kappa = 1 in ``Sigma = D A + kappa
      S``), per track (chi-square(1) > 10.83, p < 0.001) and pooled over the batch
      (``sum U / sqrt(sum I)``, |z| > 3.29, and the one-step kappa off by > 25 %): where it
      rejects (the whole batch when the pooled test does), the MLE with the reported variances times a free factor (``mle_scaled``).
      Tracks without uncertainties: the joint MLE of D and one common variance (``mle_joint``,
      Berglund 2010).
      A smaller but significant common miscalibration (pooled |z| > 2, kappa within 25 %) is
      corrected: the batch is refitted with the variances times the pooled one-step kappa.
    - ``auto``: the known-sigma MLE where the uncertainties are there and pass the check, else
      the CVE (with sigma unknown the CVE is within 1-7 % of the joint bound and costs nothing).

    ``D_err`` is the estimator's standard error: the square root of the Cramér-Rao bound at
    the estimate for the MLE (efficient), the CVE formula at the estimate for the CVE.
    ``D_crlb_var`` is that bound (a variance) for the MLE rows (NaN for CVE rows). No Python loop over tracks.

    Parameters
    ----------
    series
        The tracks' displacements.
    blur
        Motion-blur coefficient R.
    method
        See above.
    exposure_frames, psf_sigma_px
        For the blur calibration of the uncertainties.
    min_steps
        Fewest displacements for a defined estimate.
    warm_D
        (m,) previous estimates, px^2/frame (NaN: none): starting points of the MLE.
    calibrate
        Correct the uncertainties for motion blur (they come from ``localize``'s fixed-width
        fit); False: take them as they are.
    groups
        (m,) integer labels: rows with different labels are separate batches computed in one
        vectorized pass (the pooled check, its kappa correction and the calibration refit are
        per group), so ``estimate_batch`` of several groups gives the rows of each group what
        separate calls would (to rounding). None: one group.
    """
    if not calibrate:
        exposure_frames = 0.0
    m = series.n.size
    D = np.full(m, np.nan)
    err = np.full(m, np.nan)
    crlb = np.full(m, np.nan)
    s2 = np.full(m, np.nan)
    code = np.full(m, METHOD_CODE["cve"], dtype=np.uint8)
    stat = np.full(m, np.nan)
    d_cve, s2_cve, n_sq, n_cov = cve_series(series, blur)
    defined = (series.n >= min_steps)
    cve_ok = defined & (n_sq >= min_steps) & (n_cov >= 1)
    use_cve = cve_ok.copy() if method == "cve" else np.zeros(m, dtype=bool)
    if method != "cve":
        known = defined & series.sigma_known()
        rows = np.flatnonzero(known)
        if rows.size:
            sub = _take_series(series, rows)
            start = np.clip(np.nan_to_num(d_cve[rows], nan=0.0), 0.0, None)
            if warm_D is not None:
                w = np.asarray(warm_D, dtype=np.float64)[rows]
                start = np.where(np.isfinite(w), w, start)
            # Group of each row of sub: the pooled check and its correction are per group.
            labels = np.zeros(rows.size, dtype=np.int64) if groups is None else np.asarray(groups)[rows]
            members = [labels == g for g in np.unique(labels)]
            res, sig2_used = _fit_known(sub, blur, exposure_frames, psf_sigma_px, start, members)
            u_k, i_k = score_test_kappa(
                _with_variances(sub, sig2_used), blur, res.D, blur_gamma_for(exposure_frames, psf_sigma_px)
            )
            pooled_z = np.zeros(len(members))
            kappa_step = np.zeros(len(members))
            with np.errstate(invalid="ignore", divide="ignore"):
                k_stat = u_k * u_k / i_k
                fin = np.isfinite(u_k) & np.isfinite(i_k) & (i_k > 0)
                for j, member in enumerate(members):  # one step per group, not per track
                    u_g, i_g = u_k[fin & member], i_k[fin & member]
                    if u_g.size:
                        pooled_z[j] = u_g.sum() / np.sqrt(i_g.sum())
                        # The one-step estimate of kappa - 1 pooled over the batch. The pooled
                        # check rejects only a material miscalibration, kappa off by more than
                        # POOLED_KAPPA_TOLERANCE (a 25 % variance error moves D by
                        # 0.25 x sigma^2 / (D dt)).
                        kappa_step[j] = u_g.sum() / i_g.sum()
            correct = (np.abs(pooled_z) > 2.0) & (np.abs(kappa_step) <= POOLED_KAPPA_TOLERANCE)
            if correct.any():
                # A small common miscalibration (e.g. a camera or PSF unlike the calibration run of
                # plugins/_loc_calibration.json, where localize is calibrated to ~1 %) is
                # measured across the batch and corrected: refit with the variances times the
                # pooled one-step kappa (precise to ~1/sqrt(sum I); it moves D by up to a few %
                # where sigma^2 >> D dt). Then check again. Only the groups concerned.
                redo = np.zeros(rows.size, dtype=bool)
                kappa = np.ones(rows.size)
                for g in np.flatnonzero(correct):
                    redo |= members[g]
                    kappa[members[g]] = 1.0 + kappa_step[g]
                r = np.flatnonzero(redo)
                sub_r = _take_series(sub, r)
                res_r, used_r = _fit_known(
                    _scale_series(sub_r, kappa[r][:, None]), blur, exposure_frames, psf_sigma_px, res.D[r],
                    [member[r] for member in members],
                )
                u_r, i_r = score_test_kappa(
                    _with_variances(sub_r, used_r), blur, res_r.D, blur_gamma_for(exposure_frames, psf_sigma_px)
                )
                res = _replace_rows(res, r, res_r)
                sig2_used = _put_rows(sig2_used, r, used_r)
                with np.errstate(invalid="ignore", divide="ignore"):
                    k_stat[r] = u_r * u_r / i_r
            stat[rows] = k_stat
            # Per track, and pooled over the batch (far more power: many tracks, one camera).
            trusted = ~(k_stat > SCORE_TEST_THRESHOLD)
            for g in np.flatnonzero((pooled_z**2 > SCORE_TEST_THRESHOLD) & (np.abs(kappa_step) > POOLED_KAPPA_TOLERANCE)):
                trusted[members[g]] = False
            good = rows[trusted]
            D[good] = res.D[trusted]
            crlb[good] = res.D_crlb_var[trusted]
            err[good] = np.sqrt(res.D_crlb_var[trusted])
            pts = sig2_used[trusted]
            s2[good] = np.nanmean(np.where(np.isfinite(pts), pts, np.nan), axis=1)
            code[good] = METHOD_CODE["mle"]
            untrusted = rows[~trusted]
        else:
            untrusted = rows
        unknown = np.flatnonzero(defined & ~known)
        if method == "auto":
            fallback = np.zeros(m, dtype=bool)
            fallback[untrusted] = True
            fallback[unknown] = True
            use_cve = fallback & cve_ok
        else:
            for kind, sel in (("scaled", untrusted), ("common", unknown)):
                if sel.size == 0:
                    continue
                sub = _take_series(series, sel)
                res = fit_mle(build_model(sub, blur, kind))  # type: ignore[arg-type]
                D[sel] = res.D
                crlb[sel] = res.D_crlb_var
                err[sel] = np.sqrt(res.D_crlb_var)
                if kind == "common":
                    s2[sel] = res.second
                else:
                    valid = sub.valid
                    mean_s = np.where(valid, 0.5 * (sub.s_start + sub.s_end), 0.0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
                    s2[sel] = res.second * mean_s
                code[sel] = METHOD_CODE["mle_scaled" if kind == "scaled" else "mle_joint"]
    if use_cve.any():
        D[use_cve] = d_cve[use_cve]
        s2[use_cve] = s2_cve[use_cve]
        v = cve_variance_px(d_cve[use_cve], s2_cve[use_cve], blur, n_sq[use_cve].astype(np.float64))
        err[use_cve] = np.where(d_cve[use_cve] > 0, np.sqrt(np.abs(v)), np.nan)
        crlb[use_cve] = np.nan
        code[use_cve] = METHOD_CODE["cve"]
    return BatchEstimates(D, err, crlb, s2, code, stat)


def blur_gamma_for(exposure_frames: float, psf_sigma_px: float) -> float:
    """The linear blur inflation of the variances (see :mod:`scopestream.plugins._loc_calibration`)."""
    from scopestream.plugins._loc_calibration import blur_gamma

    return blur_gamma(exposure_frames, psf_sigma_px)


def _replace_rows(res: MLEResult, rows: np.ndarray, part: MLEResult) -> MLEResult:
    """``res`` with the rows ``rows`` taken from ``part`` (the result of those rows alone)."""
    return MLEResult(*(_put_rows(getattr(res, f), rows, getattr(part, f)) for f in (
        "D", "second", "D_crlb_var", "loglik", "iterations", "converged")))


def _put_rows(full: np.ndarray, rows: np.ndarray, part: np.ndarray) -> np.ndarray:
    """A copy of ``full`` with ``part`` in rows ``rows`` (``part`` may have fewer columns: the
    rest of those rows is NaN, as in a lone batch's narrower arrays)."""
    out = full.copy()
    if full.ndim == 1:
        out[rows] = part
    else:
        out[rows] = np.nan
        out[rows, : part.shape[1]] = part
    return out


def _take_series(series: DisplacementSeries, rows: np.ndarray) -> DisplacementSeries:
    n = series.n[rows]
    width = int(n.max()) if n.size else 0
    return DisplacementSeries(
        series.dx[rows, :width], series.dy[rows, :width], series.gap[rows, :width], series.s_start[rows, :width],
        series.s_end[rows, :width], n, series.frame_start[rows], series.frame_end[rows],
    )


def _scale_series(series: DisplacementSeries, kappa: float | np.ndarray) -> DisplacementSeries:
    """The series with every reported variance times kappa (a number, or (m, 1) per track)."""
    return DisplacementSeries(
        series.dx, series.dy, series.gap, series.s_start * kappa, series.s_end * kappa, series.n,
        series.frame_start, series.frame_end,
    )


def _with_variances(series: DisplacementSeries, point_var: np.ndarray) -> DisplacementSeries:
    """The series with per-displacement start/end variances from per-point variances (m, n + 1)."""
    return DisplacementSeries(
        series.dx, series.dy, series.gap, point_var[:, :-1], point_var[:, 1:], series.n, series.frame_start,
        series.frame_end,
    )


def _fit_known(
    series: DisplacementSeries, blur: float, exposure_frames: float, psf_sigma_px: float, start: np.ndarray,
    members: Sequence[np.ndarray] | None = None,
) -> tuple[MLEResult, np.ndarray]:
    """Known-sigma MLE with calibrated variances; returns the result and the per-point variances
    (m, n + 1) used (reported, plus the photon-independent blur term at the estimate; the linear
    blur factor is inside the model). ``members``: (m,) masks of the groups of rows (see
    :func:`estimate_batch`); a group is refitted when any of its rows moved, as a lone batch is."""
    from scopestream.plugins._loc_calibration import added_variance_px2

    gamma = blur_gamma_for(exposure_frames, psf_sigma_px)
    m, n = series.dx.shape
    point = np.full((m, n + 1), np.nan)
    point[:, :n] = series.s_start
    last = np.clip(series.n - 1, 0, None)
    if n:
        point[np.arange(m), last + 1] = series.s_end[np.arange(m), last]
    if members is None:
        members = [np.ones(m, dtype=bool)]
    extra = added_variance_px2(start, exposure_frames, psf_sigma_px)[:, None]
    res = fit_mle(build_model(_with_variances(series, point + extra), blur, "known", gamma), start)
    small = np.abs(added_variance_px2(res.D, exposure_frames, psf_sigma_px) - extra[:, 0]) <= 0.05 * np.nanmin(
        np.where(np.isfinite(point), point, np.inf), axis=1
    )
    redo = np.zeros(m, dtype=bool)
    for member in members:
        if not small[member].all():
            redo |= member
    if redo.any():
        r = np.flatnonzero(redo)
        sub = _take_series(series, r)
        d0 = res.D[r]
        extra_r = added_variance_px2(d0, exposure_frames, psf_sigma_px)[:, None]
        res = _replace_rows(res, r, fit_mle(build_model(_with_variances(sub, point[r, : sub.dx.shape[1] + 1] + extra_r), blur, "known", gamma), d0))
    used = (point + added_variance_px2(res.D, exposure_frames, psf_sigma_px)[:, None]) * (1.0 + gamma * np.nan_to_num(res.D)[:, None])
    return res, used
