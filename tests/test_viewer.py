"""The napari plugin in a real napari viewer (offscreen Qt, OpenGL through an X server) against a
real daemon on the simulated camera: layers appear, a track lands where the simulation's truth
puts the particle, the buttons drive the run, the widget keeps up, and it says when the daemon is
not there and reconnects when it comes back. The reader opens an analyze result folder."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import yaml
from pydantic import BaseModel

napari = pytest.importorskip("napari", reason="the napari extra is not installed")

from scopestream.daemon._config import ScopestreamConfig, load_config, register_stage_plugin  # noqa: E402
from scopestream.daemon._frames import Frame  # noqa: E402
from scopestream.daemon._service import Daemon  # noqa: E402
from scopestream.daemon._stage import StagePlugin  # noqa: E402
from scopestream.daemon.client import ControlClient  # noqa: E402
from scopestream.sim_camera import simulate_stack, truth_from_json  # noqa: E402

SHOTS = os.environ.get("SCOPESTREAM_SCREENSHOT_DIR")  # also copy the screenshots here


# -- an X server for napari's OpenGL canvas, and Qt offscreen ---------------------------------


@pytest.fixture(scope="module")
def qt_app() -> Iterator[Any]:
    if not os.environ.get("DISPLAY"):
        if shutil.which("Xvfb") is None:
            pytest.skip("napari's canvas needs OpenGL through an X server: no DISPLAY and no Xvfb "
                        "(apt-get install xvfb; .ci/run does it)")
        read_fd, write_fd = os.pipe()
        # Xvfb outlives this fixture (Qt keeps its X connection until the interpreter exits, and
        # loses it fatally if the server goes first): a watcher ends it once pytest has exited.
        watcher = (f"Xvfb -displayfd {write_fd} -screen 0 1600x1200x24 -nolisten tcp >/dev/null 2>&1 & x=$!; "
                   f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.5; done; kill $x")
        subprocess.Popen(["sh", "-c", watcher], pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        with os.fdopen(read_fd) as fh:
            display = fh.readline().strip()
        assert display, "Xvfb did not start"
        os.environ["DISPLAY"] = f":{display}"
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from napari._vispy.utils.gl import get_gl_extensions, get_max_texture_sizes
    from napari.qt import get_qapp
    from vispy.app import Canvas
    from vispy.gloo import gl

    app = get_qapp()
    # napari asks OpenGL for its extensions when the first image layer is made, and caches the
    # answer. A hidden viewer's canvas has no current GL context until Qt has realized it, so the
    # query can return None, raise inside the widget's redraw slot and abort the interpreter
    # (PyQt's unhandled-exception policy). Ask once here, before any viewer exists, on a canvas
    # of our own made current (a fresh context under Xvfb is sometimes not usable at once on a
    # loaded machine: let Qt run, retry on a new canvas, up to a generous deadline).
    deadline = time.monotonic() + 30
    while True:
        canvas = Canvas(show=False)
        try:
            canvas.set_current()
            app.processEvents()
            if gl.glGetParameter(gl.GL_EXTENSIONS):
                assert get_gl_extensions() and get_max_texture_sizes()[0]
                break
        except AttributeError:  # vispy decodes the None that glGetString gives without a context
            pass
        finally:
            canvas.close()
        assert time.monotonic() < deadline, "no usable OpenGL context within 30 s"
        time.sleep(0.1)
    yield app


def spin(app: Any, until: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Run the Qt event loop until ``until()`` or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def pump(app: Any, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)


@pytest.fixture
def viewer(qt_app: Any) -> Iterator[Any]:
    v = napari.Viewer(show=False)
    v.window._qt_window.resize(1400, 900)
    yield v
    for widget in getattr(v, "_scopestream_widgets", []):
        widget.close_connections()
    v.close()


def add_widget(viewer: Any, events: str, control: str) -> Any:
    from scopestream.viewer._widget import LiveWidget

    widget = LiveWidget(viewer, events, control)
    viewer.window.add_dock_widget(widget, name="scopestream live", area="right")
    viewer._scopestream_widgets = [*getattr(viewer, "_scopestream_widgets", []), widget]
    return widget


def save_shot(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS) / path.name)


# -- a test-only stage that records what the simulated camera says is true ---------------------


class TapSettings(BaseModel):
    pass


class TruthTap:
    """Keeps each frame's image and the simulation's truth rows (frame metadata), by frame_seq."""

    name = "truth_tap"
    frames: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __init__(self, config: Any, settings: Any) -> None:
        TruthTap.frames = {}

    def setup(self, context: Any) -> None:
        pass

    def process(self, frame: Frame, products: Any) -> tuple[()]:
        text = frame.metadata.get("scopestream_truth")
        if text:
            TruthTap.frames[frame.seq] = (frame.image.copy(), truth_from_json(text))
        return ()


register_stage_plugin(StagePlugin(name="truth_tap", settings_model=TapSettings, build=TruthTap))

SCENE = [
    "source.mm_config=simulated-widefield", "simulation.frame_height_px=64", "simulation.frame_width_px=64",
    "simulation.n_particles=5", "simulation.particle_kind=point", "simulation.states=[RanW]",
    "simulation.D_um2_per_s=0.005", "simulation.photons_per_frame=3000",
]


def start(daemon: Daemon) -> None:
    t = threading.Thread(target=daemon.start)
    t.start()
    t.join(30)


def test_live_widget_on_a_running_daemon(
    qt_app: Any, viewer: Any, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon], tmp_path: Path
) -> None:
    config = make_config(
        *SCENE, "stages=[truth_tap, preview, localize, track, diffusion, musical]",
        "preview.max_rate_hz=20", "musical.window_frames=30", "musical.slide_frames=30", "musical.region_px=15",
        "musical.subpixels=4", "offload.workers=1", "offload.backend=threads",
    )
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint and daemon.control_endpoint
    widget = add_widget(viewer, daemon.events_endpoint, daemon.control_endpoint)
    widget.connect_daemon()
    start(daemon)
    layers = viewer.layers
    spin(qt_app, lambda: {"scopestream camera", "scopestream localizations", "scopestream tracks"} <= {ly.name for ly in layers}
         and any(ly.name.startswith("MUSICAL track") for ly in layers), 30, "the live layers")
    pump(qt_app, 0.5)
    assert "connected to" in widget.status_label.text()

    # The camera layer is exactly the frame it previews (the tap kept each frame).
    assert widget.state is not None
    camera = layers["scopestream camera"]
    np.testing.assert_array_equal(camera.data, TruthTap.frames[camera.metadata["frame_seq"]][0])

    # Each track's newest point lies where the simulation put a particle in that frame. The
    # localization error at 3000 photons is ~0.02 px (CRLB) and the spot moves ~0.1 px during
    # the exposure: 0.5 px (the point lands on the particle's pixel) is a > 10 sigma bound.
    data = layers["scopestream tracks"].data
    checked = 0
    for pid in np.unique(data[:, 0]):
        rows = data[data[:, 0] == pid]
        t, y, x = rows[np.argmax(rows[:, 1]), 1:]
        truth = TruthTap.frames[int(t)][1]
        truth = truth[truth["visible"]]
        d = np.hypot(truth["x"] - x, truth["y"] - y).min()
        assert d < 0.5, f"track {pid} at frame {t}: {d:.2f} px from the nearest particle"
        checked += 1
    assert checked >= 3

    # A MUSICAL window sits at its region: its brightest sub-pixel, in camera coordinates
    # (napari's data_to_world with the layer's scale and translate), lies on the path a particle
    # took during the window. Bound: D = 0.005 µm²/s, 100 nm px, 10 ms frames: 0.14 px rms step
    # (2D) a frame, so a path point is within ~0.07 px of a frame's truth position; the sub-pixel
    # grid (1/4 px) puts the peak within 0.18 px of its true place; MUSICAL's ridge lies within
    # ~0.15 px of the path (test_musical measures 0.10-0.14 px); the spot moves ~0.1 px during
    # an exposure: 0.5 px in all, 0.75 px allowed. (The mean position over the window is no
    # ground truth for the peak: over 30 frames the walk wanders ~0.55 px rms per axis from it.)
    # The stream goes on meanwhile: take the window the layer shows now (a newer window of the
    # same track can already be in the state, its region moved by a pixel, before the next redraw).
    name = next(ly.name for ly in layers if ly.name.startswith("MUSICAL track"))

    def shown_window() -> Any:
        state = widget.state
        assert state is not None
        return next((w for w in state.snapshot().musical or []
                     if "MUSICAL " + w.key == name and np.array_equal(w.image, layers[name].data)), None)

    seen: list[Any] = []  # the window found while spinning (asked again, the stream may have moved on)
    spin(qt_app, lambda: (w := shown_window()) is not None and not seen.append(w), 10,
         "the MUSICAL layer to show a window of the state")
    window = seen[0]
    assert tuple(layers[name].translate) == window.translate and tuple(layers[name].scale) == window.scale
    peak = np.unravel_index(np.argmax(window.image), window.image.shape)
    wy, wx = layers[name].data_to_world(peak)
    path = np.concatenate([TruthTap.frames[f][1] for f in range(window.frame_start, window.frame_end + 1)
                           if f in TruthTap.frames])
    d_path = float(np.hypot(path["x"] - wx, path["y"] - wy).min())
    assert d_path < 0.75, f"the MUSICAL peak is {d_path:.2f} px from every particle's path in its window"

    # The widget keeps up: over 1 s nothing is lost (no seq gaps), the newest event it folded in
    # was published less than 1 s before, and at most one redraw is ever queued.
    lags = []
    for _ in range(4):
        pump(qt_app, 0.25)
        lags.append(widget.state.lag_s)
        assert widget.pending_redraws <= 1
    assert widget._thread is not None and widget._thread.gaps == {}
    assert max(lags) < 1.0, lags
    assert widget.redraws > 5 and widget.redraws <= widget.redraw_requests

    # Buttons: pause (status says so, and so does the widget from the heartbeat), exposure, resume.
    widget.pause_button.click()
    with ControlClient(daemon.control_endpoint) as ctl:
        spin(qt_app, lambda: ctl.status()["state"] == "paused", 10, "the daemon to pause")
        spin(qt_app, lambda: "state <b>paused</b>" in widget.counts_label.text(), 10, "the widget to show paused")
        widget.exposure_spin.setValue(5.0)
        widget.exposure_button.click()
        spin(qt_app, lambda: widget.last_reply.startswith("set: ok"), 10, "the exposure reply")
        assert daemon.runner.config.acquisition.exposure_ms == 5.0
        widget.resume_button.click()
        spin(qt_app, lambda: ctl.status()["state"] == "running", 10, "the daemon to resume")

    shot = viewer.screenshot(canvas_only=False, flash=False)
    save_shot(shot, tmp_path / "viewer.png")
    # The camera, tracks and widget make a busy picture: far from one flat colour.
    assert shot.shape[0] > 400 and shot[..., :3].std() > 10

    widget.stop_button.click()
    spin(qt_app, lambda: "run ended" in widget.counts_label.text(), 20, "run_stop in the widget")


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_widget_says_when_no_daemon_and_reconnects(
    qt_app: Any, viewer: Any, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    events = free_tcp_endpoint()
    widget = add_widget(viewer, events, "tcp://127.0.0.1:1")
    widget.connect_daemon()
    assert widget.state is not None
    widget.state.stale_after_s = 1.0  # heartbeats come every 0.2 s here
    spin(qt_app, lambda: "no daemon at" in widget.status_label.text(), 5, "'no daemon'")
    # A control request to nobody answers with an error, not a frozen viewer.
    widget.pause_button.click()
    spin(qt_app, lambda: "pause failed" in widget.last_reply, 10, "the failed pause")

    run_ids = []
    for _ in range(2):
        daemon = Daemon(make_config(*SCENE, f"events.endpoint={events}", "stages=[preview, localize]"))
        daemons.append(daemon)
        start(daemon)
        run_id = daemon.run_id
        spin(qt_app, lambda: "connected to" in widget.status_label.text() and widget.state.run_id == run_id, 15,  # noqa: B023
             "the connection")
        spin(qt_app, lambda: "scopestream camera" in viewer.layers, 10, "the camera layer")
        run_ids.append(widget.state.run_id)
        daemon.close()  # the daemon goes away mid-session
        spin(qt_app, lambda: "went away" in widget.status_label.text(), 10, "'went away'")
    assert run_ids[0] != run_ids[1]


# -- the reader --------------------------------------------------------------------------------


def test_reader_opens_an_analyze_folder(qt_app: Any, viewer: Any, tmp_path: Path) -> None:
    scene = {"particle_kind": "point", "states": ["RanW", "Stat"], "dwell_ms": 150.0, "D_um2_per_s": 0.05,
             "photons_per_frame": 3000, "background_photons_per_px": 10}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"simulation": scene, "stages": ["localize", "track", "diffusion"]}))
    movie, truth = simulate_stack(load_config(tmp_path / "c.yaml"), "widefield", n_frames=40, size_px=40, n_particles=4, seed=5)
    tifffile.imwrite(tmp_path / "m.tif", movie)
    res = tmp_path / "res"
    out = subprocess.run([sys.executable, "-m", "scopestream.daemon._cli", "analyze", str(tmp_path / "m.tif"),
                          "--out", str(res), "--config", str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # A MUSICAL image of a region, as a per-track writer would store it (x0, y0, subpixels).
    region = np.zeros((40, 40), np.float32)
    region[21, 9] = 1.0  # sub-pixel (21, 9) at s = 4 -> camera y = 12 + 21.5/4 - 0.5, x = 5 + 9.5/4 - 0.5
    (res / "musical").mkdir()
    tifffile.imwrite(res / "musical" / "track_0.tif", region,
                     description='{"subpixels": 4, "x0_px": 5, "y0_px": 12, "particle": 0, "frame_start": 0, "frame_end": 29}')
    with open(res / "motion.csv", "w", newline="") as fh:  # the simulation's states, one row per frame
        w = csv.writer(fh)
        w.writerow(["particle", "frame_start", "frame_end", "state", "probability"])
        tracks_rows = list(csv.DictReader(open(res / "tracks.csv")))
        tracked = {int(r["particle"]) for r in tracks_rows}
        for p in sorted(tracked):
            w.writerow([p, 0, 19, "Stat", 0.9])
            w.writerow([p, 20, 39, "RanW", 0.9])

    new = viewer.open(str(res), plugin="scopestream")
    names = {ly.name for ly in new}
    assert names == {"res localizations", "res tracks", "MUSICAL track_0"}
    tracks = viewer.layers["res tracks"]
    table = np.array([[float(r["particle"]), float(r["frame"]), float(r["y"]), float(r["x"])] for r in tracks_rows])
    # napari's (track_id, t, y, x) are tracks.csv's (particle, frame, y, x), unchanged (napari sorts rows).
    order = np.lexsort((table[:, 1], table[:, 0]))
    np.testing.assert_array_equal(tracks.data, table[order])
    state = tracks.properties["state"]
    np.testing.assert_array_equal(state, np.where(tracks.data[:, 1] <= 19, 0.0, 1.0))  # Stat = 0, RanW = 1
    assert tracks.color_by == "state"
    diffusion = list(csv.DictReader(open(res / "diffusion.csv")))
    whole = {int(r["particle"]): float(r["D_um2_per_s"]) for r in diffusion if r["window"] == "track" and r["D_um2_per_s"]}
    for pid, d in whole.items():
        np.testing.assert_allclose(tracks.properties["D_um2_per_s"][tracks.data[:, 0] == pid], d)
    points = viewer.layers["res localizations"]
    assert len(points.data) == sum(1 for _ in open(res / "localizations.csv")) - 1
    musical = viewer.layers["MUSICAL track_0"]
    np.testing.assert_allclose(musical.data_to_world((21, 9)), (12 + 21.5 / 4 - 0.5, 5 + 9.5 / 4 - 0.5))
    assert truth.size  # the movie had particles
