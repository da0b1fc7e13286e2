"""Numerical kernel of MUSICAL (Agarwal & Macháň 2016), vectorized over windows.

The steps follow ``SCIENCE.md`` (the public implementations):

1. the caller divides the stack by a fixed scale (its global maximum in batch use);
2. window side ``N_w = 1 + 2 floor(0.61 λ / (NA p))`` sample-plane pixels;
3. a Gaussian weight ``w`` over the window, centred, variance ``floor(N_w / 2)`` px² per axis, max 1;
4. for every window position, ``D = diag(w) X`` (window pixels × frames); its left singular
   vectors and singular values come from the eigen-decomposition of the Gram matrix ``D Dᵀ``;
5. signal-subspace size ``M = #{σ ≥ 10^threshold} + 1``, replaced by ``min(N_w², K) − 3`` when no
   singular value is below the threshold or ``M ≥ min(N_w², K)``;
6. the PSF test matrix ``G`` (window pixels × test points on a sub-pixel grid), Airy intensity
   ``(J₁(v)/v)²``, ``v = 2π NA ρ / λ``, divided by its maximum, each row multiplied by ``w``;
7. the indicator ``f = (‖U_sᵀg‖ / ‖U_nᵀg‖)^α``;
8. each window's patch of ``(N_w · sub)²`` values is added into the ``(H · sub) × (W · sub)``
   canvas, which is divided by the number of windows that touched each sub-pixel.

Windows are the positions where the whole ``N_w × N_w`` window lies inside the image (no padding),
as in the public implementations. Sub-pixel ``j`` of the canvas is centred at image coordinate
``(j + 0.5) / sub − 0.5`` px (the centre of pixel 0 is 0.0).

How it is fast (all of it vectorized over windows):

- ``G`` is the same for every window (same geometry): computed once and cached.
- The Gram matrices of all windows come from the ``K``-frame products of every pixel with its
  neighbours at each offset inside the window (one pass over the stack per offset, half of the
  ``(2 N_w − 1)²`` offsets by symmetry), gathered into ``(windows, N_w², N_w²)``.
- One batched ``eigh`` (float64) gives all eigenvectors.
- Only the smaller of the two subspaces is projected: ``‖U_sᵀg‖²`` for ``M ≤ N_w² − M``, else
  ``‖U_nᵀg‖²``; the other follows from ``‖g‖² = ‖U_sᵀg‖² + ‖U_nᵀg‖²`` (the eigenvectors of the
  Gram matrix form a complete basis). Typically ``M`` is a few, so this is ~10× fewer flops than
  projecting on all ``N_w²`` eigenvectors. Windows are grouped by ``M`` so that each group is one
  matrix product, cut into cache-sized blocks with a reused output buffer.
- The projections run in float64 by default: the subtraction above loses
  ``ε · ‖g‖² / ‖U_nᵀg‖²`` relative precision where the indicator is large (at emitters), which in
  float32 would exceed 1e-4 there. float32 is available where that error is acceptable.

Two backends compute the projections: numpy (default) and torch (CPU or CUDA). The Gram matrices
and ``eigh`` always run on the CPU in float64: ``torch.linalg.eigh`` on CUDA loops over the
matrices one by one above n = 32 (here n = 49), and ``eigh`` is a small share of the time at
``sub ≥ 10``; the projections, which dominate, run on the chosen device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import j1

Backend = Literal["numpy", "torch"]
ProjectionDtype = Literal["float64", "float32"]

#: Fewest frames a window may have: the degenerate rule of step 5 sets ``M = min(N_w², K) − 3``,
#: and with fewer than 8 frames at most 5 singular values exist, so the signal/noise split (and the
#: threshold) would not mean anything.
MIN_WINDOW_FRAMES = 8

# A noise-subspace norm below this fraction of ‖g‖² is clamped to it, so that a test point that
# lies exactly in the signal subspace (noise-free data) gives a large finite value, not inf.
_NOISE_FLOOR_REL = 1e-12

# Elements of the per-band indicator array (windows × test points), float64: ~64 MB.
_BAND_ELEMENTS = 8_000_000

# Rows per block of the projection product: small enough that the block output stays in cache.
_PROJECTION_BLOCK_ROWS = 48


def window_size_px(wavelength_nm: float, na: float, pixel_size_nm: float) -> int:
    """Side of the MUSICAL window, ``N_w = 1 + 2 floor(0.61 λ / (NA p))`` pixels.

    Parameters
    ----------
    wavelength_nm
        Emission wavelength, nm.
    na
        Numerical aperture.
    pixel_size_nm
        Pixel size in the sample plane (camera pixel / magnification), nm.

    Returns
    -------
    int
        An odd window side, at least 3 (a 1-pixel window has no neighbourhood to resolve with).
    """
    if not (wavelength_nm > 0 and na > 0 and pixel_size_nm > 0):
        raise ValueError(
            f"wavelength_nm ({wavelength_nm}), na ({na}) and pixel_size_nm ({pixel_size_nm}) "
            "must all be positive"
        )
    half = math.floor(0.61 * wavelength_nm / (na * pixel_size_nm))
    return max(3, 1 + 2 * half)


@dataclass(frozen=True)
class MusicalGeometry:
    """What depends only on the optics and the sub-pixel factor: identical for every window.

    Attributes
    ----------
    window_px
        Window side ``N_w``, pixels.
    subpixels
        Test points per pixel along each axis.
    weights
        Gaussian window weights ``w``, shape ``(N_w², )`` in row-major window order.
    psf_matrix
        ``G``, shape ``(N_w², (N_w·sub)²)`` float64: Airy intensity of each test point sampled at
        the window's pixel centres, divided by its maximum, rows multiplied by ``w``. Test points
        are in row-major order over the window's ``(N_w·sub) × (N_w·sub)`` sub-pixel grid.
    psf_norm2
        ``‖g‖²`` for every test point, shape ``((N_w·sub)², )``.
    """

    window_px: int
    subpixels: int
    weights: np.ndarray
    psf_matrix: np.ndarray
    psf_norm2: np.ndarray

    @property
    def n_test(self) -> int:
        """Number of test points per window, ``(N_w · sub)²``."""
        return int(self.psf_matrix.shape[1])


@functools.lru_cache(maxsize=16)
def musical_geometry(
    wavelength_nm: float, na: float, pixel_size_nm: float, subpixels: int
) -> MusicalGeometry:
    """The window weights and PSF test matrix for these optics (cached; treat as read-only).

    Parameters
    ----------
    wavelength_nm, na, pixel_size_nm
        Optics; see :func:`window_size_px`.
    subpixels
        Test points per pixel along each axis (the super-resolved image has ``sub`` times the
        pixels of the input along each axis).
    """
    if int(subpixels) != subpixels or subpixels < 1:
        raise ValueError(f"subpixels must be a positive integer, got {subpixels!r}")
    subpixels = int(subpixels)
    n_w = window_size_px(wavelength_nm, na, pixel_size_nm)
    centre = (n_w - 1) / 2.0
    variance_px2 = float(n_w // 2)
    a = np.repeat(np.arange(n_w, dtype=np.float64), n_w)  # window pixel rows, row-major
    b = np.tile(np.arange(n_w, dtype=np.float64), n_w)
    weights = np.exp(-((a - centre) ** 2 + (b - centre) ** 2) / (2.0 * variance_px2))
    # Test points: centres of the sub-pixels, in pixel coordinates of the window.
    t = (np.arange(n_w * subpixels, dtype=np.float64) + 0.5) / subpixels - 0.5
    ty = np.repeat(t, t.size)
    tx = np.tile(t, t.size)
    rho_nm = np.hypot(a[:, None] - ty[None, :], b[:, None] - tx[None, :]) * pixel_size_nm
    g = airy_intensity(rho_nm, wavelength_nm, na)
    g /= g.max()
    g *= weights[:, None]
    g = np.ascontiguousarray(g)
    for arr in (weights, g):
        arr.setflags(write=False)
    norm2 = np.einsum("it,it->t", g, g)
    norm2.setflags(write=False)
    return MusicalGeometry(n_w, subpixels, weights, g, norm2)


def airy_intensity(rho_nm: np.ndarray, wavelength_nm: float, na: float) -> np.ndarray:
    """Airy intensity ``(J₁(v)/v)²``, ``v = 2π NA ρ / λ``, with the value 0.25 at ``ρ = 0``."""
    v = 2.0 * np.pi * na * np.asarray(rho_nm, dtype=np.float64) / wavelength_nm
    out = np.full(v.shape, 0.25)
    nz = v > 1e-8
    out[nz] = (j1(v[nz]) / v[nz]) ** 2
    return out


# -- Gram matrices -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pair_tables(n_w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """For every window-pixel pair (i, j): which canonical offset and which base pixel to read.

    The product of pixels p and p + δ equals that of p + δ and p, so only offsets with
    ``δy > 0`` or ``δy == 0, δx ≥ 0`` are computed; a pair with the opposite offset reads the
    canonical one from the other pixel of the pair.
    """
    a = np.repeat(np.arange(n_w), n_w)
    b = np.tile(np.arange(n_w), n_w)
    offsets = [(dy, dx) for dy in range(n_w) for dx in range(-(n_w - 1), n_w) if dy > 0 or dx >= 0]
    index = {d: k for k, d in enumerate(offsets)}
    dy = a[None, :] - a[:, None]
    dx = b[None, :] - b[:, None]
    canon = (dy > 0) | ((dy == 0) & (dx >= 0))
    base_a = np.where(canon, a[:, None], a[None, :])
    base_b = np.where(canon, b[:, None], b[None, :])
    cdy = np.where(canon, dy, -dy)
    cdx = np.where(canon, dx, -dx)
    offset_index = np.vectorize(lambda y, x: index[(int(y), int(x))])(cdy, cdx)
    return offset_index.astype(np.intp), base_a.astype(np.intp), base_b.astype(np.intp), offsets


def gram_matrices(stack_hwk: np.ndarray, geometry: MusicalGeometry) -> np.ndarray:
    """Weighted Gram matrices ``D Dᵀ`` of every window position.

    Parameters
    ----------
    stack_hwk
        Normalized data, shape ``(H, W, K)`` float64 (frames last, C-contiguous).
    geometry
        From :func:`musical_geometry`.

    Returns
    -------
    np.ndarray
        Shape ``(H − N_w + 1, W − N_w + 1, N_w², N_w²)`` float64; window ``(r, c)`` has its
        top-left pixel at row ``r``, column ``c``.
    """
    n_w = geometry.window_px
    h, w, _ = stack_hwk.shape
    n_rows, n_cols = h - n_w + 1, w - n_w + 1
    offset_index, base_a, base_b, offsets = _pair_tables(n_w)
    products = np.zeros((len(offsets), h, w), dtype=np.float64)
    for k, (dy, dx) in enumerate(offsets):
        x0, x1 = max(0, -dx), w - max(0, dx)
        np.einsum(
            "ijk,ijk->ij",
            stack_hwk[: h - dy, x0:x1],
            stack_hwk[dy:, x0 + dx : x1 + dx],
            out=products[k, : h - dy, x0:x1],
        )
    rows = np.arange(n_rows)[:, None, None, None]
    cols = np.arange(n_cols)[None, :, None, None]
    gram = products[offset_index, rows + base_a, cols + base_b]
    wts = geometry.weights
    gram *= wts[:, None] * wts[None, :]
    return gram


def eigen_decomposition(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values (descending) and left singular vectors from Gram matrices.

    Parameters
    ----------
    gram
        Shape ``(..., n, n)`` symmetric positive semi-definite.

    Returns
    -------
    sigma : np.ndarray
        Shape ``(..., n)``, ``√max(λ, 0)``, descending.
    vectors : np.ndarray
        Shape ``(..., n, n)``; column ``k`` belongs to ``sigma[..., k]``.
    """
    values, vectors = np.linalg.eigh(gram)
    sigma = np.sqrt(np.clip(values[..., ::-1], 0.0, None))
    return sigma, vectors[..., ::-1]


def signal_subspace_size(sigma: np.ndarray, threshold_log10: float, n_frames: int) -> np.ndarray:
    """``M`` per window (step 5 of SCIENCE.md).

    Parameters
    ----------
    sigma
        Singular values, descending, shape ``(..., n)`` (``n = N_w²``; with ``K < n`` the trailing
        ``n − K`` are numerically zero and are not counted, as an SVD would not return them).
    threshold_log10
        The threshold, log10 of a singular value of the normalized data.
    n_frames
        ``K``.
    """
    n = sigma.shape[-1]
    rank_max = min(n, n_frames)
    count = np.count_nonzero(sigma[..., :rank_max] >= 10.0**threshold_log10, axis=-1)
    m = count + 1
    degenerate = (count == rank_max) | (m >= rank_max)
    return np.where(degenerate, rank_max - 3, m).astype(np.intp)


def auto_threshold(sigma: np.ndarray, n_frames: int) -> float:
    """Threshold (log10) at the shoulder of the singular-value spectrum.

    The rule: take ``log10 σ_k`` of every window (``k < min(N_w², K) − 1``, σ clipped at 1e-12),
    and its median over windows, ``m_k`` (the typical spectrum). The shoulder ``k*`` is the index
    where ``m_k`` lies farthest below the straight line from ``m_0`` to its last point (the knee of
    a convex, decreasing curve: the steep signal part meets the flat noise floor). The threshold
    is the midpoint ``(m_{k*−1} + m_{k*}) / 2``: the singular values above the shoulder count,
    the noise floor does not (step 5 then adds one more to ``M``).

    Parameters
    ----------
    sigma
        Singular values, descending, shape ``(windows, n)`` or ``(..., n)``.
    n_frames
        ``K``.
    """
    n = sigma.shape[-1]
    length = min(n, n_frames) - 1
    if length < 3:
        raise ValueError(f"too few singular values ({length + 1}) to find a shoulder")
    logs = np.log10(np.clip(sigma.reshape(-1, n)[:, :length], 1e-12, None))
    m = np.median(logs, axis=0)
    k = np.arange(length, dtype=np.float64)
    chord = m[0] + (m[-1] - m[0]) * k / (length - 1)
    below = chord - m
    below[0] = -np.inf
    k_star = int(np.argmax(below))
    return float(0.5 * (m[k_star - 1] + m[k_star]))


# -- projections -----------------------------------------------------------------------------


def _side_rows(vectors: np.ndarray, m: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Group windows by ``M``; for each group the rows to project on: (window index, rows, signal?).

    rows has shape ``(windows, r, n)``, the transposed eigenvectors of the smaller subspace.
    """
    n = vectors.shape[-1]
    groups = []
    for m_value in np.unique(m):
        idx = np.flatnonzero(m == m_value)
        signal_side = bool(m_value <= n - m_value)
        sl = slice(0, int(m_value)) if signal_side else slice(int(m_value), n)
        rows = np.ascontiguousarray(vectors[idx][:, :, sl].transpose(0, 2, 1))
        groups.append((idx, rows, signal_side))
    return groups


def _indicator_from_side(
    side_sum: np.ndarray, signal_side: bool, norm2: np.ndarray, alpha: float
) -> np.ndarray:
    """From the projected side's squared norms ``(windows, tests)`` to ``(‖U_sᵀg‖/‖U_nᵀg‖)^α``.

    Works in place on ``side_sum`` (float64) and returns it.
    """
    other = norm2[None, :] - side_sum
    if signal_side:
        signal, noise = side_sum, other
    else:
        signal, noise = other, side_sum
    np.maximum(noise, _NOISE_FLOOR_REL * norm2[None, :], out=noise)
    np.maximum(signal, 0.0, out=signal)
    np.divide(signal, noise, out=side_sum)
    if alpha == 4.0:
        np.multiply(side_sum, side_sum, out=side_sum)
    else:
        np.power(side_sum, 0.5 * alpha, out=side_sum)
    return side_sum


def indicator_numpy(
    vectors: np.ndarray,
    m: np.ndarray,
    geometry: MusicalGeometry,
    alpha: float,
    dtype: ProjectionDtype = "float64",
) -> np.ndarray:
    """Indicator of every window at every test point, numpy backend.

    Parameters
    ----------
    vectors
        Eigenvectors, shape ``(windows, n, n)``, columns sorted by descending singular value.
    m
        Signal-subspace size per window, shape ``(windows, )``.
    geometry
        From :func:`musical_geometry`.
    alpha
        Exponent of the indicator.
    dtype
        Precision of the projection products.

    Returns
    -------
    np.ndarray
        Shape ``(windows, (N_w·sub)²)`` float64.
    """
    n_win = vectors.shape[0]
    g = geometry.psf_matrix.astype(dtype, copy=False)
    norm2 = geometry.psf_norm2
    n_test = g.shape[1]
    result = np.empty((n_win, n_test), dtype=np.float64)
    block = np.empty((_PROJECTION_BLOCK_ROWS, n_test), dtype=dtype)
    for idx, rows, is_signal in _side_rows(vectors, m):
        r = rows.shape[1]
        flat = rows.reshape(-1, rows.shape[2]).astype(dtype, copy=False)
        per_block = max(1, _PROJECTION_BLOCK_ROWS // r)
        for start in range(0, idx.size, per_block):
            stop = min(idx.size, start + per_block)
            out = block[: (stop - start) * r]
            np.matmul(flat[start * r : stop * r], g, out=out)
            np.multiply(out, out, out=out)
            side = out.reshape(stop - start, r, n_test).sum(axis=1, dtype=np.float64)
            result[idx[start:stop]] = _indicator_from_side(side, is_signal, norm2, alpha)
    return result


def indicator_torch(
    vectors: np.ndarray,
    m: np.ndarray,
    geometry: MusicalGeometry,
    alpha: float,
    dtype: ProjectionDtype = "float64",
    device: str = "cpu",
) -> np.ndarray:
    """As :func:`indicator_numpy`, with the projections in torch on ``device``."""
    import torch

    tdtype = torch.float64 if dtype == "float64" else torch.float32
    dev = torch.device(device)
    g = _torch_psf_matrix(geometry, tdtype, dev)
    norm2 = torch.from_numpy(np.array(geometry.psf_norm2)).to(dev)[None, :]
    floor = _NOISE_FLOOR_REL * norm2
    n_win = vectors.shape[0]
    n_test = g.shape[1]
    result = torch.empty((n_win, n_test), dtype=torch.float64, device=dev)
    # On CPU, small blocks keep the output in cache; on a GPU, large blocks fill the device.
    block_rows = _PROJECTION_BLOCK_ROWS if dev.type == "cpu" else 8192
    block = torch.empty((block_rows, n_test), dtype=tdtype, device=dev)
    for idx, rows, is_signal in _side_rows(vectors, m):
        r = rows.shape[1]
        flat = torch.from_numpy(rows.reshape(-1, rows.shape[2])).to(dev, tdtype)
        tidx = torch.from_numpy(idx).to(dev)
        per_block = max(1, block_rows // r)
        for start in range(0, idx.size, per_block):
            stop = min(idx.size, start + per_block)
            out = block[: (stop - start) * r]
            torch.matmul(flat[start * r : stop * r], g, out=out)
            out.mul_(out)
            side = out.view(stop - start, r, n_test).sum(dim=1, dtype=torch.float64)
            other = norm2 - side
            signal, noise = (side, other) if is_signal else (other, side)
            ratio = signal.clamp_(min=0.0) / torch.maximum(noise, floor)
            result[tidx[start:stop]] = ratio.pow_(0.5 * alpha)
    out_np: np.ndarray = result.cpu().numpy()
    return out_np


_TORCH_G_CACHE: dict[tuple[int, Any, str], Any] = {}


def _torch_psf_matrix(geometry: MusicalGeometry, tdtype: Any, dev: Any) -> Any:
    import torch

    key = (id(geometry), tdtype, str(dev))
    g = _TORCH_G_CACHE.get(key)
    if g is None:
        if len(_TORCH_G_CACHE) > 8:
            _TORCH_G_CACHE.clear()
        g = torch.from_numpy(np.array(geometry.psf_matrix)).to(dev, tdtype)
        _TORCH_G_CACHE[key] = g
    return g


# -- the whole image -------------------------------------------------------------------------


def validate_stack(stack: np.ndarray, window_px: int) -> None:
    """Raise ValueError naming the problem if ``stack`` cannot go through MUSICAL."""
    if stack.ndim != 3:
        raise ValueError(f"expected a stack of shape (frames, rows, columns), got shape {stack.shape}")
    k, h, w = stack.shape
    if k < MIN_WINDOW_FRAMES:
        raise ValueError(
            f"a MUSICAL window needs at least {MIN_WINDOW_FRAMES} frames for the signal/noise "
            f"threshold to mean anything; got {k}"
        )
    if h < window_px or w < window_px:
        raise ValueError(
            f"the region ({h}×{w} px) is smaller than the PSF window ({window_px}×{window_px} px)"
        )
    if stack.dtype.kind not in "uif":
        raise ValueError(f"expected a numeric stack, got dtype {stack.dtype}")
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise ValueError("the stack holds NaN or infinite values")


def musical_canvas(
    stack: np.ndarray,
    geometry: MusicalGeometry,
    threshold_log10: float,
    alpha: float,
    *,
    backend: Backend = "numpy",
    device: str = "cpu",
    dtype: ProjectionDtype = "float64",
    band_elements: int = _BAND_ELEMENTS,
) -> np.ndarray:
    """MUSICAL image of an already normalized stack (steps 3–8).

    Parameters
    ----------
    stack
        Shape ``(K, H, W)``, already divided by the normalization scale.
    geometry
        From :func:`musical_geometry`.
    threshold_log10
        Absolute threshold, log10 of a singular value.
    alpha
        Indicator exponent.
    backend, device, dtype
        Where and in which precision the projections run.
    band_elements
        Memory bound: windows are processed in bands of window rows whose indicator array has at
        most about this many elements (at least one window row).

    Returns
    -------
    np.ndarray
        Shape ``(H · sub, W · sub)`` float64.
    """
    validate_stack(stack, geometry.window_px)
    k, h, w = stack.shape
    n_w, sub = geometry.window_px, geometry.subpixels
    n_rows, n_cols = h - n_w + 1, w - n_w + 1
    indicator: Callable[..., np.ndarray]
    if backend == "numpy":
        indicator = indicator_numpy
        extra: dict[str, Any] = {"dtype": dtype}
    elif backend == "torch":
        indicator = indicator_torch
        extra = {"dtype": dtype, "device": device}
    else:
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    hwk = np.ascontiguousarray(np.moveaxis(np.asarray(stack, dtype=np.float64), 0, -1))
    canvas = np.zeros((h, sub, w, sub), dtype=np.float64)
    band_rows = max(1, band_elements // max(1, n_cols * geometry.n_test))
    for r0 in range(0, n_rows, band_rows):
        r1 = min(n_rows, r0 + band_rows)
        gram = gram_matrices(hwk[r0 : r1 + n_w - 1], geometry)
        sigma, vectors = eigen_decomposition(gram.reshape(-1, n_w * n_w, n_w * n_w))
        m = signal_subspace_size(sigma, threshold_log10, k)
        f = indicator(vectors, m, geometry, alpha, **extra)
        _accumulate(canvas, f.reshape(r1 - r0, n_cols, n_w, sub, n_w, sub), r0)
    counts = _window_counts(h, n_w)[:, None, None, None] * _window_counts(w, n_w)[None, None, :, None]
    canvas /= counts
    return canvas.reshape(h * sub, w * sub)


def _accumulate(canvas: np.ndarray, patches: np.ndarray, r0: int) -> None:
    """Add window patches ``(rows, cols, N_w, sub, N_w, sub)`` into ``canvas (H, sub, W, sub)``."""
    n_r, n_c, n_w = patches.shape[0], patches.shape[1], patches.shape[2]
    for a in range(n_w):
        for b in range(n_w):
            canvas[r0 + a : r0 + a + n_r, :, b : b + n_c, :] += patches[:, :, a, :, b, :].transpose(0, 2, 1, 3)


def _window_counts(length: int, n_w: int) -> np.ndarray:
    """How many window positions cover each pixel along one axis."""
    starts = np.arange(length - n_w + 1)
    pix = np.arange(length)[:, None]
    return np.count_nonzero((pix >= starts[None, :]) & (pix < starts[None, :] + n_w), axis=1).astype(np.float64)


def singular_values(stack: np.ndarray, geometry: MusicalGeometry, max_windows: int = 4096) -> np.ndarray:
    """Singular values (descending) of every window position, shape ``(windows, N_w²)``.

    Used for the automatic threshold and for plots. For a large field only the windows of a
    centred square holding about ``max_windows`` window positions are used.
    """
    validate_stack(stack, geometry.window_px)
    k, h, w = stack.shape
    n_w = geometry.window_px
    side = int(math.isqrt(max_windows)) + n_w - 1
    y0 = max(0, (h - side) // 2)
    x0 = max(0, (w - side) // 2)
    crop = stack[:, y0 : y0 + side, x0 : x0 + side]
    hwk = np.ascontiguousarray(np.moveaxis(np.asarray(crop, dtype=np.float64), 0, -1))
    gram = gram_matrices(hwk, geometry).reshape(-1, n_w * n_w, n_w * n_w)
    values = np.linalg.eigvalsh(gram)
    out: np.ndarray = np.sqrt(np.clip(values[:, ::-1], 0.0, None))
    return out
