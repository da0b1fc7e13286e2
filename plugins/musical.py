"""MUSICAL super-resolution (Agarwal & Macháň 2016): batch functions and the live ``musical`` stage.

Batch use::

    from scopestream.plugins.musical import musical_image, musical_windows
    result = musical_image(stack, wavelength_nm=510, na=1.49, pixel_size_nm=65)   # whole stack
    results = musical_windows(stack, window_frames=200, slide_frames=50, ...)     # sliding windows

The algorithm is the one in ``SCIENCE.md`` (the public implementations), computed by the
vectorized kernel in :mod:`scopestream.plugins._musical_core`. The stack is divided by one fixed
scale (by default its global maximum, as the published implementations do) before anything else:
the threshold is absolute, so every sliding window of one stack must see the same normalization.

Threshold: a number is log10 of a singular value of the normalized data (published default −1).
``"auto"`` puts it at the shoulder of the singular-value spectrum of the first window
(:func:`scopestream.plugins._musical_core.auto_threshold` documents the rule) and then keeps it
fixed for all windows.

Image geometry: the image of a ``(K, H, W)`` stack is ``(H · sub, W · sub)``; its sub-pixel
``(Y, X)`` is centred at image coordinates ``x = (X + 0.5) / sub − 0.5``,
``y = (Y + 0.5) / sub − 0.5`` px (the centre of pixel (0, 0) is (0.0, 0.0)).

The live stage is :class:`MusicalStage`; see its docstring.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, MutableMapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, model_validator

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._stage import Emission, StagePlugin
from scopestream.plugins._musical_core import (
    MIN_WINDOW_FRAMES,
    Backend,
    ProjectionDtype,
    auto_threshold,
    musical_canvas,
    musical_geometry,
    singular_values,
    validate_stack,
    window_size_px,
)

__all__ = [
    "MIN_WINDOW_FRAMES",
    "MusicalBody",
    "MusicalResult",
    "MusicalSettings",
    "MusicalSkippedBody",
    "MusicalStage",
    "PLUGIN",
    "auto_threshold",
    "musical_image",
    "musical_windows",
    "resolve_threshold",
    "window_size_px",
]

Threshold = float | Literal["auto"]


# -- batch -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MusicalResult:
    """One MUSICAL image and what it was computed with.

    Attributes
    ----------
    image
        ``(H · sub, W · sub)`` float64, the raw indicator averaged over overlapping windows.
    frame_start, frame_end
        First and last frame (inclusive) of the stack that went into it.
    threshold_log10
        The threshold used (resolved if ``"auto"`` was asked for).
    scale
        The normalization the stack was divided by.
    window_px
        PSF window side ``N_w``, px.
    subpixels
        Sub-pixels per pixel along each axis.
    """

    image: np.ndarray
    frame_start: int
    frame_end: int
    threshold_log10: float
    scale: float
    window_px: int
    subpixels: int


def _check_batch_stack(stack: Any) -> np.ndarray:
    arr = np.asarray(stack)
    if arr.ndim == 2:
        raise ValueError("MUSICAL needs a stack of frames (frames, rows, columns), got a single 2-D image")
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(f"expected a non-empty stack of shape (frames, rows, columns), got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise ValueError(f"expected a numeric stack, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"the stack holds {bad} NaN or infinite value(s)")
    return arr


def _global_scale(arr: np.ndarray) -> float:
    peak = float(arr.max())
    if not peak > 0:
        raise ValueError(
            f"the stack's maximum is {peak}: MUSICAL divides by the global maximum, so the data "
            "must have positive values (an all-zero stack has nothing to resolve)"
        )
    if float(arr.min()) == peak:
        raise ValueError("the stack is constant: MUSICAL needs intensity fluctuations over time")
    return peak


def resolve_threshold(
    threshold: Threshold, normalized: np.ndarray, wavelength_nm: float, na: float, pixel_size_nm: float
) -> float:
    """A numeric threshold (log10): ``threshold`` itself, or the automatic one for ``normalized``.

    Parameters
    ----------
    threshold
        A number (log10 of a singular value) or ``"auto"``.
    normalized
        The (first) window of normalized data, ``(K, H, W)``; used only for ``"auto"``.
    wavelength_nm, na, pixel_size_nm
        Optics (they fix the window).
    """
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold must be a number (log10) or 'auto', got {threshold!r}")
        geometry = musical_geometry(float(wavelength_nm), float(na), float(pixel_size_nm), 1)
        sigma = singular_values(normalized, geometry, max_windows=1024)
        return auto_threshold(sigma, normalized.shape[0])
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return value


def musical_image(
    stack: Any,
    *,
    wavelength_nm: float = 510.0,
    na: float = 1.49,
    pixel_size_nm: float = 65.0,
    subpixels: int = 20,
    threshold: Threshold = -1.0,
    alpha: float = 4.0,
    scale: float | None = None,
    backend: Backend = "numpy",
    device: str = "cpu",
    dtype: ProjectionDtype = "float64",
) -> MusicalResult:
    """MUSICAL image of a whole stack (one window of all its frames).

    Parameters
    ----------
    stack
        ``(K, H, W)`` numeric array (ADU or photons), ``K ≥ MIN_WINDOW_FRAMES``, ``H, W ≥ N_w``.
    wavelength_nm, na, pixel_size_nm
        Emission wavelength, numerical aperture, sample-plane pixel size. Defaults: the public
        implementations' (510 nm, 1.49, 6.5 µm camera pixel at 100×).
    subpixels
        Sub-pixels per pixel along each axis.
    threshold
        log10 threshold on the singular values of the normalized data, or ``"auto"``.
    alpha
        Indicator exponent.
    scale
        Divide the stack by this; default its global maximum.
    backend, device
        ``"numpy"``, or ``"torch"`` on ``device`` (``"cpu"``, ``"cuda"``, ...).
    dtype
        Precision of the projections: "float64" agrees with a per-pixel SVD loop to ~1e-12;
        "float32" is 1.3–1.5× faster and errs up to ~1e-3 relative at bright emitters; "mixed"
        (float32, then float64 where float32 may err by more than 5e-5) agrees to ~1e-5, and its
        speed depends on the data: as float64 on dense data (a fifth of the points recomputed),
        up to ~20 % faster on sparse emitters. See
        :func:`scopestream.plugins._musical_core.indicator_numpy`.

    Raises
    ------
    ValueError
        Naming the problem: NaN, all-zero or constant stack, too few frames, region smaller than
        the PSF window, bad parameters.
    """
    arr = _check_batch_stack(stack)
    geometry = musical_geometry(float(wavelength_nm), float(na), float(pixel_size_nm), int(subpixels))
    validate_stack(arr, geometry.window_px)
    used_scale = _global_scale(arr) if scale is None else float(scale)
    if not used_scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    normalized = arr.astype(np.float64) / used_scale
    thr = resolve_threshold(threshold, normalized, wavelength_nm, na, pixel_size_nm)
    image = musical_canvas(normalized, geometry, thr, alpha, backend=backend, device=device, dtype=dtype)
    return MusicalResult(image, 0, arr.shape[0] - 1, thr, used_scale, geometry.window_px, geometry.subpixels)


def musical_windows(
    stack: Any,
    *,
    window_frames: int | None = None,
    slide_frames: int | None = None,
    wavelength_nm: float = 510.0,
    na: float = 1.49,
    pixel_size_nm: float = 65.0,
    subpixels: int = 20,
    threshold: Threshold = -1.0,
    alpha: float = 4.0,
    backend: Backend = "numpy",
    device: str = "cpu",
    dtype: ProjectionDtype = "float64",
) -> list[MusicalResult]:
    """MUSICAL images of sliding time windows of one stack, with one fixed normalization.

    The whole stack is divided by its global maximum; the threshold (resolved on the first window
    if ``"auto"``) is the same for every window. Windows start at frames ``0, slide, 2·slide, …``
    while a whole window fits; frames after the last whole window are not used.

    Parameters
    ----------
    stack
        ``(frames, H, W)``.
    window_frames
        Frames per window (``K``); None: one window of the whole stack.
    slide_frames
        Step between window starts; None: ``window_frames`` (windows side by side).
    wavelength_nm, na, pixel_size_nm, subpixels, threshold, alpha, backend, device, dtype
        As in :func:`musical_image`.
    """
    arr = _check_batch_stack(stack)
    n_frames = arr.shape[0]
    k = n_frames if window_frames is None else int(window_frames)
    slide = k if slide_frames is None else int(slide_frames)
    if k < MIN_WINDOW_FRAMES:
        raise ValueError(
            f"window_frames ({k}) must be at least {MIN_WINDOW_FRAMES} for the threshold to mean anything"
        )
    if k > n_frames:
        raise ValueError(f"window_frames ({k}) is longer than the stack ({n_frames} frames)")
    if slide < 1:
        raise ValueError(f"slide_frames must be at least 1, got {slide}")
    scale = _global_scale(arr)
    geometry = musical_geometry(float(wavelength_nm), float(na), float(pixel_size_nm), int(subpixels))
    validate_stack(arr[:k], geometry.window_px)
    thr = resolve_threshold(threshold, arr[:k].astype(np.float64) / scale, wavelength_nm, na, pixel_size_nm)
    results = []
    for start in range(0, n_frames - k + 1, slide):
        window = arr[start : start + k].astype(np.float64) / scale
        if float(np.ptp(window)) == 0.0:
            raise ValueError(f"frames {start}–{start + k - 1} are constant: MUSICAL needs fluctuations")
        image = musical_canvas(window, geometry, thr, alpha, backend=backend, device=device, dtype=dtype)
        results.append(MusicalResult(image, start, start + k - 1, thr, scale, geometry.window_px, geometry.subpixels))
    return results


# -- the live stage: settings and messages ------------------------------------------------------


class MusicalSettings(BaseModel):
    """Settings of the ``musical`` stage (section ``musical.*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wavelength_nm: float | None = Field(None, gt=0, description="Emission wavelength, nm; None: optics.wavelength_nm.")
    na: float | None = Field(None, gt=0, le=1.7, description="Numerical aperture; None: optics.na.")
    pixel_size_nm: float | None = Field(None, gt=0, description="Sample-plane pixel size, nm; None: optics.pixel_size_nm.")
    window_frames: int = Field(
        200, ge=MIN_WINDOW_FRAMES, le=100_000,
        description="K: frames per MUSICAL window (200 as in Sekh et al.; 50 for finer time resolution).",
    )
    slide_frames: int = Field(200, ge=1, description="Frames between the starts of successive windows of one track.")
    region_px: int = Field(25, ge=3, le=512, description="Side of the square region around a track that goes through MUSICAL, px.")
    capture_margin_px: int = Field(
        12, ge=0, le=512,
        description="Frames are buffered around a track in a box region_px + 2·margin wide; a track that wanders farther than the margin from where the box was placed gets a new box (its partial window is dropped), px.",
    )
    subpixels: int = Field(20, ge=1, le=64, description="Sub-pixels per pixel along each axis of a track's MUSICAL image.")
    threshold: float | Literal["auto"] = Field(
        -1.0, description="Signal/noise threshold, log10 of a singular value of the normalized data, or 'auto' (shoulder of the first window's spectrum, then fixed).",
    )
    alpha: float = Field(4.0, gt=0, le=16, description="Exponent of the MUSICAL indicator.")
    normalization_adu: float | None = Field(
        None, gt=0,
        description="Fixed scale the data are divided by, ADU; None: the maximum pixel value of the run's first window_frames frames (whole field), then fixed.",
    )
    full_field_every_frames: int = Field(
        0, ge=0, description="Start a MUSICAL window of the whole field every this many frames (0: off). Must be 0 or ≥ window_frames.",
    )
    full_field_subpixels: int = Field(4, ge=1, le=64, description="Sub-pixels per pixel of the full-field image (its cost grows with the square).")
    workers: int = Field(1, ge=0, le=64, description="Worker processes (or threads); 0 runs each window inline in process() (tests, strict replay).")
    executor: Literal["process", "thread"] = Field(
        "process", description="Worker kind: 'process' (spawned, BLAS limited to 1 thread each) or 'thread' (limits the daemon's BLAS to 1 thread).",
    )
    max_pending_windows: int = Field(4, ge=1, le=1024, description="Windows submitted and not yet finished, at most; beyond it windows are skipped (or waited for).")
    skip_when_busy: bool = Field(True, description="True: skip and count a window when max_pending_windows are in flight (live). False: wait (replay; nothing lost).")
    max_tracks: int = Field(32, ge=0, le=4096, description="Tracks buffered at once; later tracks get no MUSICAL until a slot frees (counted).")
    backend: Literal["numpy", "torch"] = Field("numpy", description="Kernel backend for the projections.")
    device: str = Field("cpu", description="Torch device for backend 'torch' ('cpu', 'cuda', 'cuda:1').")
    teardown_timeout_s: float = Field(120.0, gt=0, description="At the end of a run, wait at most this long for windows in flight.")

    @model_validator(mode="after")
    def _consistent(self) -> MusicalSettings:
        if 0 < self.full_field_every_frames < self.window_frames:
            raise ValueError(
                f"full_field_every_frames ({self.full_field_every_frames}) must be 0 (off) or at least "
                f"window_frames ({self.window_frames}): one full-field window is collected at a time"
            )
        return self


class MusicalBody(BaseModel):
    """One MUSICAL image (array ``image``, float32, ``(height_px · subpixels, width_px · subpixels)``).

    Sub-pixel ``(Y, X)`` of the image is centred at camera coordinates
    ``x = x0_px + (X + 0.5) / subpixels − 0.5``, ``y = y0_px + (Y + 0.5) / subpixels − 0.5`` px.
    """

    model_config = ConfigDict(frozen=True)

    particle: int | None = Field(description="Track id, or None for a full-field image.")
    kind: Literal["track", "full_field"] = Field(description="What the region follows.")
    frame_start: int = Field(description="First frame (Frame.seq) of the window.")
    frame_end: int = Field(description="Last frame (Frame.seq) of the window, inclusive.")
    n_frames: int = Field(description="Frames in the window (K).")
    x0_px: int = Field(description="Column of the region's first pixel in the camera frame.")
    y0_px: int = Field(description="Row of the region's first pixel in the camera frame.")
    width_px: int = Field(description="Region width, camera pixels.")
    height_px: int = Field(description="Region height, camera pixels.")
    subpixels: int = Field(description="Image sub-pixels per camera pixel along each axis.")
    image_pixel_nm: float = Field(description="Size of one image sub-pixel in the sample, nm.")
    window_px: int = Field(description="MUSICAL PSF window side N_w, camera pixels.")
    threshold_log10: float = Field(description="Signal/noise threshold used (log10 of a singular value).")
    alpha: float = Field(description="Indicator exponent.")
    scale_adu: float = Field(description="The data were divided by this before MUSICAL, ADU.")
    wavelength_nm: float = Field(description="Emission wavelength used, nm.")
    na: float = Field(description="Numerical aperture used.")
    pixel_size_nm: float = Field(description="Sample-plane pixel size used, nm.")
    centre_x_px: float | None = Field(None, description="Mean x of the track's detections in the window, px (track only).")
    centre_y_px: float | None = Field(None, description="Mean y of the track's detections in the window, px (track only).")
    path_fits: bool | None = Field(None, description="Whether all the track's detections in the window lie inside the region (track only).")
    compute_ms: float = Field(description="Time the MUSICAL computation took in its worker, ms.")


class MusicalSkippedBody(BaseModel):
    """A window that was not computed, and why."""

    model_config = ConfigDict(frozen=True)

    particle: int | None = Field(description="Track id, or None for a full-field window.")
    kind: Literal["track", "full_field"] = Field(description="What the region follows.")
    frame_start: int = Field(description="First frame of the window.")
    frame_end: int = Field(description="Last frame of the window, inclusive.")
    reason: Literal["busy", "invalid", "failed", "teardown"] = Field(
        description="busy: max_pending_windows in flight; invalid: data unusable (constant region, region smaller than the PSF window); failed: the computation raised; teardown: still pending when the run ended.",
    )
    detail: str = Field("", description="Human-readable detail.")
    windows_skipped_total: int = Field(description="Windows not computed so far in this run (all reasons).")


# -- worker side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WindowJob:
    """Everything a worker needs for one window (picklable)."""

    data: np.ndarray  # (K, h, w), camera values
    scale: float
    wavelength_nm: float
    na: float
    pixel_size_nm: float
    subpixels: int
    threshold_log10: float
    alpha: float
    backend: Backend
    device: str


def _run_window_job(job: _WindowJob) -> tuple[np.ndarray, float]:
    """Compute one window; returns the image (float32) and the compute time (s)."""
    t0 = time.perf_counter()
    geometry = musical_geometry(job.wavelength_nm, job.na, job.pixel_size_nm, job.subpixels)
    normalized = job.data.astype(np.float64) / job.scale
    image = musical_canvas(
        normalized, geometry, job.threshold_log10, job.alpha, backend=job.backend, device=job.device
    )
    return image.astype(np.float32), time.perf_counter() - t0


_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _init_worker() -> None:
    """Worker process set-up: one BLAS thread, and no SIGINT (Ctrl-C reaches the whole process
    group; the daemon shuts the pool down in order, a worker must not die mid-window)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_blas_threads()


def limit_blas_threads() -> None:
    """Make BLAS in this process single-threaded (worker initializer).

    Batched ``eigh`` ran 15× slower with 2 BLAS threads than with 1 (SCIENCE.md): parallelism
    comes from the workers, not from BLAS. Uses threadpoolctl when it is installed; otherwise
    sets the usual environment variables (for libraries loaded later) and calls
    ``openblas_set_num_threads(1)`` in every OpenBLAS already loaded (found in /proc/self/maps).
    """
    for name in _BLAS_ENV:
        os.environ[name] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        _set_openblas_threads(1)
    else:
        threadpool_limits(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _set_openblas_threads(n: int) -> None:
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line}
    except OSError:
        return
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_"):
            func = getattr(lib, symbol, None)
            if func is not None:
                func(ctypes.c_int(n))
                break


# -- the live stage ------------------------------------------------------------------------------


@dataclass
class _Pending:
    future: Future[tuple[np.ndarray, float]]
    body: dict[str, Any]
    t_acquired: float


class MusicalStage:
    """Live MUSICAL: per-track windows, a periodic full-field window, off the camera path.

    Per track (needs ``products["track"]``, a TrackUpdate with ``frame_seq, particle, x, y,
    started, ended``): when a track first appears, a capture box of ``region_px + 2·margin``
    pixels is placed centred on it, and every frame while the track is open its box is cropped
    into the track's ring buffer of ``window_frames`` frames (with the track's position, NaN in
    frames without a detection). Once ``window_frames`` frames are buffered, and then every
    ``slide_frames`` frames, the window is cut: a ``region_px`` square centred on the mean of the
    track's positions in the window (moved inside the box where needed) goes to a worker. A track
    that leaves the middle of its box gets a new box (partial window dropped, counted in
    ``musical_track_reanchors``). When ``ended`` names the track, or it has no detection for
    ``window_frames`` frames, its buffer is freed (a partial window is dropped).

    Without ``products["track"]`` (no tracker in the pipeline) only full-field windows run: when
    ``full_field_every_frames > 0``, every that many frames the next ``window_frames`` whole frames
    are collected and sent as one window (at ``full_field_subpixels``).

    All windows share one normalization (``normalization_adu``, or the maximum of the run's first
    ``window_frames`` frames) and one threshold (a number, or ``"auto"`` resolved on the first
    window), so that images of successive windows compare.

    Work runs in a pool (spawned processes with single-threaded BLAS, or threads); ``process``
    only copies crops and submits. When ``max_pending_windows`` are in flight a new window is
    skipped and counted (event ``musical_skipped``), or, with ``skip_when_busy=False``, waited for.
    Finished images come back as ``musical`` emissions from later ``process`` calls and from
    ``teardown`` (which waits at most ``teardown_timeout_s``).

    Memory is bounded: the track ring buffers are one preallocated float32 array of
    ``max_tracks × window_frames × box²`` (32 × 200 × 49² × 4 B ≈ 61 MB at the defaults), tracks
    beyond ``max_tracks`` are not buffered (``musical_tracks_not_buffered``); one full-field buffer
    of ``window_frames`` frames in the camera dtype exists only while a full-field window is being
    collected; at most ``max_pending_windows`` windows (their data and images) are in flight.
    """

    name = "musical"

    def __init__(self, config: ScopestreamConfig, settings: MusicalSettings) -> None:
        self._optics = config.optics
        self._settings = settings
        self._executor: Executor | None = None
        self._pending: deque[_Pending] = deque()
        self._counts = {
            "musical_windows_done": 0,
            "musical_windows_skipped": 0,
            "musical_windows_invalid": 0,
            "musical_windows_failed": 0,
            "musical_track_reanchors": 0,
            "musical_tracks_not_buffered": 0,
        }
        self._configure(settings)

    # settings -------------------------------------------------------------------------------

    def _configure(self, settings: MusicalSettings) -> None:
        s = settings
        self._wavelength_nm = float(s.wavelength_nm or self._optics.wavelength_nm)
        self._na = float(s.na or self._optics.na)
        self._pixel_size_nm = float(s.pixel_size_nm or self._optics.pixel_size_nm)
        self._window_px = window_size_px(self._wavelength_nm, self._na, self._pixel_size_nm)
        if s.region_px < self._window_px:
            raise ValueError(
                f"musical.region_px ({s.region_px}) is smaller than the MUSICAL PSF window "
                f"({self._window_px} px for λ={self._wavelength_nm} nm, NA={self._na}, "
                f"pixel {self._pixel_size_nm} nm)"
            )
        self._settings = s
        self._scale: float | None = s.normalization_adu
        self._running_max = -math.inf
        self._threshold_log10: float | None = None if s.threshold == "auto" else float(s.threshold)
        self._frames_seen = 0
        self._frame_shape: tuple[int, int] | None = None
        # Track slots (allocated at the first frame, when the frame size is known).
        self._slot_of: dict[int, int] = {}
        self._refused: set[int] = set()
        self._ring: np.ndarray | None = None
        self._ff_buffer: np.ndarray | None = None
        self._ff_count = 0
        self._ff_seq_start = 0

    def apply_settings(self, settings: MusicalSettings) -> None:
        """Take new settings; buffers restart if the window, region or optics changed."""
        old = self._settings
        keep = {"alpha", "subpixels", "full_field_subpixels", "skip_when_busy", "max_pending_windows",
                "teardown_timeout_s", "threshold", "backend", "device"}
        structural = {k for k in type(settings).model_fields if k not in keep}
        if any(getattr(old, k) != getattr(settings, k) for k in structural):
            self._configure(settings)
            return
        self._settings = settings
        if settings.threshold != old.threshold:
            self._threshold_log10 = None if settings.threshold == "auto" else float(settings.threshold)

    def counters(self) -> Mapping[str, int]:
        """Running totals: windows done / skipped (any reason) / invalid / failed, re-anchors,
        tracks not buffered."""
        return dict(self._counts)

    # frames ---------------------------------------------------------------------------------

    def process(self, frame: Frame, products: MutableMapping[str, Any]) -> Sequence[Emission]:
        """Buffer this frame's crops, submit complete windows, return finished images."""
        image = frame.image
        if image.ndim != 2 or image.size == 0:
            raise ValueError(f"frame {frame.seq}: expected a non-empty 2-D image, got shape {image.shape}")
        if image.dtype.kind not in "uif":
            raise ValueError(f"frame {frame.seq}: expected a numeric image, got dtype {image.dtype}")
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise ValueError(f"frame {frame.seq}: the image holds NaN or infinite values; not buffered for MUSICAL")
        if self._frame_shape is None:
            self._start(image.shape)
        elif image.shape != self._frame_shape:
            raise ValueError(
                f"frame {frame.seq}: shape {image.shape} differs from the run's {self._frame_shape}"
            )
        emissions = self._collect()
        if self._scale is None:
            self._running_max = max(self._running_max, float(image.max()))
            if self._frames_seen + 1 >= self._settings.window_frames:
                self._scale = self._running_max if self._running_max > 0 else 1.0
        track = products.get("track")
        if track is not None and self._ring is not None:
            self._ingest_track(frame, image, track, emissions)
        if self._settings.full_field_every_frames > 0:
            self._ingest_full_field(frame, image, emissions)
        self._frames_seen += 1
        return emissions

    def teardown(self) -> Sequence[Emission]:
        """Wait (at most ``teardown_timeout_s``) for windows in flight and return their images."""
        emissions: list[Emission] = []
        deadline = time.monotonic() + self._settings.teardown_timeout_s
        while self._pending:
            item = self._pending[0]
            try:
                item.future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeoutError:
                break
            except Exception:  # noqa: BLE001 - reported by _emit_result below
                pass
            self._pending.popleft()
            self._emit_result(item, emissions)
        while self._pending:
            item = self._pending.popleft()
            item.future.cancel()
            self._skip(item.body, "teardown", "still in flight when the run ended", emissions)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        return emissions

    # internals ------------------------------------------------------------------------------

    def _start(self, shape: tuple[int, ...]) -> None:
        h, w = int(shape[0]), int(shape[1])
        self._frame_shape = (h, w)
        s = self._settings
        self._region_h, self._region_w = min(s.region_px, h), min(s.region_px, w)
        box = s.region_px + 2 * s.capture_margin_px
        self._box_h, self._box_w = min(box, h), min(box, w)
        n, k = s.max_tracks, s.window_frames
        if n == 0:
            return
        self._ring = np.zeros((n, k, self._box_h, self._box_w), dtype=np.float32)
        self._pos = np.full((n, k, 2), np.nan)
        self._seq = np.zeros((n, k), dtype=np.int64)
        self._particle = np.full(n, -1, dtype=np.int64)
        self._box_y0 = np.zeros(n, dtype=np.intp)
        self._box_x0 = np.zeros(n, dtype=np.intp)
        self._count = np.zeros(n, dtype=np.int64)
        self._next_window = np.zeros(n, dtype=np.int64)
        self._last_seen = np.zeros(n, dtype=np.int64)

    def _place_box(self, slot: int, x: float, y: float) -> None:
        h, w = self._frame_shape or (0, 0)
        self._box_y0[slot] = int(np.clip(round(y) - self._box_h // 2, 0, h - self._box_h))
        self._box_x0[slot] = int(np.clip(round(x) - self._box_w // 2, 0, w - self._box_w))
        self._count[slot] = 0
        self._next_window[slot] = self._settings.window_frames
        self._pos[slot] = np.nan

    def _region_origin(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Origin of a region centred on (x, y), clipped to the frame."""
        h, w = self._frame_shape or (0, 0)
        ry0 = np.clip(np.round(y).astype(np.intp) - self._region_h // 2, 0, h - self._region_h)
        rx0 = np.clip(np.round(x).astype(np.intp) - self._region_w // 2, 0, w - self._region_w)
        return ry0, rx0

    def _ingest_track(self, frame: Frame, image: np.ndarray, track: Any, emissions: list[Emission]) -> None:
        s = self._settings
        particle = np.asarray(track.particle, dtype=np.int64).reshape(-1)
        xs = np.asarray(track.x, dtype=np.float64).reshape(-1)
        ys = np.asarray(track.y, dtype=np.float64).reshape(-1)
        if not (particle.shape == xs.shape == ys.shape):
            raise ValueError(
                f"frame {frame.seq}: products['track'] has {particle.size} ids but {xs.size} x and {ys.size} y"
            )
        good = np.isfinite(xs) & np.isfinite(ys)
        particle, xs, ys = particle[good], xs[good], ys[good]
        for pid in getattr(track, "ended", ()):
            self._free(int(pid))
            self._refused.discard(int(pid))
        # New tracks (a rare event per frame: a loop over new ids only).
        for pid, x, y in zip(particle.tolist(), xs.tolist(), ys.tolist(), strict=True):
            if pid in self._slot_of or pid in self._refused:
                continue
            free = np.flatnonzero(self._particle < 0)
            if free.size == 0:
                self._counts["musical_tracks_not_buffered"] += 1
                if len(self._refused) > 100_000:
                    self._refused.clear()
                self._refused.add(pid)
                continue
            slot = int(free[0])
            self._particle[slot] = pid
            self._slot_of[pid] = slot
            self._place_box(slot, x, y)
        slots = np.array([self._slot_of.get(p, -1) for p in particle.tolist()], dtype=np.intp)
        known = slots >= 0
        slots, xs, ys = slots[known], xs[known], ys[known]
        # Re-anchor tracks whose region would no longer fit inside their box.
        if slots.size:
            ry0, rx0 = self._region_origin(xs, ys)
            out = (
                (ry0 < self._box_y0[slots]) | (ry0 + self._region_h > self._box_y0[slots] + self._box_h)
                | (rx0 < self._box_x0[slots]) | (rx0 + self._region_w > self._box_x0[slots] + self._box_w)
            )
            for i in np.flatnonzero(out).tolist():
                self._counts["musical_track_reanchors"] += 1
                self._place_box(int(slots[i]), float(xs[i]), float(ys[i]))
            self._last_seen[slots] = frame.seq
        active = np.flatnonzero(self._particle >= 0)
        if active.size == 0:
            return
        k = s.window_frames
        widx = self._count[active] % k
        self._pos[active, widx] = np.nan
        if slots.size:
            self._pos[slots, self._count[slots] % k, 0] = ys
            self._pos[slots, self._count[slots] % k, 1] = xs
        assert self._ring is not None
        # Each box is one block of a sliding-window view of the frame: numpy copies whole
        # blocks, six times faster than gathering every pixel by a (row, column) index.
        boxes = sliding_window_view(image, (self._box_h, self._box_w))
        self._ring[active, widx] = boxes[self._box_y0[active], self._box_x0[active]]
        self._seq[active, widx] = frame.seq
        self._count[active] += 1
        ready = active[self._count[active] >= self._next_window[active]]
        for slot in ready.tolist():
            self._next_window[slot] += s.slide_frames
            self._submit_track_window(slot, frame, emissions)
        stale = active[frame.seq - self._last_seen[active] > k]
        for slot in stale.tolist():
            self._free(int(self._particle[slot]))

    def _free(self, pid: int) -> None:
        slot = self._slot_of.pop(pid, None)
        if slot is not None:
            self._particle[slot] = -1
            self._count[slot] = 0

    def _submit_track_window(self, slot: int, frame: Frame, emissions: list[Emission]) -> None:
        k = self._settings.window_frames
        order = (self._count[slot] - k + np.arange(k)) % k
        assert self._ring is not None
        pos = self._pos[slot, order]
        seqs = self._seq[slot, order]
        finite = np.isfinite(pos[:, 0])
        by0, bx0 = int(self._box_y0[slot]), int(self._box_x0[slot])
        if finite.any():
            cy, cx = float(pos[finite, 0].mean()), float(pos[finite, 1].mean())
        else:
            cy, cx = by0 + (self._box_h - 1) / 2, bx0 + (self._box_w - 1) / 2
        ry0, rx0 = self._region_origin(np.array([cx]), np.array([cy]))
        y0 = int(np.clip(ry0[0], by0, by0 + self._box_h - self._region_h))
        x0 = int(np.clip(rx0[0], bx0, bx0 + self._box_w - self._region_w))
        ly, lx = y0 - by0, x0 - bx0
        data = self._ring[slot, order][:, ly : ly + self._region_h, lx : lx + self._region_w]
        p = pos[finite]
        fits = bool(
            np.all((p[:, 0] >= y0 - 0.5) & (p[:, 0] < y0 + self._region_h - 0.5)
                   & (p[:, 1] >= x0 - 0.5) & (p[:, 1] < x0 + self._region_w - 0.5))
        )
        body = self._body_base("track", int(self._particle[slot]), int(seqs[0]), int(seqs[-1]), k,
                               x0, y0, self._region_w, self._region_h, self._settings.subpixels)
        body.update(centre_x_px=cx, centre_y_px=cy, path_fits=fits)
        self._submit(data, body, frame, emissions)

    def _ingest_full_field(self, frame: Frame, image: np.ndarray, emissions: list[Emission]) -> None:
        s = self._settings
        if self._ff_buffer is None and self._frames_seen % s.full_field_every_frames == 0:
            self._ff_buffer = np.empty((s.window_frames, *image.shape), dtype=image.dtype)
            self._ff_count = 0
            self._ff_seq_start = frame.seq
        if self._ff_buffer is None:
            return
        self._ff_buffer[self._ff_count] = image
        self._ff_count += 1
        if self._ff_count == s.window_frames:
            data, self._ff_buffer = self._ff_buffer, None
            h, w = image.shape
            body = self._body_base("full_field", None, self._ff_seq_start, frame.seq, s.window_frames,
                                   0, 0, w, h, s.full_field_subpixels)
            self._submit(data, body, frame, emissions)

    def _body_base(self, kind: str, particle: int | None, start: int, end: int, k: int,
                   x0: int, y0: int, w: int, h: int, sub: int) -> dict[str, Any]:
        return {
            "particle": particle, "kind": kind, "frame_start": start, "frame_end": end, "n_frames": k,
            "x0_px": x0, "y0_px": y0, "width_px": w, "height_px": h, "subpixels": sub,
            "image_pixel_nm": self._pixel_size_nm / sub, "window_px": self._window_px,
            "alpha": self._settings.alpha, "wavelength_nm": self._wavelength_nm, "na": self._na,
            "pixel_size_nm": self._pixel_size_nm,
        }

    def _submit(self, data: np.ndarray, body: dict[str, Any], frame: Frame, emissions: list[Emission]) -> None:
        s = self._settings
        problem = self._window_problem(data)
        if problem:
            self._counts["musical_windows_invalid"] += 1
            self._skip(body, "invalid", problem, emissions)
            return
        scale = self._scale if self._scale is not None else max(self._running_max, 1.0)
        if self._threshold_log10 is None:
            try:
                self._threshold_log10 = resolve_threshold(
                    "auto", np.asarray(data, dtype=np.float64) / scale,
                    self._wavelength_nm, self._na, self._pixel_size_nm,
                )
            except ValueError as exc:
                self._skip(body, "invalid", f"automatic threshold: {exc}", emissions)
                self._counts["musical_windows_invalid"] += 1
                return
        body.update(threshold_log10=self._threshold_log10, scale_adu=scale)
        job = _WindowJob(
            data=np.ascontiguousarray(data), scale=scale, wavelength_nm=self._wavelength_nm, na=self._na,
            pixel_size_nm=self._pixel_size_nm, subpixels=int(body["subpixels"]),
            threshold_log10=self._threshold_log10, alpha=s.alpha, backend=s.backend, device=s.device,
        )
        if len(self._pending) >= s.max_pending_windows:
            if s.skip_when_busy:
                self._skip(body, "busy", f"{len(self._pending)} windows in flight", emissions)
                return
            while len(self._pending) >= s.max_pending_windows:
                item = self._pending.popleft()
                with contextlib.suppress(Exception):
                    item.future.result()
                self._emit_result(item, emissions)
        future: Future[tuple[np.ndarray, float]]
        if s.workers == 0:
            future = Future()
            try:
                future.set_result(_run_window_job(job))
            except Exception as exc:  # noqa: BLE001 - reported as a failed window
                future.set_exception(exc)
        else:
            future = self._pool().submit(_run_window_job, job)
        self._pending.append(_Pending(future, body, frame.t_acquired))
        if s.workers == 0:
            emissions.extend(self._collect())

    def _window_problem(self, data: np.ndarray) -> str:
        if data.shape[1] < self._window_px or data.shape[2] < self._window_px:
            return f"region {data.shape[1]}×{data.shape[2]} px is smaller than the PSF window ({self._window_px} px)"
        if float(np.ptp(data)) == 0.0:
            return "the region is constant over the window (no fluctuations)"
        return ""

    def _pool(self) -> Executor:
        if self._executor is None:
            s = self._settings
            if s.executor == "thread":
                limit_blas_threads()
                self._executor = ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="musical")
            else:
                self._executor = ProcessPoolExecutor(
                    max_workers=s.workers, mp_context=get_context("spawn"), initializer=_init_worker
                )
        return self._executor

    def _collect(self) -> list[Emission]:
        emissions: list[Emission] = []
        still: deque[_Pending] = deque()
        for item in self._pending:
            if item.future.done():
                self._emit_result(item, emissions)
            else:
                still.append(item)
        self._pending = still
        return emissions

    def _emit_result(self, item: _Pending, emissions: list[Emission]) -> None:
        try:
            image, seconds = item.future.result(timeout=0)
        except Exception as exc:  # noqa: BLE001 - any worker failure is reported, never raised
            self._counts["musical_windows_failed"] += 1
            if "BrokenProcessPool" in type(exc).__name__ and self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            self._skip(item.body, "failed", f"{type(exc).__name__}: {exc}", emissions)
            return
        self._counts["musical_windows_done"] += 1
        body = MusicalBody(**item.body, compute_ms=seconds * 1e3)
        emissions.append(Emission("musical", body, {"image": image}, frame_seq=body.frame_end,
                                  t_acquired=item.t_acquired))

    def _skip(self, body: dict[str, Any], reason: str, detail: str, emissions: list[Emission]) -> None:
        self._counts["musical_windows_skipped"] += 1
        skipped = MusicalSkippedBody(
            particle=body["particle"], kind=body["kind"], frame_start=body["frame_start"],
            frame_end=body["frame_end"], reason=reason, detail=detail,  # type: ignore[arg-type]
            windows_skipped_total=self._counts["musical_windows_skipped"],
        )
        emissions.append(Emission("musical_skipped", skipped, frame_seq=body["frame_end"]))


PLUGIN = StagePlugin(
    name="musical",
    settings_model=MusicalSettings,
    build=MusicalStage,
    topics={"musical": MusicalBody, "musical_skipped": MusicalSkippedBody},
    # Not ("track",): without a tracker the stage still runs full-field windows.
    requires=(),
    runtime_settable=frozenset(
        {"alpha", "threshold", "subpixels", "full_field_subpixels", "skip_when_busy",
         "max_pending_windows", "teardown_timeout_s"}
    ),
    description="MUSICAL super-resolution of track regions and the whole field, in a worker pool.",
)
