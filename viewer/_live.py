"""What a live viewer knows about a running daemon, kept up to date from the event stream.

Qt-free: :class:`LiveState` folds decoded messages into the latest state per layer (camera image,
localizations, tracks, MUSICAL windows, counts, actions) under one lock, and
:class:`EventThread` feeds it from a :class:`~scopestream.daemon.client.Subscriber` on its own
thread. A GUI asks for a :meth:`LiveState.snapshot` when it is ready to draw, so however fast
events arrive, it only ever draws the latest state (coalescing), and nothing queues up.

Coordinates are those of the result tables and of napari: the centre of camera pixel (row 0,
column 0) is (0.0, 0.0); points are ``(y, x)``, tracks ``(track_id, t, y, x)`` with ``t`` the
frame's ``frame_seq``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from scopestream.daemon._messages import Message, WireError
from scopestream.daemon.client import Subscriber

log = logging.getLogger(__name__)

#: Topics a live viewer subscribes to.
TOPICS = ("run_start", "run_stop", "heartbeat", "preview", "localizations", "track", "diffusion",
          "musical", "motion_state", "motion_change", "action", "welcome")

#: Motion states in a fixed order, so a state keeps its colour from run to run.
STATES = ("Stat", "RanW", "RCir", "Circ", "Flow")


class Connection(StrEnum):
    """Where the viewer stands with the daemon."""

    WAITING = "waiting"  # nothing heard yet
    CONNECTED = "connected"  # heard within the last stale_after_s
    LOST = "lost"  # heard before, silent since


@dataclass(frozen=True)
class MusicalWindow:
    """The latest MUSICAL image of one track (or of the full field) and where it sits."""

    key: str
    image: np.ndarray
    particle: int | None
    frame_start: int
    frame_end: int
    x0_px: float
    y0_px: float
    subpixels: int

    @property
    def scale(self) -> tuple[float, float]:
        """napari ``scale`` (rows, columns): one sub-pixel in camera pixels."""
        return (1.0 / self.subpixels, 1.0 / self.subpixels)

    @property
    def translate(self) -> tuple[float, float]:
        """napari ``translate``: sub-pixel (0, 0) is centred at camera (y0 + 0.5/s − 0.5, x0 + 0.5/s − 0.5)."""
        s = self.subpixels
        return (self.y0_px + 0.5 / s - 0.5, self.x0_px + 0.5 / s - 0.5)


@dataclass(frozen=True)
class Snapshot:
    """A consistent copy of the live state; layers that did not change since ``versions`` are None."""

    versions: Mapping[str, int]
    camera: tuple[np.ndarray, int, int] | None = None  # image, bin, frame_seq
    localizations: np.ndarray | None = None  # (N, 2) y, x of the latest frame
    tracks: tuple[np.ndarray, dict[str, np.ndarray], str] | None = None  # data, properties, color_by
    musical: list[MusicalWindow] | None = None
    panel: dict[str, Any] | None = None


@dataclass
class _Counts:
    state: str = "—"
    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    queue_depth_frames: int = 0


@dataclass
class LiveState:
    """The latest state per layer, folded from events (thread-safe).

    Parameters
    ----------
    tail_frames
        Track points older than this many frames before the newest are forgotten.
    max_musical
        MUSICAL windows kept (the most recently updated).
    max_actions
        Actions kept for the panel.
    stale_after_s
        No message for this long: the daemon is taken to be gone (the heartbeat comes every
        ``events.heartbeat_interval_s``; three of them missed by default).
    """

    tail_frames: int = 300
    max_musical: int = 8
    max_actions: int = 20
    stale_after_s: float = 3.0
    run_id: str | None = None
    messages: int = 0
    malformed: int = 0
    lag_s: float = 0.0
    max_lag_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _versions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("camera", "localizations", "tracks", "musical", "panel"), 0))
    _camera: tuple[np.ndarray, int, int] | None = None
    _locs: np.ndarray | None = None
    _track_chunks: deque[tuple[int, np.ndarray]] = field(default_factory=deque)  # (frame, rows of particle, frame, y, x)
    _latest_frame: int = -1
    _D: dict[int, float] = field(default_factory=dict)
    _state_spans: dict[int, list[tuple[int, int, str]]] = field(default_factory=dict)
    _musical: OrderedDict[str, MusicalWindow] = field(default_factory=OrderedDict)
    _counts: _Counts = field(default_factory=_Counts)
    _actions: deque[str] = field(default_factory=deque)
    _first_seen: float | None = None
    _last_heard: float | None = None
    _started: float = field(default_factory=time.monotonic)
    _run_ended: str | None = None

    # -- folding events --------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Fold one message in."""
        now = time.monotonic()
        with self._lock:
            self.messages += 1
            self._last_heard = now
            if self._first_seen is None:
                self._first_seen = now
            self.lag_s = max(0.0, time.time() - msg.header.t_published)
            self.max_lag_s = max(self.max_lag_s, self.lag_s)
            if msg.header.run_id != self.run_id and msg.topic != "welcome":
                self._reset(msg.header.run_id)
            handler = getattr(self, f"_on_{msg.topic}", None)
            if handler is not None:
                handler(msg)

    def _bump(self, *layers: str) -> None:
        for layer in layers:
            self._versions[layer] += 1

    def _reset(self, run_id: str) -> None:
        self.run_id = run_id
        self._camera, self._locs = None, None
        self._track_chunks.clear()
        self._latest_frame = -1
        self._D.clear()
        self._state_spans.clear()
        self._musical.clear()
        self._counts = _Counts()
        self._run_ended = None
        self._bump("camera", "localizations", "tracks", "musical", "panel")

    def _on_run_start(self, msg: Message) -> None:
        interval = (msg.body.get("config", {}).get("events") or {}).get("heartbeat_interval_s")
        if isinstance(interval, int | float) and interval > 0:
            self.stale_after_s = max(self.stale_after_s, 3.0 * float(interval))
        self._counts.state = "running"
        self._bump("panel")

    def _on_heartbeat(self, msg: Message) -> None:
        b = msg.body
        self._counts = _Counts(str(b.get("state", "?")), int(b.get("frames_received", 0)), int(b.get("frames_processed", 0)),
                               int(b.get("frames_dropped", 0)), int(b.get("queue_depth_frames", 0)))
        self._bump("panel")

    def _on_run_stop(self, msg: Message) -> None:
        b = msg.body
        self._counts = _Counts("stopped", int(b.get("frames_received", 0)), int(b.get("frames_processed", 0)),
                               int(b.get("frames_dropped", 0)), 0)
        self._run_ended = f"{b.get('exit_status', '?')}: {b.get('reason', '')}"
        self._bump("panel")

    def _on_preview(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        if image is None or image.ndim != 2:
            self.malformed += 1
            return
        self._camera = (image, int(msg.body.get("bin", 1)), int(msg.body.get("frame_seq", -1)))
        self._bump("camera")

    def _on_localizations(self, msg: Message) -> None:
        x, y = msg.arrays.get("x"), msg.arrays.get("y")
        if x is None or y is None or x.shape != y.shape:
            self.malformed += 1
            return
        self._locs = np.column_stack([y, x]).astype(np.float64)
        self._bump("localizations")

    def _on_track(self, msg: Message) -> None:
        p, x, y = msg.arrays.get("particle"), msg.arrays.get("x"), msg.arrays.get("y")
        frame = msg.header.frame_seq
        if p is None or x is None or y is None or frame is None or not (len(p) == len(x) == len(y)):
            self.malformed += 1
            return
        if len(p):
            rows = np.column_stack([p.astype(np.float64), np.full(len(p), float(frame)), y, x])
            self._track_chunks.append((frame, rows))
        self._latest_frame = max(self._latest_frame, frame)
        oldest = self._latest_frame - self.tail_frames
        while self._track_chunks and self._track_chunks[0][0] < oldest:
            self._track_chunks.popleft()
        self._bump("tracks")

    def _on_diffusion(self, msg: Message) -> None:
        d = msg.body.get("D_um2_per_s")
        if d is not None:
            self._D[int(msg.body["particle"])] = float(d)
            self._bump("tracks")

    def _on_motion_state(self, msg: Message) -> None:
        b = msg.body
        try:
            span = (int(b["frame_start"]), int(b["frame_end"]), str(b["state"]))
            particle = int(b["particle"])
        except (KeyError, TypeError, ValueError):
            self.malformed += 1
            return
        spans = self._state_spans.setdefault(particle, [])
        spans.append(span)
        del spans[:-64]  # the recent past is all a live view shows
        self._bump("tracks")

    _on_motion_change = _on_motion_state

    def _on_musical(self, msg: Message) -> None:
        image = msg.arrays.get("image")
        b = msg.body
        if image is None or image.ndim != 2:
            self.malformed += 1
            return
        particle = b.get("particle")
        key = "full field" if particle is None else f"track {particle}"
        self._musical.pop(key, None)
        self._musical[key] = MusicalWindow(key, image, particle, int(b["frame_start"]), int(b["frame_end"]),
                                           float(b["x0_px"]), float(b["y0_px"]), int(b.get("subpixels", 1)))
        while len(self._musical) > self.max_musical:
            self._musical.popitem(last=False)
        self._bump("musical")

    def _on_action(self, msg: Message) -> None:
        b = msg.body
        what = b.get("action") or b.get("what") or "?"
        who = b.get("requested_by") or b.get("who") or b.get("source") or ""
        result = b.get("result") or ("ok" if b.get("ok", True) else "failed")
        stamp = time.strftime("%H:%M:%S", time.localtime(msg.header.t_published))
        self._actions.appendleft(f"{stamp} {what} {('by ' + str(who)) if who else ''} → {result}".replace("  ", " "))
        while len(self._actions) > self.max_actions:
            self._actions.pop()
        self._bump("panel")

    # -- reading ---------------------------------------------------------------------------

    def connection(self, now: float | None = None) -> tuple[Connection, float]:
        """The connection state and seconds since the last message (or since start while waiting)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._last_heard is None:
                return Connection.WAITING, now - self._started
            silent = now - self._last_heard
            return (Connection.CONNECTED if silent <= self.stale_after_s else Connection.LOST), silent

    def snapshot(self, seen: Mapping[str, int] | None = None) -> Snapshot:
        """Copy the layers whose version differs from ``seen`` (all when None)."""
        seen = seen or {}
        with self._lock:
            changed = {k for k, v in self._versions.items() if seen.get(k) != v}
            out: dict[str, Any] = {"versions": dict(self._versions)}
            if "camera" in changed:
                out["camera"] = self._camera
            if "localizations" in changed:
                out["localizations"] = None if self._locs is None else self._locs.copy()
            if "tracks" in changed:
                out["tracks"] = self._tracks_layer()
            if "musical" in changed:
                out["musical"] = list(self._musical.values())
            if "panel" in changed:
                c = self._counts
                out["panel"] = {
                    "state": c.state, "frames_received": c.frames_received, "frames_processed": c.frames_processed,
                    "frames_dropped": c.frames_dropped, "queue_depth_frames": c.queue_depth_frames,
                    "actions": list(self._actions), "run_id": self.run_id, "run_ended": self._run_ended,
                }
        return Snapshot(**out)

    def _tracks_layer(self) -> tuple[np.ndarray, dict[str, np.ndarray], str] | None:
        if not self._track_chunks:
            return None
        data = np.concatenate([rows for _, rows in self._track_chunks])
        data = data[np.lexsort((data[:, 1], data[:, 0]))]  # napari keeps tracks sorted by (id, t)
        ids = data[:, 0].astype(np.int64)
        D = np.array([self._D.get(int(i), np.nan) for i in ids])
        state = np.full(len(ids), -1.0)
        for k, (pid, t) in enumerate(zip(ids.tolist(), data[:, 1].tolist(), strict=True)):
            for start, end, name in reversed(self._state_spans.get(pid, ())):
                if start <= t <= end:
                    state[k] = STATES.index(name) if name in STATES else len(STATES)
                    break
        props = {"track_id": ids.astype(np.float64), "D_um2_per_s": _fill_nan(D), "state": state}
        color_by = "state" if (state >= 0).any() else ("D_um2_per_s" if np.isfinite(D).any() else "track_id")
        return data, props, color_by

    @property
    def versions(self) -> dict[str, int]:
        with self._lock:
            return dict(self._versions)


def _fill_nan(values: np.ndarray) -> np.ndarray:
    """NaN -> the smallest defined value (napari's colormaps do not take NaN)."""
    finite = np.isfinite(values)
    if finite.all():
        return values
    return np.where(finite, values, float(values[finite].min()) if finite.any() else 0.0)


class EventThread:
    """Receives events on a daemon thread and folds them into a :class:`LiveState`.

    ZeroMQ reconnects by itself when the daemon goes away and comes back on the same endpoint;
    :meth:`LiveState.connection` tells whether messages arrive. ``on_change`` is called (from this
    thread) after each burst of messages; it must be cheap and thread-safe (a GUI posts itself
    one coalesced redraw).
    """

    def __init__(self, endpoint: str, state: LiveState, on_change: Callable[[], None] | None = None,
                 poll_s: float = 0.1, max_burst: int = 500) -> None:
        self.endpoint = endpoint
        self.state = state
        self._on_change = on_change
        self._poll_s = poll_s
        self._max_burst = max_burst
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scopestream-viewer-events", daemon=True)
        self.error: str | None = None
        self.gaps: dict[str, int] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            sub = Subscriber(self.endpoint, topics=TOPICS)
        except Exception as exc:  # noqa: BLE001 - a bad endpoint string: say so in the widget
            self.error = f"cannot connect to {self.endpoint!r}: {exc}"
            return
        try:
            while not self._stop.is_set():
                handled = 0
                timeout: float | None = self._poll_s
                while handled < self._max_burst:
                    try:
                        msg = sub.recv(timeout)
                    except WireError as exc:
                        self.state.malformed += 1
                        log.debug("malformed event: %s", exc)
                        continue
                    if msg is None:
                        break
                    self.state.handle(msg)
                    handled += 1
                    timeout = 0.0  # drain what is already here, then tell the GUI once
                self.gaps = dict(sub.gaps)
                if self._on_change is not None:
                    self._on_change()
        finally:
            sub.close()
