"""The accounting of a run: every frame's fate and every stage error, counted in one place.

One lock guards every count, so a snapshot is consistent: at any moment
``received == processed + dropped + in_flight``. The runner, the pipeline and the sources' callbacks
write here; the status reply, the heartbeat, ``run_stop`` and the Prometheus metrics (a collector
that reads a snapshot at scrape time) all read from here, so they cannot disagree.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

DROP_REASONS = ("camera_gap", "camera_overflow", "bus_full", "source_error")


@dataclass(frozen=True, slots=True)
class Counts:
    """A consistent snapshot of the accounting.

    Attributes
    ----------
    received
        Frames known to the daemon: delivered by the source, or known lost in the camera.
    processed
        Frames that went through every stage (a stage error still counts as processed).
    dropped_by_reason
        Frames lost, by where (``camera_gap``, ``camera_overflow``, ``bus_full``).
    stage_errors
        Failures per stage (a frame it raised on, a settings change it refused, an emission
        that could not be published).
    frame_rate_hz
        The rate at which the source delivers frames (moving average; 0 when none came for 2 s).
    """

    received: int
    processed: int
    dropped_by_reason: Mapping[str, int]
    stage_errors: Mapping[str, int]
    frame_rate_hz: float

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    @property
    def in_flight(self) -> int:
        """Frames received but neither processed nor dropped yet (on the bus or in a stage)."""
        return self.received - self.processed - self.dropped


@dataclass(frozen=True, slots=True)
class DropReport:
    """Frames dropped for one reason since the last report (for a ``dropped_frames`` event)."""

    reason: str
    count: int
    camera_image_number: int | None
    dropped_total: int


class Accounting:
    """The counts of one run, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received = 0
        self._processed = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._stage_errors: dict[str, int] = {}
        self._pending_drops: dict[str, int] = {}
        self._pending_image_number: dict[str, int | None] = {}
        self._rate_hz = 0.0
        self._t_last_frame: float | None = None

    def receive(self, count: int = 1, delivered: bool = True) -> int:
        """Count ``count`` frames as received; returns the sequence number of the first.

        Frames lost inside the camera (``delivered=False``) keep their place in the numbering.
        """
        with self._lock:
            first = self._received
            self._received += count
            if delivered:
                now = time.perf_counter()
                if self._t_last_frame is not None:
                    dt = now - self._t_last_frame
                    if dt > 0:
                        self._rate_hz = 0.95 * self._rate_hz + 0.05 / dt if self._rate_hz else 1.0 / dt
                self._t_last_frame = now
            return first

    def processed(self) -> None:
        """One more frame went through every stage."""
        with self._lock:
            self._processed += 1

    def dropped(self, reason: str, count: int, camera_image_number: int | None = None) -> None:
        """``count`` frames lost for ``reason`` (one of :data:`DROP_REASONS`)."""
        if reason not in self._dropped:
            raise ValueError(f"unknown drop reason {reason!r}; reasons are {list(DROP_REASONS)}")
        with self._lock:
            self._dropped[reason] += count
            if reason not in self._pending_drops:
                self._pending_image_number[reason] = camera_image_number
            self._pending_drops[reason] = self._pending_drops.get(reason, 0) + count

    def stage_error(self, stage: str) -> int:
        """Count one failure of ``stage``; returns its total so far."""
        with self._lock:
            n = self._stage_errors[stage] = self._stage_errors.get(stage, 0) + 1
            return n

    def take_drop_report(self) -> DropReport | None:
        """The oldest reason with drops not yet reported, and forget them (None if none)."""
        with self._lock:
            if not self._pending_drops:
                return None
            reason = next(iter(self._pending_drops))
            count = self._pending_drops.pop(reason)
            number = self._pending_image_number.pop(reason, None)
            return DropReport(reason, count, number, sum(self._dropped.values()))

    def snapshot(self) -> Counts:
        with self._lock:
            stale = self._t_last_frame is None or time.perf_counter() - self._t_last_frame > 2.0
            return Counts(
                received=self._received,
                processed=self._processed,
                dropped_by_reason=dict(self._dropped),
                stage_errors=dict(self._stage_errors),
                frame_rate_hz=0.0 if stale else self._rate_hz,
            )
