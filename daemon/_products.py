"""Typed products: what the stages of one frame hand to each other.

A stage stores what it found for a frame with ``products.put(obj)``; a later stage of the same frame
reads it with ``products.get(Localizations)`` (``None`` when no earlier stage produced one). The
store is keyed by the product's type, so a reader gets exactly that type (mypy sees it too), and the
pipeline can check, when it is built, that every type a stage consumes is produced by a stage
before it (:attr:`scopestream.daemon.StagePlugin.consumes` / ``produces``).

Products are frozen. Their arrays belong to the producer and must not be modified by readers;
a reader that needs to change one takes a copy. Positions are in pixels, x the column and y the
row, the centre of pixel (row 0, column 0) at (0.0, 0.0).

The store lives for one frame: the pipeline clears it before the next. Results of off-thread work
(a MUSICAL image computed in a worker) arrive later and are published, not stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

__all__ = [
    "LOCALIZATION_COLUMNS",
    "MOTION_STATES",
    "DiffusionEstimates",
    "DiffusionUpdate",
    "FrameStatistics",
    "Localizations",
    "MotionStates",
    "MusicalImage",
    "Products",
    "TrackUpdate",
    "TrackWindow",
    "TrackWindows",
]

P = TypeVar("P")

LOCALIZATION_COLUMNS = ("x", "y", "photons", "background", "sigma", "uncertainty_px")
"""The columns of :class:`Localizations` that make the ``localizations`` table."""

MOTION_STATES = ("Stat", "RanW", "RCir", "Circ", "Flow")
"""The motion states of the simulators and the motion-state model, in their fixed order."""


def _empty_f64() -> np.ndarray:
    return np.empty(0, dtype=np.float64)


def _empty_i64() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class FrameStatistics:
    """Statistics of one frame, in ADU as the camera reports them (produced by ``frame_stats``).

    Attributes
    ----------
    frame_seq
        The frame's daemon sequence number.
    camera_image_number
        The camera's own frame counter, if any.
    height_px, width_px
        Image rows and columns.
    mean_adu, max_adu, min_adu
        Mean, largest and smallest finite pixel value, ADU.
    background_adu
        Background estimate (a low percentile of the pixel values), ADU.
    saturated_fraction
        Fraction of pixels at or above ``camera.saturation_adu``.
    nonfinite_fraction
        Fraction of pixels that are NaN or infinite (float frames only).
    sharpness
        Brenner focus measure (mean squared difference of pixels two columns apart), ADU².
    """

    frame_seq: int
    camera_image_number: int | None
    height_px: int
    width_px: int
    mean_adu: float
    max_adu: float
    min_adu: float
    background_adu: float
    saturated_fraction: float
    nonfinite_fraction: float
    sharpness: float = 0.0


@dataclass(frozen=True)
class Localizations:
    """The localizations of one frame (produced by ``localize``).

    Attributes
    ----------
    frame_seq
        The frame's daemon sequence number.
    x, y
        Position, px (x = column, y = row; centre of pixel (0, 0) is (0.0, 0.0)).
    photons
        Detected photons of the spot.
    background
        Background, photons per pixel.
    sigma
        PSF standard deviation, px (fitted or fixed).
    uncertainty_px
        Mortensen et al. (2010) localization uncertainty (one coordinate, standard deviation), px.
    diagnostics
        Counts and scales of the detection (``candidates``, ``rejected_saturated``, ...).
    """

    frame_seq: int
    x: np.ndarray
    y: np.ndarray
    photons: np.ndarray
    background: np.ndarray
    sigma: np.ndarray
    uncertainty_px: np.ndarray
    diagnostics: Mapping[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The table columns (:data:`LOCALIZATION_COLUMNS`) as a dict of 1-D float64 arrays."""
        return {name: getattr(self, name) for name in LOCALIZATION_COLUMNS}

    @classmethod
    def empty(cls, frame_seq: int) -> Localizations:
        """No localizations."""
        e = _empty_f64()
        return cls(frame_seq, e, e, e, e, e, e)


@dataclass(frozen=True)
class TrackUpdate:
    """The tracks of one frame (produced by ``track``).

    Attributes
    ----------
    frame_seq
        The frame's daemon sequence number.
    particle
        Ids of the tracks that have a detection in this frame (int64, ascending).
    x, y
        The detections' positions, px.
    started, ended
        Ids that started / ended in this frame.
    uncertainty_px
        The detections' localization uncertainty, px.
    detection_index
        For each entry, its index in this frame's :class:`Localizations`.
    """

    frame_seq: int
    particle: np.ndarray
    x: np.ndarray
    y: np.ndarray
    started: list[int]
    ended: list[int]
    uncertainty_px: np.ndarray = field(default_factory=_empty_f64)
    detection_index: np.ndarray = field(default_factory=_empty_i64)

    def __len__(self) -> int:
        return int(self.particle.shape[0])


@dataclass(frozen=True)
class DiffusionEstimates:
    """Estimates completed in one frame (in the :class:`DiffusionUpdate` that ``diffusion`` produces), one element per estimate.

    Attributes
    ----------
    particle, frame_start, frame_end, n_steps
        int64 arrays.
    D_um2_per_s, D_err_um2_per_s, D_crlb_um2_per_s, sigma_loc_nm
        float64 arrays, NaN where undefined (D is always defined).
    method
        uint8 codes into :data:`~scopestream.plugins._diffusion_mle.METHOD_LABELS`.
    window
        uint8 codes into :data:`scopestream.plugins.diffusion.WINDOW_LABELS`.
    """

    particle: np.ndarray
    frame_start: np.ndarray
    frame_end: np.ndarray
    n_steps: np.ndarray
    D_um2_per_s: np.ndarray
    D_err_um2_per_s: np.ndarray
    D_crlb_um2_per_s: np.ndarray
    sigma_loc_nm: np.ndarray
    method: np.ndarray
    window: np.ndarray

    def __len__(self) -> int:
        return int(self.particle.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The wire arrays (field name -> array)."""
        return {name: getattr(self, name) for name in ESTIMATE_FIELDS}

    @classmethod
    def concatenate(cls, parts: Sequence[DiffusionEstimates]) -> DiffusionEstimates:
        """All rows of several estimates."""
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in ESTIMATE_FIELDS})


ESTIMATE_FIELDS = (
    "particle", "frame_start", "frame_end", "n_steps", "D_um2_per_s", "D_err_um2_per_s", "D_crlb_um2_per_s",
    "sigma_loc_nm", "method", "window",
)



@dataclass(frozen=True)
class DiffusionUpdate:
    """All diffusion estimates that became due in one frame (what ``diffusion`` stores).

    Attributes
    ----------
    frame_seq
        The frame's daemon sequence number.
    estimates
        Rolling and/or whole-track estimates; empty when none was due.
    """

    frame_seq: int
    estimates: tuple[DiffusionEstimates, ...] = ()  # at most one: the rows completed in the frame


@dataclass(frozen=True)
class TrackWindow:
    """The pixels of one track's region over a window of frames.

    Attributes
    ----------
    particle
        Track id.
    frame_start, frame_end
        First and last frame (``Frame.seq``) of the window, inclusive.
    y0_px, x0_px
        Row and column of the region's first pixel in the camera frame.
    pixels
        float32, ``(K, h, w)``: the region in each of the window's K frames, camera values (ADU).
    positions_px
        float64, ``(K, 2)``: the track's ``(x, y)`` in camera pixels in each frame, NaN where the
        track had no detection.
    """

    particle: int
    frame_start: int
    frame_end: int
    y0_px: int
    x0_px: int
    pixels: np.ndarray
    positions_px: np.ndarray

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.positions_px.shape != (self.pixels.shape[0], 2):
            raise ValueError(
                f"track window of particle {self.particle}: pixels must be (K, h, w) and positions (K, 2), "
                f"got {self.pixels.shape} and {self.positions_px.shape}"
            )


@dataclass(frozen=True)
class TrackWindows:
    """The track windows completed in one frame (possibly none).

    Attributes
    ----------
    frame_seq
        The frame in which they completed.
    windows
        One :class:`TrackWindow` per completed window.
    """

    frame_seq: int
    windows: tuple[TrackWindow, ...] = ()

    def __len__(self) -> int:
        return len(self.windows)


@dataclass(frozen=True)
class MusicalImage:
    """A MUSICAL image of a track's region or of the whole field.

    Sub-pixel ``(Y, X)`` is centred at camera coordinates
    ``x = x0_px + (X + 0.5) / subpixels - 0.5``, ``y = y0_px + (Y + 0.5) / subpixels - 0.5`` px.

    Attributes
    ----------
    particle
        Track id, or None for a full-field image.
    frame_start, frame_end
        The window's first and last frame, inclusive.
    y0_px, x0_px
        Row and column of the region's first pixel in the camera frame.
    subpixels
        Image sub-pixels per camera pixel along each axis.
    image
        float32, ``(h * subpixels, w * subpixels)``.
    """

    particle: int | None
    frame_start: int
    frame_end: int
    y0_px: int
    x0_px: int
    subpixels: int
    image: np.ndarray


@dataclass(frozen=True)
class MotionStates:
    """Motion-state probabilities of track segments (the motion-state stage).

    Attributes
    ----------
    particle, frame_start, frame_end
        int64 arrays, one element per segment.
    probabilities
        float64, ``(n, len(states))``: each row sums to 1.
    states
        The state names, in the columns' order (default :data:`MOTION_STATES`).
    model_version
        Which model gave them.
    """

    particle: np.ndarray
    frame_start: np.ndarray
    frame_end: np.ndarray
    probabilities: np.ndarray
    states: tuple[str, ...] = MOTION_STATES
    model_version: str = ""

    def __post_init__(self) -> None:
        n = self.particle.shape[0]
        if self.probabilities.shape != (n, len(self.states)):
            raise ValueError(
                f"motion states: probabilities must be ({n}, {len(self.states)}), got {self.probabilities.shape}"
            )

    def __len__(self) -> int:
        return int(self.particle.shape[0])

    def most_likely(self) -> list[str]:
        """The most probable state of each segment."""
        return [self.states[i] for i in np.argmax(self.probabilities, axis=1)] if len(self) else []


class Products:
    """What the stages of one frame have produced, keyed by type.

    Examples
    --------
    >>> products = Products()
    >>> products.put(Localizations.empty(3))
    >>> products.get(Localizations).frame_seq
    3
    >>> products.get(TrackUpdate) is None
    True
    """

    __slots__ = ("_items",)

    def __init__(self, *items: object) -> None:
        self._items: dict[type, object] = {}
        for item in items:
            self.put(item)

    def put(self, product: object) -> None:
        """Store ``product`` under its own type (replacing one of that type already stored)."""
        if isinstance(product, type):
            raise TypeError(f"put takes a product instance, not the type {product.__name__}")
        self._items[type(product)] = product

    def get(self, kind: type[P]) -> P | None:
        """The product of type ``kind`` stored for this frame, or None."""
        item = self._items.get(kind)
        return item if isinstance(item, kind) else None

    def require(self, kind: type[P], stage: str) -> P:
        """The product of type ``kind``; a ValueError naming ``stage`` and the type when absent."""
        item = self.get(kind)
        if item is None:
            raise ValueError(f"stage {stage!r} needs {kind.__name__}, which no earlier stage produced for this frame")
        return item

    def __contains__(self, kind: object) -> bool:
        return kind in self._items

    def __len__(self) -> int:
        return len(self._items)

    def types(self) -> list[type]:
        """The types stored, in the order they were first stored."""
        return list(self._items)

    def clear(self) -> None:
        """Forget everything (the pipeline calls this between frames)."""
        self._items.clear()
