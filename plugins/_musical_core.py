"""Numerical kernel of MUSICAL (Agarwal & Macháň 2016), vectorized over windows.

The steps follow ``SCIENCE.md`` (as the published implementations compute them; the border
rule below says where those differ):

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

Border rule (``edge``). ``"full_windows"`` (default) uses only the positions where the whole
``N_w × N_w`` window lies inside the image, as MusiJ (the ImageJ plugin) does: a pixel within
``N_w − 1`` px of the edge is covered by fewer windows. ``"partial_windows"`` is the rule of the
MATLAB implementation and the ports derived from it (napari-superres): every pixel is the centre
of a window, and a window that crosses the edge is cut to its pixels inside the image (its rows
of ``D``, of ``w`` and of ``G``; ``M``'s degenerate rule then uses the cut size); its patch is
added where it falls inside the canvas. Those ports then crop ``(N_w − 1)/2`` px off every side
for display; here the image keeps its ``(H · sub) × (W · sub)`` size and coordinates (crop if you
wish). Pixels at least ``N_w − 1`` px from the edge are touched only by whole windows, so both
rules give the same values there. ``"partial_windows"`` costs ``H·W / ((H − N_w + 1)(W − N_w + 1))``
times as much (1.7× for a 25 × 25 region at ``N_w = 7``).

Sub-pixel ``j`` of the canvas is centred at image coordinate ``(j + 0.5) / sub − 0.5`` px (the
centre of pixel 0 is 0.0).

How it is fast (all of it vectorized over windows):

- ``G`` is the same for every window (same geometry): computed once and cached.
- The Gram matrices of all windows come from the ``K``-frame products of every pixel with its
  neighbours at each offset inside the window (one pass over the stack per offset, half of the
  ``(2 N_w − 1)²`` offsets by symmetry), gathered into ``(windows, N_w², N_w²)``.
- One batched ``eigh`` (float64) gives all eigenvectors.
- Only the smaller of the two subspaces is projected: ``‖U_sᵀg‖²`` for ``M ≤ N_w² − M``, else
  ``‖U_nᵀg‖²``; the other follows from ``‖g‖² = ‖U_sᵀg‖² + ‖U_nᵀg‖²`` (the eigenvectors of the
  Gram matrix form a complete basis). Typically ``M`` is a few, so this is ~10× fewer flops than
  projecting on all ``N_w²`` eigenvectors.
- The projections are one matrix product per block of consecutive windows (≤ 52 rows) and
  column chunk of ``G`` (~1 MB of product): the product, its squares, their per-window sums (a
  second, tiny product) and the indicator formula stay in the L2 cache, and each window's chunk
  of the result is written once. The product is ~80 % of the time at sub 20; it runs near the
  CPU's peak.
- Precision (``dtype``). "float64" (default) agrees with a per-pixel SVD loop to ~1e-12.
  In float32 the subtraction above loses ``ε·‖g‖²/‖U_nᵀg‖²`` relative precision where a test
  point lies almost in the signal subspace (at emitters: up to ~1e-3). "mixed" runs float32
  (2× the flops per second) and recomputes in float64 only the (window, test point) pairs
  whose float32 value may err by more than 5e-5; :func:`mixed_flag_level` derives the rule. Its
  speed depends on the data: the share of pairs recomputed was 19 % on dense vesicle data at
  threshold −1 (no faster than float64) and 1–5 % on sparse emitters (up to ~20 % faster).
  float32 products are done in the singular basis of ``G``, weakest component first
  (:func:`_psf_basis`), which cuts their rounding error 3×.

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
ProjectionDtype = Literal["mixed", "float64", "float32"]
EdgeRule = Literal["full_windows", "partial_windows"]

#: Fewest frames a window may have: the degenerate rule of step 5 sets ``M = min(N_w², K) − 3``,
#: and with fewer than 8 frames at most 5 singular values exist, so the signal/noise split (and the
#: threshold) would not mean anything.
MIN_WINDOW_FRAMES = 8

# A noise-subspace norm below this fraction of ‖g‖² is clamped to it, so that a test point that
# lies exactly in the signal subspace (noise-free data) gives a large finite value, not inf.
_NOISE_FLOOR_REL = 1e-12

# Elements of the per-band indicator array (windows × test points), float64: ~64 MB.
_BAND_ELEMENTS = 8_000_000

# Rows per block of the projection product, and the bytes one block × column chunk of it may take:
# small enough that the product, its squares and the indicator formula stay in the L2 cache.
_PROJECTION_BLOCK_ROWS = 52
_PROJECTION_BLOCK_BYTES = 1 << 20

# Mixed precision (see mixed_flag_level): float32 machine epsilon, the error constant c (above
# the largest measured) and the relative error a float32 indicator value may have.
_F32_EPS = 2.0**-23
_MIXED_C = 2.5
_MIXED_REL_ERROR = 5e-5


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

    @functools.cached_property
    def psf_basis(self) -> np.ndarray:
        """:func:`_psf_basis` of ``psf_matrix`` (computed once per geometry; read-only)."""
        basis = _psf_basis(self.psf_matrix)
        basis.setflags(write=False)
        return basis

    @functools.cached_property
    def torch_tensors(self) -> dict[tuple[Any, str, bool], Any]:
        """Torch copies of ``G`` by (dtype, device, rotated), filled by :func:`_torch_psf_matrix`.

        Kept on the geometry itself, so a tensor lives exactly as long as the geometry it was
        made from (a module-level cache keyed by ``id(geometry)`` could hand an evicted
        geometry's tensor to a new geometry that reuses its id).
        """
        return {}

    @functools.cached_property
    def projection_operands(self) -> dict[str, Any]:
        """Operands of the numpy projections by precision, filled by :func:`_projection_operands`."""
        return {}

    @functools.cached_property
    def cut_geometries(self) -> dict[bytes, MusicalGeometry]:
        """Geometries of windows cut at the image edge, by their mask of kept window pixels
        (filled by :func:`cut_geometry`)."""
        return {}


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


@dataclass(frozen=True)
class _ProjectionOperands:
    """What the numpy projections of one geometry in one precision read (built once, cached).

    Attributes
    ----------
    dtype
        Working precision of the products (float64, or float32 for "float32" and "mixed").
    basis
        float32 precisions only: ``V``, the left singular vectors of ``G`` weakest first
        (:func:`_psf_basis`); the PSF matrix is stored as ``Vᵀ G`` and the eigenvector rows are
        rotated by ``V`` to match (a rotation: the norms are the same).
    chunks
        The test points cut into column chunks, each ``(start, stop, psf, norm2_hi, norm2_lo,
        floor)``: its columns of the (rotated) PSF matrix, contiguous, in the working precision;
        ``‖g‖²`` as a working-precision part plus the rest (``hi + lo`` is ``‖g‖²`` to float64
        precision, so the subtraction ``hi − s`` near ``s ≈ ‖g‖²`` is exact in float32); the noise
        floor ``_NOISE_FLOOR_REL · ‖g‖²``.
    psf_t
        "mixed" only: ``Gᵀ`` float64 C-contiguous, whose rows are gathered for the recomputation.
    """

    dtype: np.dtype[Any]
    basis: np.ndarray | None
    chunks: tuple[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]
    psf_t: np.ndarray | None


def _projection_operands(geometry: MusicalGeometry, dtype: ProjectionDtype) -> _ProjectionOperands:
    """The operands of :func:`indicator_numpy` for ``geometry`` in ``dtype`` (cached on the
    geometry, :attr:`MusicalGeometry.projection_operands`)."""
    hit = geometry.projection_operands.get(dtype)
    if hit is not None:
        return hit
    work = np.dtype(np.float64 if dtype == "float64" else np.float32)
    g = geometry.psf_matrix
    basis = None
    if work == np.float32:
        basis = geometry.psf_basis
        g = basis.T @ g
    norm2 = geometry.psf_norm2
    # A block of _PROJECTION_BLOCK_ROWS rows times one chunk: about _PROJECTION_BLOCK_BYTES.
    n_chunks = max(1, round(g.shape[1] * _PROJECTION_BLOCK_ROWS * work.itemsize / _PROJECTION_BLOCK_BYTES))
    chunks = []
    for part in np.array_split(np.arange(g.shape[1]), n_chunks):
        start, stop = int(part[0]), int(part[-1]) + 1
        hi = norm2[start:stop].astype(work)
        lo = (norm2[start:stop] - hi).astype(work)
        floor = (_NOISE_FLOOR_REL * norm2[start:stop]).astype(work)
        psf = np.ascontiguousarray(g[:, start:stop], dtype=work)
        for arr in (hi, lo, floor, psf):
            arr.setflags(write=False)
        chunks.append((start, stop, psf, hi, lo, floor))
    psf_t = None
    if dtype == "mixed":
        psf_t = np.ascontiguousarray(geometry.psf_matrix.T)
        psf_t.setflags(write=False)
    ops = _ProjectionOperands(work, basis, tuple(chunks), psf_t)
    geometry.projection_operands[dtype] = ops
    return ops


def _psf_basis(g: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the window-pixel space: the left singular vectors of ``G``, weakest first.

    In this basis a test point's coordinates ``h = Vᵀg`` fall off steeply (the singular values of
    ``G`` span 1 to 4e-7 at N_w = 7), and in this order a float32 dot product adds the small terms
    before the large ones, so its rounding error is about the size of the result's last bits
    rather than of the largest partial sum. Measured (benchmark vesicle data, sub 10): the error
    constant ``c`` of :func:`mixed_flag_level`, squares summed in float64, was ≤ 3.9 in the pixel
    basis, ≤ 6.2 in this basis strongest first and ≤ 1.4 weakest first.
    """
    left, _, _ = np.linalg.svd(g, full_matrices=False)
    return np.ascontiguousarray(left[:, ::-1])


def mixed_flag_level(alpha: float) -> float:
    """``T_α``: the "mixed" precision recomputes a (window, test point) in float64 where ``√p·o < T_α``.

    ``p`` is the share of ``‖g‖²`` on the side that is projected (the smaller subspace: the
    signal side, ``‖U_sᵀg‖²/‖g‖²``, when ``M ≤ N_w²/2``), ``o = 1 − p`` the share of the side found
    by subtraction.

    Error model. The float32 product gives each component of ``r = U_sideᵀg`` with an absolute
    error of order ``ε‖g‖`` (``ε = 2⁻²³``: input rounding, and the accumulation, whose partial
    sums are of the order of ``‖g‖``), so ``s = ‖r‖²`` errs by ``δs = 2cε·√s·‖g‖`` with ``c`` a
    number of order 1. The projected side's relative error is then ``δs/s = 2cε/√p`` (large where
    that side is tiny); the subtracted side ``‖g‖² − s`` has the relative error
    ``δs/(o‖g‖²) = 2cε·√p/o`` (large where it is tiny: cancellation); the ratio of the two
    sides has the sum of both, and ``f = ratio^{α/2}`` multiplies it by ``α/2``:

        relative error of f  ≈  (α/2) · 2cε · (1/√p + √p/o)  =  α·c·ε / (√p·o)        (p + o = 1)

    whichever side is projected. Measured with this module's float32 path (rotated basis,
    weakest component first, float32 squares and sums) against float64 at sub 10, in eleven
    cases (the benchmark's vesicle movies and blinking pairs, thresholds −1 and auto, α 2 and 4;
    ~10 million (window, test point) pairs): ``c`` had median 0.15–0.2, 99.9th percentile
    1.0–1.4 and maximum 1.6–2.4, larger with more rows projected.

    Flag level. With ``c = _MIXED_C = 2.5`` (above every measured value), a float32 value is kept
    only where its error is at most ``_MIXED_REL_ERROR = 5e-5``, half the 1e-4 asked of the
    output (which is a mean of such values over the overlapping windows):

        T_α = α · c · ε / _MIXED_REL_ERROR  ≈  0.006 · α      (0.024 at α = 4).

    In the terms "each component errs by c'·ε₃₂·‖g‖ with ε₃₂ = 2⁻²⁴ ≈ 6e-8 and c' ≈ 1", this is a
    margin of 10 under 1e-4; against the largest measured ``c`` it is a margin of 2. Measured on
    the output (the mean over windows) against a per-pixel float64 loop, the largest element-wise
    error was 1.5e-5 over the tests' and the benchmark's cases (≥ 6× under 1e-4). The
    noise-floor clamp (``_NOISE_FLOOR_REL``) acts only where ``o < 1e-12``, which is always
    flagged, so it is applied in float64 exactly as in the float64 path.
    """
    return float(alpha) * _MIXED_C * _F32_EPS / _MIXED_REL_ERROR


def _stacked_rows(vectors: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows to project on, of every window, stacked in window order.

    Returns ``rows`` ``(Σ r_w, n)`` float64 (the transposed eigenvectors of the smaller subspace of
    window ``w``, ``r_w = min(M_w, n − M_w)`` of them, never 0), ``starts`` (the first row of
    each window) and ``signal_side`` (whether window ``w`` projects its signal subspace).
    """
    n = vectors.shape[-1]
    signal_side = m <= n - m
    counts = np.where(signal_side, m, n - m)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.intp)
    rows = np.empty((int(counts.sum()), n), dtype=np.float64)
    for m_value in np.unique(m):
        idx = np.flatnonzero(m == m_value)
        m_int = int(m_value)
        sl = slice(0, m_int) if m_int <= n - m_int else slice(m_int, n)
        dest = (starts[idx][:, None] + np.arange(sl.stop - sl.start)[None, :]).ravel()
        rows[dest] = vectors[idx][:, :, sl].transpose(0, 2, 1).reshape(-1, n)
    return rows, starts, signal_side


def _window_blocks(starts: np.ndarray, n_rows: int, max_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive windows ``[w0, w1)`` with rows ``[r0, r1)``, at most ``max_rows`` rows (at
    least one window) each."""
    ends = np.append(starts[1:], n_rows)
    blocks = []
    w0 = 0
    while w0 < starts.size:
        w1 = max(w0 + 1, int(np.searchsorted(ends, starts[w0] + max_rows, side="right")))
        blocks.append((w0, w1, int(starts[w0]), int(ends[w1 - 1])))
        w0 = w1
    return blocks


def _segment_sums(starts: np.ndarray, n_rows: int, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``S (windows, rows)``, 1 where the row belongs to the window (window ``i``'s rows start at
    ``starts[i]``): ``S @ squares`` sums each window's rows in one small matrix product (10×
    faster than ``np.add.reduceat`` over rows). None when every window has one row."""
    if starts.size == n_rows:
        return None
    owner = np.searchsorted(starts, np.arange(n_rows), side="right") - 1
    s = np.zeros((starts.size, n_rows), dtype=dtype)
    s[owner, np.arange(n_rows)] = 1.0
    return s


def indicator_numpy(
    vectors: np.ndarray,
    m: np.ndarray,
    geometry: MusicalGeometry,
    alpha: float,
    dtype: ProjectionDtype = "float64",
    stats: dict[str, float] | None = None,
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
        Precision of the projection products. ``"float64"``: agrees with a per-pixel SVD loop to
        ~1e-12. ``"float32"``: the products in float32 (in the rotated basis of
        :func:`_psf_basis`); errs up to ~1e-3 relative where a test point lies almost in the
        signal subspace (at emitters). ``"mixed"``: float32, then the (window, test point) pairs
        whose float32 value may err by more than 5e-5 (:func:`mixed_flag_level`) again in
        float64, from the float64 eigenvectors and ``G``.
    stats
        If given, ``stats["recomputed"]`` is set to the fraction of (window, test point) pairs
        recomputed in float64 (0 unless "mixed").

    Returns
    -------
    np.ndarray
        Shape ``(windows, (N_w·sub)²)`` float64.

    Notes
    -----
    Windows are taken in blocks of consecutive windows with at most ``_PROJECTION_BLOCK_ROWS``
    rows to project on, test points in column chunks, so that a block's product with one chunk
    (~1 MB), its squares, their per-window sums and the indicator formula stay in the L2 cache;
    each window's chunk of the result is written once.
    """
    if dtype not in ("float64", "float32", "mixed"):
        raise ValueError(f"dtype must be 'mixed', 'float64' or 'float32', got {dtype!r}")
    ops = _projection_operands(geometry, dtype)
    work = ops.dtype
    n_win, n_test = vectors.shape[0], geometry.n_test
    rows64, starts, signal_side = _stacked_rows(vectors, m)
    rows = (rows64 if ops.basis is None else rows64 @ ops.basis).astype(work, copy=False)
    half_alpha = 0.5 * float(alpha)
    result = np.empty((n_win, n_test), dtype=np.float64)
    flags = np.zeros((n_win, n_test), dtype=bool) if dtype == "mixed" else None
    # Flag where p·o² < T², i.e. side·other² < T²·‖g‖⁶ (no square root).
    level2 = mixed_flag_level(alpha) ** 2
    flag_below = [(level2 * hi) * (hi * hi) for _, _, _, hi, _, _ in ops.chunks]
    max_cols = max(stop - start for start, stop, *_ in ops.chunks)
    product_buf = np.empty(_PROJECTION_BLOCK_ROWS * max_cols + n_test, dtype=work)
    side_buf = np.empty(3 * _PROJECTION_BLOCK_ROWS * max_cols, dtype=work)
    for w0, w1, r0, r1 in _window_blocks(starts, rows.shape[0], _PROJECTION_BLOCK_ROWS):
        nw = w1 - w0
        summing = _segment_sums(starts[w0:w1] - r0, r1 - r0, work)
        flip = ~signal_side[w0:w1]  # these windows project their noise side
        any_flip = bool(flip.any())
        for k, (start, stop, psf, hi, lo, floor) in enumerate(ops.chunks):
            cols = stop - start
            size = nw * cols
            prod = product_buf[: (r1 - r0) * cols].reshape(r1 - r0, cols)
            np.matmul(rows[r0:r1], psf, out=prod)
            np.multiply(prod, prod, out=prod)
            side = side_buf[:size].reshape(nw, cols)
            if summing is None:
                side[...] = prod
            else:
                np.matmul(summing, prod, out=side)
            other = side_buf[size : 2 * size].reshape(nw, cols)
            np.subtract(hi, side, out=other)
            if work != np.float64:
                np.add(other, lo, out=other)
            if flags is not None:
                tmp = side_buf[2 * size : 3 * size].reshape(nw, cols)
                np.multiply(other, other, out=tmp)
                np.multiply(tmp, side, out=tmp)
                np.less(tmp, flag_below[k], out=flags[w0:w1, start:stop])
            signal, noise = side, other
            if any_flip:
                signal = np.where(flip[:, None], other, side)
                noise = np.where(flip[:, None], side, other)
                np.maximum(signal, 0.0, out=signal)
            np.maximum(noise, floor, out=noise)
            np.divide(signal, noise, out=signal)
            _power_into(result[w0:w1, start:stop], signal, half_alpha)
    recomputed = 0
    if flags is not None:
        assert ops.psf_t is not None
        recomputed = _recompute_float64(result, flags, rows64, starts, signal_side, geometry, ops.psf_t, half_alpha)
    if stats is not None:
        stats["recomputed"] = recomputed / max(1, n_win * n_test)
    return result


def _power_into(out: np.ndarray, ratio: np.ndarray, half_alpha: float) -> None:
    """``out[...] = ratio ** half_alpha``, computed in float64 (``out``'s precision)."""
    if half_alpha == 2.0:
        np.multiply(ratio, ratio, out=out, dtype=np.float64)
    elif half_alpha == 1.0:
        out[...] = ratio
    else:
        np.power(ratio, half_alpha, out=out, dtype=np.float64)


def _recompute_float64(
    result: np.ndarray,
    flags: np.ndarray,
    rows64: np.ndarray,
    starts: np.ndarray,
    signal_side: np.ndarray,
    geometry: MusicalGeometry,
    psf_t: np.ndarray,
    half_alpha: float,
) -> int:
    """Overwrite the flagged (window, test point) values of ``result`` with float64 ones.

    Per window, the PSF vectors of its flagged test points are gathered (rows of ``Gᵀ``) and
    projected in float64 with the float64 path's formula. Returns how many values were recomputed.
    """
    norm2 = geometry.psf_norm2
    ends = np.append(starts[1:], rows64.shape[0])
    total = 0
    for w in np.flatnonzero(flags.any(axis=1)):
        idx = np.flatnonzero(flags[w])
        total += idx.size
        proj = rows64[starts[w] : ends[w]] @ np.take(psf_t, idx, axis=0).T
        np.multiply(proj, proj, out=proj)
        side = np.add.reduce(proj, axis=0)
        n2 = norm2[idx]
        other = n2 - side
        signal, noise = (side, other) if signal_side[w] else (other, side)
        np.maximum(noise, _NOISE_FLOOR_REL * n2, out=noise)
        np.maximum(signal, 0.0, out=signal)
        np.divide(signal, noise, out=signal)
        result[w, idx] = signal * signal if half_alpha == 2.0 else signal**half_alpha
    return total


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


def indicator_torch(
    vectors: np.ndarray,
    m: np.ndarray,
    geometry: MusicalGeometry,
    alpha: float,
    dtype: ProjectionDtype = "float64",
    device: str = "cpu",
    stats: dict[str, float] | None = None,
) -> np.ndarray:
    """As :func:`indicator_numpy`, with the projections in torch on ``device``.

    Windows are grouped by ``M`` (one matrix product per block of a group). "float32" and
    "mixed" project in the rotated basis of :func:`_psf_basis` like the numpy backend, but sum
    the squares in float64; "mixed" flags with the same :func:`mixed_flag_level` and recomputes
    the flagged points in float64, one window at a time.
    """
    import torch

    if dtype not in ("float64", "float32", "mixed"):
        raise ValueError(f"dtype must be 'mixed', 'float64' or 'float32', got {dtype!r}")
    low = dtype != "float64"
    tdtype = torch.float32 if low else torch.float64
    dev = torch.device(device)
    g = _torch_psf_matrix(geometry, tdtype, dev, rotated=low)
    basis = torch.from_numpy(np.array(geometry.psf_basis)).to(dev) if low else None
    norm2 = torch.from_numpy(np.array(geometry.psf_norm2)).to(dev)[None, :]
    floor = _NOISE_FLOOR_REL * norm2
    half_alpha = 0.5 * float(alpha)
    flag_below = mixed_flag_level(alpha) ** 2 * norm2**3  # p·o² < T² ⇔ side·other² < T²‖g‖⁶
    n_win = vectors.shape[0]
    n_test = g.shape[1]
    result = torch.empty((n_win, n_test), dtype=torch.float64, device=dev)
    flags = torch.zeros((n_win, n_test), dtype=torch.bool, device=dev) if dtype == "mixed" else None
    # On CPU, small blocks keep the output in cache; on a GPU, large blocks fill the device.
    block_rows = _PROJECTION_BLOCK_ROWS if dev.type == "cpu" else 8192
    block = torch.empty((block_rows, n_test), dtype=tdtype, device=dev)
    groups = _side_rows(vectors, m)
    for idx, rows, is_signal in groups:
        r = rows.shape[1]
        flat = torch.from_numpy(rows.reshape(-1, rows.shape[2])).to(dev)
        flat = (flat @ basis).to(tdtype) if basis is not None else flat
        tidx = torch.from_numpy(idx).to(dev)
        per_block = max(1, block_rows // r)
        for start in range(0, idx.size, per_block):
            stop = min(idx.size, start + per_block)
            out = block[: (stop - start) * r]
            torch.matmul(flat[start * r : stop * r], g, out=out)
            out.mul_(out)
            side = out.view(stop - start, r, n_test).sum(dim=1, dtype=torch.float64)
            other = norm2 - side
            if flags is not None:
                flags[tidx[start:stop]] = side * other * other < flag_below
            signal, noise = (side, other) if is_signal else (other, side)
            ratio = signal.clamp_(min=0.0) / torch.maximum(noise, floor)
            result[tidx[start:stop]] = ratio.pow_(half_alpha)
    recomputed = 0
    if flags is not None:
        g64 = _torch_psf_matrix(geometry, torch.float64, dev, rotated=False)
        for idx, rows, is_signal in groups:
            rows64 = torch.from_numpy(rows).to(dev)
            for j, w in enumerate(idx.tolist()):
                sel = torch.nonzero(flags[w]).squeeze(1)
                if sel.numel() == 0:
                    continue
                recomputed += int(sel.numel())
                proj = rows64[j] @ g64[:, sel]
                side = (proj * proj).sum(dim=0)
                n2 = norm2[0, sel]
                other = n2 - side
                signal, noise = (side, other) if is_signal else (other, side)
                ratio = signal.clamp(min=0.0) / torch.maximum(noise, _NOISE_FLOOR_REL * n2)
                result[w, sel] = ratio.pow(half_alpha)
    if stats is not None:
        stats["recomputed"] = recomputed / max(1, n_win * n_test)
    out_np: np.ndarray = result.cpu().numpy()
    return out_np


def _torch_psf_matrix(geometry: MusicalGeometry, tdtype: Any, dev: Any, rotated: bool) -> Any:
    """``G`` (or ``Vᵀ G`` if ``rotated``, :func:`_psf_basis`) as a torch tensor (cached on the
    geometry: :attr:`MusicalGeometry.torch_tensors`)."""
    import torch

    cache = geometry.torch_tensors
    key = (tdtype, str(dev), rotated)
    g = cache.get(key)
    if g is None:
        psf = geometry.psf_basis.T @ geometry.psf_matrix if rotated else np.array(geometry.psf_matrix)
        g = torch.from_numpy(psf).to(dev, tdtype)
        cache[key] = g
    return g


def cut_geometry(geometry: MusicalGeometry, keep: np.ndarray) -> MusicalGeometry:
    """The geometry of a window cut at the image edge: only the window pixels in ``keep``.

    Parameters
    ----------
    geometry
        The whole window's geometry.
    keep
        ``(N_w²,)`` bool, row-major over the window: the pixels inside the image.

    Returns
    -------
    MusicalGeometry
        Same ``window_px``, ``subpixels`` and test points; ``weights``, ``psf_matrix`` and
        ``psf_norm2`` of the kept pixels only (cached on ``geometry``).
    """
    keep = np.asarray(keep, dtype=bool)
    key = keep.tobytes()
    cached = geometry.cut_geometries.get(key)
    if cached is not None:
        return cached
    weights = np.ascontiguousarray(geometry.weights[keep])
    g = np.ascontiguousarray(geometry.psf_matrix[keep])
    norm2 = np.einsum("it,it->t", g, g)
    for arr in (weights, g, norm2):
        arr.setflags(write=False)
    cut = MusicalGeometry(geometry.window_px, geometry.subpixels, weights, g, norm2)
    geometry.cut_geometries[key] = cut
    return cut


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
    stats: dict[str, float] | None = None,
    edge: EdgeRule = "full_windows",
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
        Where and in which precision the projections run (see :func:`indicator_numpy`).
    band_elements
        Memory bound: windows are processed in bands of window rows whose indicator array has at
        most about this many elements (at least one window row).
    stats
        If given, ``stats["recomputed"]`` is set to the fraction of (window, test point) pairs
        that "mixed" recomputed in float64.
    edge
        ``"full_windows"`` (MusiJ) or ``"partial_windows"`` (the MATLAB-derived ports): see the
        module docstring.

    Returns
    -------
    np.ndarray
        Shape ``(H · sub, W · sub)`` float64.
    """
    validate_stack(stack, geometry.window_px)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if edge not in ("full_windows", "partial_windows"):
        raise ValueError(f"edge must be 'full_windows' or 'partial_windows', got {edge!r}")
    k, h, w = stack.shape
    n_w, sub = geometry.window_px, geometry.subpixels
    # partial_windows: a window centred on every pixel, on the stack padded with zeros by half a
    # window; each window is then cut to its pixels inside the image (zero rows dropped).
    pad = n_w // 2 if edge == "partial_windows" else 0
    n_rows, n_cols = h + 2 * pad - n_w + 1, w + 2 * pad - n_w + 1
    indicator: Callable[..., np.ndarray]
    if backend == "numpy":
        indicator = indicator_numpy
        extra: dict[str, Any] = {"dtype": dtype}
    elif backend == "torch":
        indicator = indicator_torch
        extra = {"dtype": dtype, "device": device}
    else:
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
    part: dict[str, float] = {}
    recomputed = 0.0
    hwk = np.ascontiguousarray(np.moveaxis(np.asarray(stack, dtype=np.float64), 0, -1))
    if pad:
        hwk = np.pad(hwk, ((pad, pad), (pad, pad), (0, 0)))
    hp, wp = h + 2 * pad, w + 2 * pad
    canvas = np.zeros((hp * sub, wp * sub), dtype=np.float64)
    band_rows = max(1, band_elements // max(1, n_cols * geometry.n_test))
    for r0 in range(0, n_rows, band_rows):
        r1 = min(n_rows, r0 + band_rows)
        gram = gram_matrices(hwk[r0 : r1 + n_w - 1], geometry).reshape(-1, n_w * n_w, n_w * n_w)
        if pad:
            f = np.empty((gram.shape[0], geometry.n_test))
            for idx, keep in _cut_groups(r0, r1, n_cols, h, w, n_w):
                g_cut = geometry if keep is None else cut_geometry(geometry, keep)
                sub_gram = gram[idx] if keep is None else gram[idx][:, keep][:, :, keep]
                sigma, vectors = eigen_decomposition(sub_gram)
                m = signal_subspace_size(sigma, threshold_log10, k)
                f[idx] = indicator(vectors, m, g_cut, alpha, stats=part, **extra)
                recomputed += part.get("recomputed", 0.0) * idx.size * geometry.n_test
        else:
            sigma, vectors = eigen_decomposition(gram)
            m = signal_subspace_size(sigma, threshold_log10, k)
            f = indicator(vectors, m, geometry, alpha, stats=part, **extra)
            recomputed += part.get("recomputed", 0.0) * f.size
        _accumulate(canvas, f.reshape(r1 - r0, n_cols, n_w * sub, n_w * sub), r0, sub)
    counts = np.repeat(_window_counts(hp, n_w), sub)[:, None] * np.repeat(_window_counts(wp, n_w), sub)[None, :]
    canvas /= counts
    if pad:
        canvas = np.ascontiguousarray(canvas[pad * sub : (pad + h) * sub, pad * sub : (pad + w) * sub])
    if stats is not None:
        stats["recomputed"] = recomputed / (n_rows * n_cols * geometry.n_test)
    return canvas


def _cut_groups(
    r0: int, r1: int, n_cols: int, h: int, w: int, n_w: int
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Windows of rows ``[r0, r1)`` (centred on pixel ``(r, c)``; flat index ``(r − r0)·n_cols + c``)
    grouped by how the image edge cuts them: ``(indices, keep)``, ``keep`` the ``(N_w²,)`` mask of
    window pixels inside the image, None for a whole window."""
    half = n_w // 2
    offsets = np.arange(n_w) - half

    def pattern(centre: int, length: int) -> tuple[int, int]:
        return max(0, half - centre), max(0, centre + half - (length - 1))  # pixels cut before, after

    row_keys = [pattern(r, h) for r in range(r0, r1)]
    col_keys = [pattern(c, w) for c in range(n_cols)]
    groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for i, rk in enumerate(row_keys):
        for c, ck in enumerate(col_keys):
            groups.setdefault((rk, ck), []).append(i * n_cols + c)
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for (rk, ck), members in groups.items():
        idx = np.asarray(members, dtype=np.intp)
        if rk == (0, 0) and ck == (0, 0):
            out.append((idx, None))
            continue
        rows_in = (offsets >= -half + rk[0]) & (offsets <= half - rk[1])
        cols_in = (offsets >= -half + ck[0]) & (offsets <= half - ck[1])
        out.append((idx, (rows_in[:, None] & cols_in[None, :]).ravel()))
    return out


def _accumulate(canvas: np.ndarray, patches: np.ndarray, r0: int, sub: int) -> None:
    """Add window patches ``(rows, cols, N_w·sub, N_w·sub)`` into ``canvas (H·sub, W·sub)``.

    One add per window: each is a block of whole contiguous patch rows (2× faster than one
    add per window pixel over all windows, which reads the patches transposed).
    """
    n_r, n_c, side = patches.shape[0], patches.shape[1], patches.shape[2]
    for r in range(n_r):
        y0 = (r0 + r) * sub
        band = canvas[y0 : y0 + side]
        for c in range(n_c):
            band[:, c * sub : c * sub + side] += patches[r, c]


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
