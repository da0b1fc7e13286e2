"""MUSICAL super-resolution (Agarwal & Macháň 2016): batch functions and the live ``musical`` stage.

Batch use::

    from scopestream.plugins.musical import musical_image, musical_windows
    result = musical_image(stack, wavelength_nm=510, na=1.49, pixel_size_nm=65)   # whole stack
    results = musical_windows(stack, window_frames=200, slide_frames=50, ...)     # sliding windows

The algorithm is the one in ``SCIENCE.md``, computed by the vectorized kernel in
:mod:`scopestream.plugins._musical_core`. At the image border it follows MusiJ by default (only
windows wholly inside the image); ``edge="partial_windows"`` follows the MATLAB implementation and
its ports (napari-superres), which also average the windows cut at the edge. The stack is divided by one fixed
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

import functools
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import Products, TrackUpdate, TrackWindow, TrackWindows
from scopestream.daemon._stage import Emission, RunContext, StagePlugin
from scopestream.plugins._musical_core import (
    MIN_WINDOW_FRAMES,
    Backend,
    EdgeRule,
    ProjectionDtype,
    auto_threshold,
    musical_canvas,
    musical_geometry,
    singular_values,
    validate_stack,
    window_size_px,
)

if TYPE_CHECKING:
    from scopestream.daemon._stage import Offload

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
    edge: EdgeRule = "full_windows",
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
    edge
        Border rule. ``"full_windows"``: only windows wholly inside the image (as MusiJ).
        ``"partial_windows"``: also the windows cut at the image edge, averaged in (as the MATLAB
        implementation and its ports such as napari-superres; they then crop ``(N_w − 1)/2`` px
        for display, which is not done here). Pixels ``≥ N_w − 1`` px from the edge are the same
        under both rules. See :mod:`scopestream.plugins._musical_core`.

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
    image = musical_canvas(normalized, geometry, thr, alpha, backend=backend, device=device, dtype=dtype,
                           edge=edge)
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
    edge: EdgeRule = "full_windows",
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
    wavelength_nm, na, pixel_size_nm, subpixels, threshold, alpha, backend, device, dtype, edge
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
        image = musical_canvas(window, geometry, thr, alpha, backend=backend, device=device, dtype=dtype,
                               edge=edge)
        results.append(MusicalResult(image, start, start + k - 1, thr, scale, geometry.window_px, geometry.subpixels))
    return results


# -- the live stage: settings and messages ------------------------------------------------------


class MusicalSettings(BaseModel):
    """Settings of the ``musical`` stage (section ``musical.*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    wavelength_nm: float | None = Field(None, ge=100, le=20_000, description="Emission wavelength, nm; None: optics.wavelength_nm.")
    na: float | None = Field(None, gt=0, le=1.7, description="Numerical aperture; None: optics.na.")
    pixel_size_nm: float | None = Field(None, gt=0, le=100_000, description="Sample-plane pixel size, nm; None: optics.pixel_size_nm.")
    window_frames: int = Field(
        200, ge=MIN_WINDOW_FRAMES, le=100_000,
        description="K: frames per MUSICAL window (200 as in Sekh et al.; 50 for finer time resolution).",
    )
    slide_frames: int = Field(200, ge=1, le=100_000, description="Frames between the starts of successive windows of one track.")
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
        None, gt=0, le=1e12,
        description="Fixed scale the data are divided by, ADU; None: the maximum pixel value of the run's first window_frames frames (whole field), then fixed.",
    )
    full_field_every_frames: int = Field(
        0, ge=0, le=10_000_000, description="Start a MUSICAL window of the whole field every this many frames (0: off). Must be 0 or ≥ window_frames.",
    )
    full_field_subpixels: int = Field(4, ge=1, le=64, description="Sub-pixels per pixel of the full-field image (its cost grows with the square).")
    max_pending_windows: int = Field(4, ge=1, le=1024, description="This stage's windows in the off-thread service (offload.*) and not yet published, at most; beyond it (or offload.max_in_flight_jobs) windows are skipped (or waited for).")
    skip_when_busy: bool = Field(True, description="True: skip and count a window when the off-thread service is busy (live). False: wait (replay; nothing lost).")
    max_tracks: int = Field(32, ge=0, le=4096, description="Tracks buffered at once; later tracks get no MUSICAL until a slot frees (counted).")
    backend: Literal["numpy", "torch"] = Field("numpy", description="Kernel backend for the projections.")
    device: str = Field("cpu", pattern=r"^(cpu|cuda|mps|xpu)(:[0-9]{1,3})?$", description="Torch device for backend 'torch' ('cpu', 'cuda', 'cuda:1').")
    edge: EdgeRule = Field(
        "full_windows", description="Border rule: 'full_windows' (windows wholly inside the region, as MusiJ) or 'partial_windows' (also the windows cut at the region's edge, as the MATLAB-derived ports; same values inside).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MusicalSettings:
        if 0 < self.full_field_every_frames < self.window_frames:
            raise ValueError(
                f"full_field_every_frames ({self.full_field_every_frames}) must be 0 (off) or at least "
                f"window_frames ({self.window_frames}): one full-field window is collected at a time"
            )
        return self

    @model_validator(mode="after")
    def _region_holds_the_psf_window(self, info: ValidationInfo) -> MusicalSettings:
        # The configuration validates stage settings with its optics section as context, so
        # `config --check` catches what the stage would refuse when it is built.
        optics = (info.context or {}).get("optics")
        if optics is None:
            return self
        wavelength_nm = self.wavelength_nm or optics.wavelength_nm
        na = self.na or optics.na
        pixel_size_nm = self.pixel_size_nm or optics.pixel_size_nm
        window_px = window_size_px(wavelength_nm, na, pixel_size_nm)
        if self.region_px < window_px:
            raise ValueError(
                f"region_px ({self.region_px}) is smaller than the MUSICAL PSF window "
                f"({window_px} px for λ={wavelength_nm} nm, NA={na}, pixel {pixel_size_nm} nm); "
                f"use at least {window_px}"
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
    reason: Literal["busy", "invalid", "failed", "lost", "teardown"] = Field(
        description="busy: the off-thread service had no room (max_pending_windows or offload.max_in_flight_jobs in flight); invalid: data unusable (constant region, region smaller than the PSF window); failed: the computation raised; lost: the worker computing it died; teardown: still pending when the run ended.",
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
    edge: EdgeRule = "full_windows"


def _run_window_job(job: _WindowJob) -> tuple[np.ndarray, float]:
    """Compute one window (in an off-thread worker); returns the image (float32) and the compute
    time (s)."""
    t0 = time.perf_counter()
    geometry = musical_geometry(job.wavelength_nm, job.na, job.pixel_size_nm, job.subpixels)
    normalized = job.data.astype(np.float64) / job.scale
    image = musical_canvas(
        normalized, geometry, job.threshold_log10, job.alpha, backend=job.backend, device=job.device,
        edge=job.edge,
    )
    return image.astype(np.float32), time.perf_counter() - t0


# -- the live stage ------------------------------------------------------------------------------

OWNER = "musical"


class MusicalStage:
    """Live MUSICAL: per-track windows, a periodic full-field window, off the camera path.

    Per track (needs the tracker's TrackUpdate: ``frame_seq, particle, x, y, started, ended``):
    when a track first appears, a capture box of ``region_px + 2·margin`` pixels is placed centred
    on it, and every frame while the track is open its box is cropped into the track's ring
    buffer of ``window_frames`` frames (with the track's position, NaN in frames without a
    detection). Once ``window_frames`` frames are buffered, and then every ``slide_frames`` frames,
    the window is cut: a ``region_px`` square centred on the mean of the track's positions in the
    window (moved inside the box where needed). The windows cut in a frame become the
    :class:`TrackWindows` product for later stages, and each goes to the engine's off-thread
    service (``context.offload``) as one MUSICAL job. A track that leaves the middle of its box
    gets a new box (partial window dropped, counted in ``musical_track_reanchors``). When
    ``ended`` names the track, or it has no detection for ``window_frames`` frames, its buffer is
    freed (a partial window is dropped).

    Without a tracker only full-field windows run: when ``full_field_every_frames > 0``, every
    that many frames the next ``window_frames`` whole frames are collected and sent as one window
    (at ``full_field_subpixels``).

    All windows share one normalization (``normalization_adu``, or the maximum of the run's first
    ``window_frames`` frames) and one threshold (a number, or ``"auto"`` resolved on the first
    window), so that images of successive windows compare.

    The service bounds the work in flight (``max_pending_windows`` for this stage, and
    ``offload.max_in_flight_jobs`` for all); a window it cannot take is skipped and counted (event
    ``musical_skipped``, reason ``busy``), or, with ``skip_when_busy=False``, waited for. Images are
    published from the service's callbacks on the engine's housekeeping tick (also while paused or
    when no frames arrive); windows whose computation raised, whose worker died, or that were
    still running when the run ended are published as ``musical_skipped`` (``failed``, ``lost``,
    ``teardown``). ``process`` only copies crops and submits.

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
        self._offload: Offload | None = None
        # Counters are written by the stage thread and by the service's callbacks (housekeeping).
        self._counts_lock = threading.Lock()
        self._counts = {
            "musical_windows_done": 0,
            "musical_windows_skipped": 0,
            "musical_windows_busy": 0,
            "musical_windows_invalid": 0,
            "musical_windows_failed": 0,
            "musical_windows_lost": 0,
            "musical_track_reanchors": 0,
            "musical_tracks_not_buffered": 0,
        }
        self._configure(settings)

    def setup(self, context: RunContext) -> None:
        """Take the run's off-thread service, ``context.offload``."""
        self._offload = context.offload

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
                "threshold", "backend", "device", "edge"}
        structural = {k for k in type(settings).model_fields if k not in keep}
        if any(getattr(old, k) != getattr(settings, k) for k in structural):
            self._configure(settings)
            return
        self._settings = settings
        if settings.threshold != old.threshold:
            self._threshold_log10 = None if settings.threshold == "auto" else float(settings.threshold)

    def counters(self) -> Mapping[str, int]:
        """Running totals: windows done / skipped (any reason) / busy / invalid / failed / lost,
        re-anchors, tracks not buffered."""
        with self._counts_lock:
            return dict(self._counts)

    def _add(self, name: str, n: int = 1) -> int:
        with self._counts_lock:
            self._counts[name] += n
            return self._counts[name]

    # frames ---------------------------------------------------------------------------------

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Buffer this frame's crops, cut complete windows (product :class:`TrackWindows`) and
        submit them; returns skip events (images come from the service's callbacks)."""
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
        emissions: list[Emission] = []
        if self._scale is None:
            self._running_max = max(self._running_max, float(image.max()))
            if self._frames_seen + 1 >= self._settings.window_frames:
                self._scale = self._running_max if self._running_max > 0 else 1.0
        track = products.get(TrackUpdate)
        if track is not None and self._ring is not None:
            windows = self._ingest_track(frame, image, track)
            if windows is not None:
                products.put(windows)
                for window in windows.windows:
                    self._submit_track_window(window, frame, emissions)
        if self._settings.full_field_every_frames > 0:
            self._ingest_full_field(frame, image, emissions)
        self._frames_seen += 1
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

    def _ingest_track(self, frame: Frame, image: np.ndarray, track: Any) -> TrackWindows | None:
        """Buffer the frame for every open track; the windows completed in this frame, or None."""
        s = self._settings
        particle = np.asarray(track.particle, dtype=np.int64).reshape(-1)
        xs = np.asarray(track.x, dtype=np.float64).reshape(-1)
        ys = np.asarray(track.y, dtype=np.float64).reshape(-1)
        if not (particle.shape == xs.shape == ys.shape):
            raise ValueError(
                f"frame {frame.seq}: the track update has {particle.size} ids but {xs.size} x and {ys.size} y"
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
                self._add("musical_tracks_not_buffered")
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
                self._add("musical_track_reanchors")
                self._place_box(int(slots[i]), float(xs[i]), float(ys[i]))
            self._last_seen[slots] = frame.seq
        active = np.flatnonzero(self._particle >= 0)
        if active.size == 0:
            return None
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
        windows = self._cut_windows(ready, frame.seq) if ready.size else None
        self._next_window[ready] += s.slide_frames
        stale = active[frame.seq - self._last_seen[active] > k]
        for slot in stale.tolist():
            self._free(int(self._particle[slot]))
        return windows

    def _free(self, pid: int) -> None:
        slot = self._slot_of.pop(pid, None)
        if slot is not None:
            self._particle[slot] = -1
            self._count[slot] = 0

    def _cut_windows(self, ready: np.ndarray, frame_seq: int) -> TrackWindows:
        """Cut the region of each ready slot's window out of its box (product for later stages)."""
        k = self._settings.window_frames
        rh, rw = self._region_h, self._region_w
        windows: list[TrackWindow] = []
        assert self._ring is not None
        for slot in ready.tolist():
            order = (self._count[slot] - k + np.arange(k)) % k
            pos = self._pos[slot, order]  # (y, x)
            finite = np.isfinite(pos[:, 0])
            by0, bx0 = int(self._box_y0[slot]), int(self._box_x0[slot])
            if finite.any():
                cy, cx = float(pos[finite, 0].mean()), float(pos[finite, 1].mean())
            else:
                cy, cx = by0 + (self._box_h - 1) / 2, bx0 + (self._box_w - 1) / 2
            ry0, rx0 = self._region_origin(np.array([cx]), np.array([cy]))
            y0 = int(np.clip(ry0[0], by0, by0 + self._box_h - rh))
            x0 = int(np.clip(rx0[0], bx0, bx0 + self._box_w - rw))
            ly, lx = y0 - by0, x0 - bx0
            seqs = self._seq[slot, order]
            windows.append(TrackWindow(
                particle=int(self._particle[slot]), frame_start=int(seqs[0]), frame_end=int(seqs[-1]),
                y0_px=y0, x0_px=x0, pixels=self._ring[slot, order, ly : ly + rh, lx : lx + rw],
                positions_px=np.ascontiguousarray(pos[:, ::-1]),  # ring keeps (y, x); products (x, y)
            ))
        return TrackWindows(frame_seq, tuple(windows))

    def _submit_track_window(self, window: TrackWindow, frame: Frame, emissions: list[Emission]) -> None:
        y0, x0 = window.y0_px, window.x0_px
        rh, rw = window.pixels.shape[1:]
        xy = window.positions_px
        finite = np.isfinite(xy[:, 0])
        if finite.any():
            cx, cy = float(xy[finite, 0].mean()), float(xy[finite, 1].mean())
        else:
            cx, cy = x0 + (rw - 1) / 2, y0 + (rh - 1) / 2
        p = xy[finite]
        fits = bool(np.all((p[:, 1] >= y0 - 0.5) & (p[:, 1] < y0 + rh - 0.5)
                           & (p[:, 0] >= x0 - 0.5) & (p[:, 0] < x0 + rw - 0.5)))
        body = self._body_base("track", window.particle, window.frame_start, window.frame_end,
                               window.pixels.shape[0], x0, y0, rw, rh, self._settings.subpixels)
        body.update(centre_x_px=cx, centre_y_px=cy, path_fits=fits)
        self._submit(window.pixels, body, frame, emissions)

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
            self._add("musical_windows_invalid")
            emissions.extend(self._skip(body, "invalid", problem))
            return
        scale = self._scale if self._scale is not None else max(self._running_max, 1.0)
        if self._threshold_log10 is None:
            try:
                self._threshold_log10 = resolve_threshold(
                    "auto", np.asarray(data, dtype=np.float64) / scale,
                    self._wavelength_nm, self._na, self._pixel_size_nm,
                )
            except ValueError as exc:
                self._add("musical_windows_invalid")
                emissions.extend(self._skip(body, "invalid", f"automatic threshold: {exc}"))
                return
        body.update(threshold_log10=self._threshold_log10, scale_adu=scale)
        job = _WindowJob(
            data=np.ascontiguousarray(data), scale=scale, wavelength_nm=self._wavelength_nm, na=self._na,
            pixel_size_nm=self._pixel_size_nm, subpixels=int(body["subpixels"]),
            threshold_log10=self._threshold_log10, alpha=s.alpha, backend=s.backend, device=s.device,
            edge=s.edge,
        )
        if self._offload is None:
            raise RuntimeError("the musical stage has no off-thread service: setup(context) was not called")
        t_acquired = frame.t_acquired
        accepted = self._offload.submit(
            OWNER, _run_window_job, job,
            on_done=functools.partial(self._on_image, body, t_acquired),
            on_fail=functools.partial(self._on_fail, body),
            max_in_flight=s.max_pending_windows, block=not s.skip_when_busy,
        )
        if not accepted:
            self._add("musical_windows_busy")
            in_flight = self._offload.in_flight(OWNER)
            reason = "the run is ending" if self._offload.closed else f"{in_flight} of this stage's windows in flight"
            emissions.extend(self._skip(body, "busy", reason))

    def _window_problem(self, data: np.ndarray) -> str:
        if data.shape[1] < self._window_px or data.shape[2] < self._window_px:
            return f"region {data.shape[1]}×{data.shape[2]} px is smaller than the PSF window ({self._window_px} px)"
        if float(np.ptp(data)) == 0.0:
            return "the region is constant over the window (no fluctuations)"
        return ""

    # callbacks of the off-thread service (housekeeping thread: no stage state but the counters)

    def _on_image(self, body: dict[str, Any], t_acquired: float, result: tuple[np.ndarray, float]) -> list[Emission]:
        image, seconds = result
        self._add("musical_windows_done")
        message = MusicalBody(**body, compute_ms=seconds * 1e3)
        return [Emission("musical", message, {"image": image}, frame_seq=message.frame_end, t_acquired=t_acquired)]

    def _on_fail(self, body: dict[str, Any], reason: str, detail: str) -> list[Emission]:
        if reason in ("failed", "lost"):
            self._add(f"musical_windows_{reason}")
        return self._skip(body, reason, detail)

    def _skip(self, body: dict[str, Any], reason: str, detail: str) -> list[Emission]:
        total = self._add("musical_windows_skipped")
        skipped = MusicalSkippedBody(
            particle=body["particle"], kind=body["kind"], frame_start=body["frame_start"],
            frame_end=body["frame_end"], reason=reason, detail=detail,  # type: ignore[arg-type]
            windows_skipped_total=total,
        )
        return [Emission("musical_skipped", skipped, frame_seq=body["frame_end"])]


PLUGIN = StagePlugin(
    name="musical",
    settings_model=MusicalSettings,
    build=MusicalStage,
    topics={"musical": MusicalBody, "musical_skipped": MusicalSkippedBody},
    # Not consumes: without a tracker the stage still runs full-field windows.
    consumes_if_present=(TrackUpdate,),
    produces=(TrackWindows,),
    runtime_settable=frozenset(
        {"alpha", "threshold", "subpixels", "full_field_subpixels", "skip_when_busy",
         "max_pending_windows", "edge"}
    ),
    description="MUSICAL super-resolution of track regions and the whole field, through the engine's off-thread service.",
)
