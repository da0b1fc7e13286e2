"""Sources: every TIFF flavour gives back its frames exactly; odd frames and corrupt pages never
stop a run; a camera that fails mid-run (raises, vanishes) is reported on ``source_error`` and the
run ends cleanly or reconnects as configured, with every frame accounted for."""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from scopestream.daemon._config import ConfigError, ScopestreamConfig
from scopestream.daemon._errors import InputError
from scopestream.daemon._messages import Message, SourceErrorBody
from scopestream.daemon._service import Daemon
from scopestream.daemon._sources import FileSource, MicroManagerSource
from scopestream.daemon.client import Subscriber
from scopestream.sim_camera import config_path


class _Collect:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.numbers: list[int | None] = []

    def deliver(self, image: np.ndarray, t_acquired: float, camera_image_number: int | None = None, metadata: Any = None) -> None:
        self.frames.append(np.array(image))
        self.numbers.append(camera_image_number)

    def missed(self, count: int, reason: str, camera_image_number: int | None = None) -> None:
        self.missed_frames.append((count, reason, camera_image_number))

    def source_error(self, body: SourceErrorBody) -> None:
        self.errors.append(body)

    @property
    def missed_frames(self) -> list[tuple[int, str, int | None]]:
        return self.__dict__.setdefault("_missed", [])

    @property
    def errors(self) -> list[SourceErrorBody]:
        return self.__dict__.setdefault("_errors", [])


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p, a: tifffile.imwrite(p, a), id="plain-memmap"),
        pytest.param(lambda p, a: tifffile.imwrite(p, a, compression="zlib"), id="zlib-pages"),
        pytest.param(lambda p, a: tifffile.imwrite(p, a, ome=True, metadata={"axes": "TYX"}), id="ome"),
        pytest.param(lambda p, a: tifffile.imwrite(p, a.reshape(3, 4, *a.shape[1:]), ome=True, metadata={"axes": "TZYX"}), id="ome-tzyx"),
    ],
)
def test_file_source_replays_every_frame_exactly(tmp_path: Path, write: Callable[[Path, np.ndarray], None]) -> None:
    stack = np.random.default_rng(1).integers(0, 4000, size=(12, 17, 23), dtype=np.uint16)
    path = tmp_path / "s.ome.tif"
    write(path, stack)
    src = FileSource(path)
    desc = src.open()
    assert (desc.height_px, desc.width_px, desc.dtype) == (17, 23, "uint16")
    sink = _Collect()
    src.start(sink)
    assert src.finished.wait(10)
    src.stop()
    src.close()
    assert src.error is None and not sink.errors and not sink.missed_frames
    np.testing.assert_array_equal(np.stack(sink.frames), stack)
    assert sink.numbers == list(range(12))


def test_rgb_and_missing_files_are_refused_by_name(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="single-channel"):
        FileSource(tmp_path / "rgb.tif").open()
    with pytest.raises(InputError, match="no such file"):
        FileSource(tmp_path / "nope.tif").open()


def test_odd_frames_are_counted_not_fatal(tmp_path: Path, make_config: Callable[..., ScopestreamConfig]) -> None:
    """float32 frames with NaN pixels, an all-NaN frame, a constant frame and a saturated one."""
    stack = np.full((6, 16, 16), 100.0, np.float32)
    stack[1, 2, 3] = np.nan
    stack[2] = np.nan
    stack[3] = 0.0
    stack[4] = 65535.0
    stack[5, :8] = np.inf
    tifffile.imwrite(tmp_path / "odd.tif", stack)
    config = make_config("source.kind=file", f"source.file_path={tmp_path / 'odd.tif'}", "stages=[frame_stats]")
    daemon = Daemon(config, serve_events=False, serve_control=False, results_dir=str(tmp_path / "res"))
    stop = daemon.run_until_stopped()
    assert stop is not None
    assert stop.frames_received == stop.frames_processed == 6 and stop.frames_dropped == 0
    assert stop.stage_errors == {"frame_stats": 1}  # the all-NaN frame: no finite pixel to summarise
    with open(tmp_path / "res" / "frame_stats.csv") as fh:
        rows = {int(r["frame"]): r for r in csv.DictReader(fh)}
    assert sorted(rows) == [0, 1, 3, 4, 5]
    assert float(rows[1]["nonfinite_fraction"]) == pytest.approx(1 / 256)
    assert float(rows[1]["mean_adu"]) == pytest.approx(100.0)
    assert float(rows[3]["max_adu"]) == 0.0
    assert float(rows[4]["saturated_fraction"]) == 1.0
    assert float(rows[5]["nonfinite_fraction"]) == pytest.approx(0.5)


# -- a corrupt page mid-file ---------------------------------------------------------------------


def _corrupt_page(path: Path, index: int) -> None:
    """Overwrite the compressed data of page ``index`` with bytes zlib cannot inflate."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[index]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * count)


def test_a_corrupt_page_is_skipped_reported_and_counted(tmp_path: Path, make_config: Callable[..., ScopestreamConfig]) -> None:
    stack = np.random.default_rng(3).integers(0, 4000, size=(8, 16, 16), dtype=np.uint16)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, stack, compression="zlib")
    _corrupt_page(path, 3)
    src = FileSource(path)
    src.open()
    sink = _Collect()
    src.start(sink)
    assert src.finished.wait(10)
    src.stop()
    src.close()
    assert src.error is None  # the replay went on
    np.testing.assert_array_equal(np.stack(sink.frames), np.delete(stack, 3, axis=0))
    assert sink.numbers == [0, 1, 2, 4, 5, 6, 7]
    assert sink.missed_frames == [(1, "source_error", 3)]
    (err,) = sink.errors
    assert err.action == "skip_frame" and err.frame_index == 3 and err.frames_delivered == 3
    assert "frame 3 cannot be read" in err.error and not err.reconnecting
    # Through the daemon: the frame is counted dropped (reason source_error), nothing else.
    config = make_config("source.kind=file", f"source.file_path={path}", "stages=[frame_stats]")
    daemon = Daemon(config, serve_events=False, serve_control=False, results_dir=str(tmp_path / "res"))
    stop = daemon.run_until_stopped()
    assert stop is not None and stop.exit_status == "success"
    assert (stop.frames_received, stop.frames_processed, stop.frames_dropped) == (8, 7, 1)
    assert stop.frames_dropped_by_reason["source_error"] == 1
    with open(tmp_path / "res" / "frame_stats.csv") as fh:
        assert sorted(int(r["frame"]) for r in csv.DictReader(fh)) == [0, 1, 2, 4, 5, 6, 7]


# -- a camera that fails mid-run ---------------------------------------------------------------

PERIOD_MS = 5.0
SMALL_CAMERA = (
    "simulation.frame_height_px=32", "simulation.frame_width_px=32", "simulation.n_particles=3",
    f"acquisition.exposure_ms={PERIOD_MS}", f"acquisition.frame_interval_ms={PERIOD_MS}",
    "stages=[frame_stats]", "metrics.enabled=false",
)


def _failing_camera_cfg(tmp_path: Path, fail_after_frames: int) -> Path:
    """The shipped simulated-widefield configuration plus the camera's failure injection."""
    text = config_path("simulated-widefield").read_text()
    path = tmp_path / "failing.cfg"
    path.write_text(text + f"#py Property,Camera,FailAfterFrames,{fail_after_frames}\n")
    return path


def _run_and_collect(daemon: Daemon, until: Callable[[dict[str, list[Message]]], bool] | None = None,
                     timeout_s: float = 60.0) -> dict[str, list[Message]]:
    """Start the daemon, collect every event up to run_stop; call daemon.stop() once ``until``
    holds (None: wait for the run to end by itself)."""
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint)
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(20)
    starter.join(20)
    topics: dict[str, list[Message]] = {}
    deadline = time.monotonic() + timeout_s
    stopped = False
    while time.monotonic() < deadline and (m := sub.recv(10)) is not None:
        topics.setdefault(m.topic, []).append(m)
        if m.topic == "run_stop":
            break
        if until is not None and not stopped and until(topics):
            daemon.stop("the test has seen enough")
            stopped = True
    sub.close()
    assert "run_stop" in topics, f"no run_stop; got {sorted(topics)}"
    for topic, msgs in topics.items():
        assert [m.header.seq for m in msgs] == list(range(len(msgs))), topic
    return topics


def _assert_counts_add_up(stop: dict[str, Any]) -> None:
    assert stop["frames_received"] == stop["frames_processed"] + stop["frames_dropped"]
    assert stop["frames_dropped"] == sum(stop["frames_dropped_by_reason"].values())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_camera_that_raises_ends_the_run_failed(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    cfg = _failing_camera_cfg(tmp_path, fail_after_frames=30)
    daemon = Daemon(make_config(f"source.mm_config={cfg}", "events.wait_for_subscriber_s=20", *SMALL_CAMERA))
    daemons.append(daemon)
    topics = _run_and_collect(daemon)
    (err,) = [m.body for m in topics["source_error"]]
    assert err["action"] == "stop" and err["reconnecting"] is False
    assert err["frames_delivered"] == 30  # the camera made 30 frames, then raised
    assert "FailAfterFrames=30" in err["error"]
    stop = topics["run_stop"][0].body
    assert stop["exit_status"] == "failed" and "FailAfterFrames=30" in stop["reason"]
    assert stop["frames_received"] == 30
    _assert_counts_add_up(stop)
    # The event comes before run_stop, and every frame the camera made was analysed or counted.
    assert topics["source_error"][0].header.t_published <= topics["run_stop"][0].header.t_published
    assert len(topics["frame_stats"]) == stop["frames_processed"]


def test_a_camera_that_vanishes_ends_the_run_failed(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    config = make_config("events.wait_for_subscriber_s=20", *SMALL_CAMERA)
    source = MicroManagerSource(config)
    daemon = Daemon(config, source=source)
    daemons.append(daemon)

    def vanish() -> None:  # the camera device is unloaded under the running source
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.status().frames_received < 20:
            time.sleep(0.005)
        core = source.core
        assert core is not None
        core.unloadDevice("Camera")

    killer = threading.Thread(target=vanish)
    killer.start()
    topics = _run_and_collect(daemon)
    killer.join(10)
    (err,) = [m.body for m in topics["source_error"]]
    assert err["action"] == "stop" and "vanished" in err["error"]
    assert err["frames_delivered"] >= 20
    stop = topics["run_stop"][0].body
    assert stop["exit_status"] == "failed" and "vanished" in stop["reason"]
    assert stop["frames_received"] == err["frames_delivered"]
    _assert_counts_add_up(stop)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_camera_reconnects_and_the_gap_is_counted(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    delay_ms = 150.0
    cfg = _failing_camera_cfg(tmp_path, fail_after_frames=25)  # every new core fails again after 25
    daemon = Daemon(make_config(
        f"source.mm_config={cfg}", "events.wait_for_subscriber_s=20", *SMALL_CAMERA,
        "source.on_error=reconnect", "source.reconnect_attempts=2", f"source.reconnect_delay_ms={delay_ms}",
    ))
    daemons.append(daemon)
    # Stop once the second reconnect has delivered 5 frames: two outages, three camera lives.
    topics = _run_and_collect(
        daemon, lambda t: len(t.get("source_error", [])) >= 2 and len(t.get("frame_stats", [])) >= 55
    )
    errors = [m.body for m in topics["source_error"]]
    assert len(errors) == 2
    for n, err in enumerate(errors, start=1):
        # Each reconnect worked, so each outage starts again at attempt 1.
        assert err["action"] == "reconnect" and err["reconnecting"] and err["reconnect_attempt"] == 1
        assert err["reconnect_attempts_max"] == 2 and "FailAfterFrames=25" in err["error"]
        assert err["frames_delivered"] == 25 * n
    stop = topics["run_stop"][0].body
    assert stop["exit_status"] == "success"  # ended by the stop request, not by the camera
    _assert_counts_add_up(stop)
    assert stop["frames_dropped_by_reason"]["camera_gap"] == stop["frames_dropped"] - stop["frames_dropped_by_reason"]["bus_full"]
    # The frames lost in each gap are the frames the camera would have taken at its own rate:
    # the frame numbers jump by the counted gap, and the time between the camera's stamps of
    # the frames on either side of it over the 5 ms period gives the same count to within the
    # rounding (the camera restarts at an arbitrary phase of its period; the simulated camera
    # stamps frames with their scheduled times, so no thread jitter enters; the delay alone is
    # 150 ms = 30 frames).
    stats = sorted(topics["frame_stats"], key=lambda m: m.header.frame_seq or 0)
    seqs = np.array([m.header.frame_seq for m in stats])
    t_acq = np.array([m.header.t_acquired for m in stats])
    jumps = np.flatnonzero(np.diff(seqs) > 1)
    bus_full = stop["frames_dropped_by_reason"]["bus_full"]
    assert len(jumps) == 2 or bus_full  # a bus_full drop would also leave a hole
    gap_total = 0
    for j in jumps:
        lost = int(seqs[j + 1] - seqs[j] - 1)
        from_time = (t_acq[j + 1] - t_acq[j]) / (PERIOD_MS / 1000.0) - 1
        if lost >= delay_ms / PERIOD_MS - 1:  # a reconnect gap
            assert abs(lost - from_time) <= 0.5 + 1e-6, (lost, from_time)
            gap_total += lost
    assert gap_total == stop["frames_dropped_by_reason"]["camera_gap"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_reconnect_gives_up_after_its_attempts(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    cfg = _failing_camera_cfg(tmp_path, fail_after_frames=20)
    daemon = Daemon(make_config(
        f"source.mm_config={cfg}", "events.wait_for_subscriber_s=20", *SMALL_CAMERA,
        "source.on_error=reconnect", "source.reconnect_attempts=2", "source.reconnect_delay_ms=20",
    ))
    daemons.append(daemon)

    def remove_cfg_after_start(topics: dict[str, list[Message]]) -> bool:
        if "run_start" in topics and cfg.exists():
            cfg.unlink()  # the camera's configuration vanishes: every reconnect fails
        return False

    topics = _run_and_collect(daemon, remove_cfg_after_start)
    errors = [m.body for m in topics["source_error"]]
    assert [(e["action"], e["reconnect_attempt"]) for e in errors] == [("reconnect", 1), ("reconnect", 2), ("stop", 0)]
    assert "FailAfterFrames=20" in errors[0]["error"]
    assert all("no such Micro-Manager configuration file" in e["error"] for e in errors[1:])
    assert all(e["frames_delivered"] == 20 for e in errors)
    stop = topics["run_stop"][0].body
    assert stop["exit_status"] == "failed" and "gave up after 2 reconnect attempt(s)" in stop["reason"]
    assert stop["frames_received"] == 20
    _assert_counts_add_up(stop)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_camera_that_raises_during_an_mda_ends_the_run_failed(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    cfg = _failing_camera_cfg(tmp_path, fail_after_frames=15)
    daemon = Daemon(make_config(f"source.mm_config={cfg}", "source.mode=mda", "source.frames_limit=40",
                                "events.wait_for_subscriber_s=20", *SMALL_CAMERA))
    daemons.append(daemon)
    topics = _run_and_collect(daemon)
    (err,) = [m.body for m in topics["source_error"]]
    assert err["action"] == "stop" and err["frames_delivered"] == 15
    assert "15 of 40 frames" in err["error"] and "FailAfterFrames=15" in err["error"]
    stop = topics["run_stop"][0].body
    assert stop["exit_status"] == "failed" and stop["frames_received"] == 15
    _assert_counts_add_up(stop)


def test_reconnect_is_refused_for_mda_by_name(make_config: Callable[..., ScopestreamConfig]) -> None:
    with pytest.raises(ConfigError, match="on_error: 'reconnect' works in mode 'continuous' only"):
        make_config("source.mode=mda", "source.on_error=reconnect")
