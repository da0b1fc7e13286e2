"""The napari dock widget: a running daemon's live analysis on the live image, and its controls.

Events are received on a thread (:class:`~scopestream.viewer._live.EventThread`) and folded into
the latest state per layer; the thread posts at most one redraw request to the GUI at a time
(a Qt signal guarded by a flag), and the redraw copies only the layers whose version changed. So
napari's event loop never waits for the network and never falls behind: however fast events come,
it draws the newest state at most ``max_redraw_hz`` times a second. Control requests (pause,
resume, stop, exposure) go through the control channel on a worker thread, so a daemon that does
not answer does not freeze the viewer either.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from scopestream.daemon.client import ControlClient, ControlError
from scopestream.viewer._live import Connection, EventThread, LiveState, Snapshot

if TYPE_CHECKING:
    import napari

DEFAULT_EVENTS = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"

CAMERA = "scopestream camera"
LOCALIZATIONS = "scopestream localizations"
TRACKS = "scopestream tracks"
MUSICAL_PREFIX = "MUSICAL "


class LiveWidget(QWidget):
    """Connects to a running scopestream daemon and shows its analysis in napari.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it).
    events_endpoint, control_endpoint
        The daemon's ``events.endpoint`` and ``control.endpoint`` (defaults: the daemon's).
    connect
        Connect at once.
    max_redraw_hz
        Redraw the layers at most this often.
    """

    _changed = Signal()
    _replied = Signal(str, str)

    def __init__(self, napari_viewer: napari.Viewer, events_endpoint: str = DEFAULT_EVENTS,
                 control_endpoint: str = DEFAULT_CONTROL, connect: bool = False, max_redraw_hz: float = 20.0) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.max_redraw_hz = max_redraw_hz
        self.state: LiveState | None = None
        self._thread: EventThread | None = None
        self._seen: dict[str, int] = {}
        self._pending = threading.Event()
        self._last_redraw = 0.0
        self.redraws = 0
        self.redraw_requests = 0
        self._musical_layers: set[str] = set()
        self._control = ThreadPoolExecutor(1, thread_name_prefix="scopestream-viewer-control")
        self.last_reply = ""

        self.events_edit = QLineEdit(events_endpoint)
        self.control_edit = QLineEdit(control_endpoint)
        self.connect_button = QPushButton("Connect")
        self.connect_button.clicked.connect(self._toggle_connection)
        self.status_label = QLabel("not connected")
        self.status_label.setWordWrap(True)
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        self.actions_list = QListWidget()
        self.actions_list.setMaximumHeight(120)
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.stop_button = QPushButton("Stop")
        self.exposure_spin = QDoubleSpinBox()
        self.exposure_spin.setRange(0.01, 10_000.0)
        self.exposure_spin.setDecimals(2)
        self.exposure_spin.setSuffix(" ms")
        self.exposure_spin.setValue(10.0)
        self.exposure_button = QPushButton("Set exposure")
        self.reply_label = QLabel("")
        self.reply_label.setWordWrap(True)
        self.pause_button.clicked.connect(lambda: self.request("pause"))
        self.resume_button.clicked.connect(lambda: self.request("resume"))
        self.stop_button.clicked.connect(lambda: self.request("stop"))
        self.exposure_button.clicked.connect(
            lambda: self.request("set", key="acquisition.exposure_ms", value=float(self.exposure_spin.value())))

        form = QFormLayout()
        form.addRow("events", self.events_edit)
        form.addRow("control", self.control_edit)
        buttons = QHBoxLayout()
        for b in (self.pause_button, self.resume_button, self.stop_button):
            buttons.addWidget(b)
        exposure = QHBoxLayout()
        exposure.addWidget(self.exposure_spin)
        exposure.addWidget(self.exposure_button)
        run_box = QGroupBox("run")
        run_layout = QVBoxLayout(run_box)
        run_layout.addWidget(self.counts_label)
        run_layout.addLayout(buttons)
        run_layout.addLayout(exposure)
        run_layout.addWidget(self.reply_label)
        run_layout.addWidget(QLabel("latest actions"))
        run_layout.addWidget(self.actions_list)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.connect_button)
        layout.addWidget(self.status_label)
        layout.addWidget(run_box)
        layout.addStretch(1)

        self._changed.connect(self._redraw)
        self._replied.connect(self._show_reply)
        # The connection state changes with time alone (silence); look at it twice a second.
        self._status_timer = QTimer(self)
        self._status_timer.setInterval(500)
        self._status_timer.timeout.connect(self._update_status)
        self._status_timer.start()
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.timeout.connect(self._redraw)
        if connect:
            self.connect_daemon()

    # -- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._thread is not None

    def connect_daemon(self) -> None:
        """Subscribe to the daemon at the events endpoint (reconnects by itself)."""
        self.disconnect_daemon()
        self.state = LiveState()
        self._seen = {}
        self._thread = EventThread(self.events_edit.text().strip(), self.state, self._request_redraw)
        self._thread.start()
        self.connect_button.setText("Disconnect")
        self._update_status()

    def disconnect_daemon(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        self.connect_button.setText("Connect")
        self.status_label.setText("not connected")

    def _toggle_connection(self) -> None:
        if self.connected:
            self.disconnect_daemon()
        else:
            self.connect_daemon()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.close_connections()
        super().closeEvent(event)

    def close_connections(self) -> None:
        """Stop the event thread and the control worker (the widget is going away)."""
        self._status_timer.stop()
        self.disconnect_daemon()
        self._control.shutdown(wait=False, cancel_futures=True)

    # -- control ---------------------------------------------------------------------------

    def request(self, command: str, **fields: Any) -> None:
        """Send a control request on the worker thread; the reply shows under the buttons."""
        endpoint = self.control_edit.text().strip()
        self.reply_label.setText(f"{command}: sent")

        def send() -> None:
            try:
                with ControlClient(endpoint, timeout_s=3.0) as ctl:
                    reply = ctl.request(command, **fields)
                text = f"{command}: ok" + (f" ({fields['key']} = {reply.get('value')})" if command == "set" else "")
            except ControlError as exc:
                text = f"{command} failed: {exc}" + (" (is the daemon running?)" if "no reply" in str(exc) else "")
            except Exception as exc:  # noqa: BLE001 - a bad endpoint: say so, keep the viewer alive
                text = f"{command} failed: {type(exc).__name__}: {exc}"
            self._replied.emit(command, text)

        self._control.submit(send)

    def _show_reply(self, command: str, text: str) -> None:
        self.last_reply = text
        self.reply_label.setText(text)

    # -- drawing ---------------------------------------------------------------------------

    @property
    def pending_redraws(self) -> int:
        """Redraws requested and not yet done: 0 or 1 by construction."""
        return int(self._pending.is_set())

    def _request_redraw(self) -> None:
        """Called from the event thread: post one redraw unless one is already waiting."""
        self.redraw_requests += 1
        if not self._pending.is_set():
            self._pending.set()
            self._changed.emit()

    def _redraw(self) -> None:
        wait_s = 1.0 / self.max_redraw_hz - (time.monotonic() - self._last_redraw)
        if wait_s > 0:
            if not self._redraw_timer.isActive():
                self._redraw_timer.start(int(wait_s * 1000) + 1)
            return
        self._pending.clear()  # before the snapshot: a change after it posts a new redraw
        self._last_redraw = time.monotonic()
        if self.state is None:
            return
        snap = self.state.snapshot(self._seen)
        self._seen = dict(snap.versions)
        self.apply(snap)
        self.redraws += 1
        self._update_status()

    def apply(self, snap: Snapshot) -> None:
        """Put a snapshot's changed layers into the viewer."""
        layers = self.viewer.layers
        if snap.camera is not None:
            image, bin_px, frame_seq = snap.camera
            offset = (bin_px - 1) / 2.0  # binned pixel r is centred at camera r·bin + (bin − 1)/2
            if CAMERA in layers:
                layer = layers[CAMERA]
                layer.data = image
                layer.scale, layer.translate = (bin_px, bin_px), (offset, offset)
            else:
                layer = self.viewer.add_image(image, name=CAMERA, colormap="gray", scale=(bin_px, bin_px),
                                              translate=(offset, offset))
                layers.move(layers.index(layer), 0)  # under everything else
            layers[CAMERA].metadata["frame_seq"] = frame_seq
            lo, hi = np.percentile(image, (0.5, 99.5)) if image.size else (0, 1)
            layers[CAMERA].contrast_limits = (float(lo), float(max(hi, lo + 1)))
        if snap.localizations is not None:
            points = snap.localizations
            if LOCALIZATIONS in layers:
                layers[LOCALIZATIONS].data = points
            else:
                self.viewer.add_points(points, name=LOCALIZATIONS, size=3, face_color="transparent",
                                       border_color="yellow", border_width=0.15, border_width_is_relative=True)
        if snap.tracks is not None:
            data, props, color_by = snap.tracks
            if TRACKS in layers:
                layer = layers[TRACKS]
                layer.data = data
                layer.properties = props
                layer.color_by = color_by
            else:
                layer = self.viewer.add_tracks(data, properties=props, name=TRACKS, color_by=color_by,
                                               tail_length=50, tail_width=2)
            layer.colormap = "turbo" if color_by == "D_um2_per_s" else "hsv"
            t_latest = int(data[:, 1].max())
            if self.viewer.dims.ndim >= 3:
                self.viewer.dims.set_current_step(0, t_latest)
        if snap.musical is not None:
            wanted = {MUSICAL_PREFIX + w.key: w for w in snap.musical}
            for name in list(self._musical_layers - set(wanted)):
                if name in layers:
                    layers.remove(name)
                self._musical_layers.discard(name)
            for name, w in wanted.items():
                if name in layers:
                    layer = layers[name]
                    layer.data = w.image
                    layer.scale, layer.translate = w.scale, w.translate
                else:
                    self.viewer.add_image(w.image, name=name, colormap="magma", blending="additive",
                                          scale=w.scale, translate=w.translate)
                finite = w.image[np.isfinite(w.image)]
                hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
                layers[name].contrast_limits = (0.0, hi if hi > 0 else 1.0)
                self._musical_layers.add(name)
        if snap.panel is not None:
            p = snap.panel
            text = (f"state <b>{p['state']}</b> · received {p['frames_received']} · processed "
                    f"{p['frames_processed']} · dropped {p['frames_dropped']} · queue {p['queue_depth_frames']}")
            if p.get("run_ended"):
                text += f"<br>run ended ({p['run_ended']})"
            self.counts_label.setText(text)
            self.actions_list.clear()
            self.actions_list.addItems(p["actions"] or ["(no action yet)"])

    def _update_status(self) -> None:
        if self._thread is None or self.state is None:
            return
        endpoint = self._thread.endpoint
        if self._thread.error:
            self.status_label.setText(self._thread.error)
            return
        conn, silent_s = self.state.connection()
        if conn is Connection.WAITING:
            text = f"waiting for a daemon at {endpoint}: none has answered for {silent_s:.0f} s"
            if silent_s > self.state.stale_after_s:
                text = f"no daemon at {endpoint} (nothing heard for {silent_s:.0f} s); still trying"
        elif conn is Connection.CONNECTED:
            text = f"connected to {endpoint} (run {(self.state.run_id or '?')[:8]}, lag {self.state.lag_s * 1000:.0f} ms)"
        else:
            text = f"the daemon at {endpoint} went away (silent for {silent_s:.0f} s); reconnecting"
        self.status_label.setText(text)
