"""The daemon end to end with real components: DemoCamera through pymmcore-plus, real ZeroMQ
sockets, a real HTTP scrape of the metrics."""

from __future__ import annotations

import re
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from scopestream.daemon import (
    Emission,
    Frame,
    Products,
    RunContext,
    StagePlugin,
    register_stage_plugin,
)
from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import ControlClient, Subscriber

sys.path.insert(0, str(Path(__file__).parent))
from live_runs import drain, start_with_subscriber, write_stack  # noqa: E402

pytest.importorskip("mm_test_adapters")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(scopestream_\w+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
        if m:
            key = m.group(1) + (m.group(2) or "")
            out[key] = float(m.group(3))
    return out



def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes (a loaded machine can take
    seconds for what takes milliseconds on an idle one); whether it finally held."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True



def test_democamera_end_to_end(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    config = make_config("source.mm_config=demo", "acquisition.exposure_ms=5", "acquisition.frame_interval_ms=5",
                         "events.wait_for_subscriber_s=10", "stages=[frame_stats]")
    daemon = Daemon(config)
    daemons.append(daemon)
    sub = start_with_subscriber(daemon)
    # Run until more than 50 frames were processed (~0.3 s at 5 ms a frame on an idle machine;
    # on a loaded one the camera's start-up alone can take seconds, so wait on the count, not
    # on the clock), then stop and read the rest.
    msgs = []
    deadline = time.monotonic() + 60
    while sum(m.topic == "frame_stats" for m in msgs) <= 50 and time.monotonic() < deadline:
        if (m := sub.recv(0.5)) is not None:
            msgs.append(m)
    daemon.stop()
    assert daemon.wait(20)
    msgs += drain(sub)
    assert daemon.metrics_port is not None
    metrics = scrape(daemon.metrics_port)
    sub.close()

    topics = [m.topic for m in msgs if m.topic != "welcome"]
    assert topics[0] == "run_start" and topics[-1] == "run_stop"
    assert "heartbeat" in topics
    stats = [m for m in msgs if m.topic == "frame_stats"]
    assert [m.header.seq for m in stats] == list(range(len(stats))), "frame_stats seq must have no gaps"
    assert sub.gaps == {}
    stop = msgs[-1].body
    assert stop["frames_received"] == stop["frames_processed"] + stop["frames_dropped"]
    # 5 ms exposure, run until 50 frames were processed: each processed frame gives one frame_stats.
    assert stop["frames_processed"] > 50
    assert len(stats) == stop["frames_processed"]
    assert {m.header.run_id for m in msgs} == {daemon.run_id}
    # The DemoCamera's frames: 512 x 512 uint16 with pixel values within 0..65535.
    body = stats[-1].body
    assert (body["height_px"], body["width_px"]) == (512, 512)
    assert body["min_adu"] <= body["background_adu"] <= body["mean_adu"] <= body["max_adu"]
    assert stats[-1].header.t_acquired <= stats[-1].header.t_published
    # The metrics endpoint, scraped over HTTP, shows the same counts.
    assert metrics["scopestream_frames_received_total"] == stop["frames_received"]
    assert metrics["scopestream_frames_processed_total"] == stop["frames_processed"]
    dropped = sum(v for k, v in metrics.items() if k.startswith("scopestream_frames_dropped_total"))
    assert dropped == stop["frames_dropped"]
    assert metrics['scopestream_events_published_total{topic="frame_stats"}'] == len(stats)
    assert metrics['scopestream_stage_latency_seconds_count{stage="frame_stats"}'] == stop["frames_processed"]


def test_democamera_mda_mode_runs_the_sequence(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    config = make_config("source.mm_config=demo", "source.mode=mda", "source.frames_limit=12",
                         "acquisition.exposure_ms=2", "acquisition.frame_interval_ms=2",
                         "events.wait_for_subscriber_s=10", "stages=[frame_stats]")
    daemon = Daemon(config)
    daemons.append(daemon)
    sub = start_with_subscriber(daemon, ["frame_stats", "run_stop"])
    assert daemon.wait(30), "the MDA should end by itself after 12 frames"
    msgs = drain(sub)
    stop = msgs[-1].body
    assert stop["exit_status"] == "success", stop
    assert stop["frames_received"] == 12 and stop["frames_processed"] == 12
    assert [m.body["frame_seq"] for m in msgs if m.topic == "frame_stats"] == list(range(12))


def test_camera_buffer_overflow_is_counted_from_image_number_gaps(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    """A drain thread that polls too rarely lets the DemoCamera overflow its circular buffer
    (it clears it without raising the overflow flag); the ImageNumber gaps must be counted."""
    config = make_config("source.mm_config=demo", "acquisition.exposure_ms=1", "acquisition.frame_interval_ms=1",
                         "source.poll_interval_ms=300", "stages=[frame_stats]")
    daemon = Daemon(config)
    daemons.append(daemon)
    from scopestream.daemon._sources import MicroManagerSource

    source = daemon.runner._source  # noqa: SLF001 - shrink the real circular buffer to force overflow
    assert isinstance(source, MicroManagerSource)
    original_open = source.open

    def small_buffer_open() -> Any:
        desc = original_open()
        assert source._core is not None  # noqa: SLF001
        source._core.setCircularBufferMemoryFootprint(4)  # MB: ~8 frames of 512 x 512 uint16  # noqa: SLF001
        return desc

    source.open = small_buffer_open  # type: ignore[method-assign]
    daemon.start()
    time.sleep(2.0)
    daemon.stop()
    assert daemon.wait(20)
    stop = daemon.runner.run_stop
    assert stop is not None
    assert stop.frames_dropped > 0, "overflow should have lost frames"
    assert stop.frames_dropped_by_reason["camera_gap"] + stop.frames_dropped_by_reason["camera_overflow"] == stop.frames_dropped
    assert stop.frames_received == stop.frames_processed + stop.frames_dropped


# -- stages that misbehave, registered without an entry point ----------------------------------


class _NoSettings(BaseModel):
    pass


class _Tick(BaseModel):
    frame_seq: int


class _SlowStage:
    name = "slow_test"

    def setup(self, context: RunContext) -> None:
        pass

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        time.sleep(0.02)
        return [Emission("slow_tick", _Tick(frame_seq=frame.seq), frame_seq=frame.seq)]


class _FlakyStage:
    name = "flaky_test"

    def setup(self, context: RunContext) -> None:
        pass

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        if frame.seq % 3 == 0:
            raise RuntimeError(f"cannot handle frame {frame.seq}")
        return []


class _BulkyStage:
    """Publishes 128 KiB per frame, as image-carrying topics (MUSICAL) do."""

    name = "bulky_test"

    def setup(self, context: RunContext) -> None:
        pass

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        return [Emission("bulky", _Tick(frame_seq=frame.seq), {"image": np.zeros((128, 128), np.float64)}, frame_seq=frame.seq)]


register_stage_plugin(StagePlugin("bulky_test", _NoSettings, lambda c, s: _BulkyStage(), topics={"bulky": _Tick}))
register_stage_plugin(StagePlugin("slow_test", _NoSettings, lambda c, s: _SlowStage(), topics={"slow_tick": _Tick}))
register_stage_plugin(StagePlugin("flaky_test", _NoSettings, lambda c, s: _FlakyStage()))



def test_live_bus_drops_and_counts_honestly_when_analysis_is_slow(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    """A 20 ms stage behind a 200 fps paced source: the bus (4 frames) must drop, never block."""
    write_stack(tmp_path / "s.tif", 100)
    config = make_config("source.kind=file", f"source.file_path={tmp_path / 's.tif'}", "source.replay_fps=200",
                         "bus.capacity_frames=4", "stages=[frame_stats, slow_test]", "events.wait_for_subscriber_s=10")
    daemon = Daemon(config)
    daemons.append(daemon)
    sub = start_with_subscriber(daemon, ["dropped_frames", "slow_tick", "run_stop"])
    t0 = time.monotonic()
    assert daemon.wait(30)
    msgs = drain(sub)
    stop = msgs[-1].body
    assert stop["frames_received"] == 100
    assert stop["frames_received"] == stop["frames_processed"] + stop["frames_dropped"]
    # 100 frames at 200 fps = 0.5 s of acquisition; 20 ms each would need >= 2 s without drops.
    assert stop["frames_dropped_by_reason"]["bus_full"] == stop["frames_dropped"] > 0
    assert sum(m.body["count"] for m in msgs if m.topic == "dropped_frames") == stop["frames_dropped"]
    assert len([m for m in msgs if m.topic == "slow_tick"]) == stop["frames_processed"]
    assert time.monotonic() - t0 < 0.5 + (stop["frames_processed"] + 5) * 0.03


def test_a_stage_that_raises_is_counted_and_the_run_goes_on(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    write_stack(tmp_path / "s.tif", 30)
    config = make_config("source.kind=file", f"source.file_path={tmp_path / 's.tif'}",
                         "stages=[flaky_test, frame_stats]", "events.wait_for_subscriber_s=10")
    daemon = Daemon(config)
    daemons.append(daemon)
    sub = start_with_subscriber(daemon, ["stage_error", "frame_stats", "run_stop"])
    assert daemon.wait(30)
    msgs = drain(sub)
    stop = msgs[-1].body
    errors = [m for m in msgs if m.topic == "stage_error"]
    assert stop["frames_processed"] == 30 and stop["frames_dropped"] == 0  # replay loses nothing
    assert stop["stage_errors"] == {"flaky_test": 10}
    assert [m.header.frame_seq for m in errors] == list(range(0, 30, 3))
    assert "cannot handle frame 3" in errors[1].body["error"]
    # the next stage still ran on every frame
    assert len([m for m in msgs if m.topic == "frame_stats"]) == 30


def test_stalled_subscriber_does_not_slow_acquisition(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    """One subscriber never reads (tiny receive HWM); another reads everything. Acquisition keeps
    its pace, the reader loses nothing, the stalled one sees the gaps it suffered.

    Sizes: 1000 frames at 400 fps send 2000 messages (frame_stats + a 128 KiB ``bulky``) in 2.5 s.
    The reader's only slack against a stall of the ZeroMQ I/O thread (one per process, shared by
    the daemon and both subscribers) is the send HWM: 200 messages = 0.25 s of stream, enough for
    a busy 2-core machine (20 messages, 25 ms, was not). The stalled one can hold at most send HWM
    + its receive HWM + the kernel's loopback buffers (tcp_rmem max 32 MiB + tcp_wmem max 4 MiB
    here, 6 + 4 MiB by default): (200 + 10) x 128 KiB + 36 MiB = 62 MiB, less than the 125 MiB of
    ``bulky`` sent, so it must lose at least half of them."""
    n_frames = 1000
    stack = write_stack(tmp_path / "s.tif", n_frames, shape=(32, 32))
    config = make_config("source.kind=file", f"source.file_path={tmp_path / 's.tif'}", "source.replay_fps=400",
                         "stages=[frame_stats, bulky_test]", "events.send_hwm_messages=200", "events.wait_for_subscriber_s=10")
    daemon = Daemon(config)
    daemons.append(daemon)
    assert daemon.events_endpoint is not None
    stalled = Subscriber(daemon.events_endpoint, ["bulky"], rcvhwm_messages=10)
    assert stalled.wait_ready(10)
    reader = start_with_subscriber(daemon, ["frame_stats", "bulky", "run_stop"])
    t0 = time.monotonic()
    msgs = drain(reader)
    elapsed = time.monotonic() - t0
    stop = msgs[-1].body
    assert stop["frames_received"] == n_frames == stop["frames_processed"] + stop["frames_dropped"]
    assert elapsed < n_frames / 400 + 1.5, f"acquisition slowed down: {elapsed:.2f} s for {n_frames / 400} s of frames"
    stats = [m for m in msgs if m.topic == "frame_stats"]
    assert len(stats) == stop["frames_processed"] and reader.gaps == {}
    np.testing.assert_allclose([m.body["mean_adu"] for m in stats[:5]], stack[:5].mean(axis=(1, 2)))
    got = []
    while (m := stalled.recv(0.2)) is not None:
        got.append(m)
    bulky = [m for m in msgs if m.topic == "bulky"]
    assert len(bulky) == len(stats)
    assert 0 < len(got) < len(bulky)
    # messages lost after the last one received cannot show as gaps; all others must
    lost_before_last = got[-1].header.seq + 1 - len(got)
    assert stalled.gaps.get("bulky", 0) == lost_before_last, "a stalled subscriber must see its losses as seq gaps"
    stalled.close()


def test_control_channel_survives_bad_requests(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    config = make_config("source.mm_config=demo", "acquisition.exposure_ms=5", "acquisition.frame_interval_ms=5",
                         "stages=[frame_stats]")
    daemon = Daemon(config)
    daemons.append(daemon)
    daemon.start()
    assert daemon.control_endpoint is not None
    with ControlClient(daemon.control_endpoint) as ctl:
        bad: list[tuple[bytes, str]] = [
            (b"\xff\xfe not json", "not JSON"),
            (b"[1, 2]", "JSON object"),
            (b'{"command": "explode"}', "unknown command 'explode'"),
            (b'{"nocommand": 1}', "unknown command None"),
            (b'{"command": "set", "value": 3}', "needs a 'key'"),
            (b'{"command": "set", "key": "acquisition.exposure_ms"}', "needs a 'value'"),
            (b'{"command": "set", "key": "optics.na", "value": 1.2}', "cannot change while running"),
            (b'{"command": "set", "key": "acquisition.exposure_ms", "value": -4}', "exposure_ms"),
            (b'{"command": "set", "key": "frame_stats.background_percentile", "value": "lots"}', "background_percentile"),
        ]
        for payload, expected in bad:
            reply = ctl.request_raw(payload)
            assert reply["ok"] is False and expected in reply["error"], (payload, reply)
        assert ctl.status()["state"] == "running"
        assert ctl.set("acquisition.exposure_ms", 2) == 2.0
        assert daemon.runner._source._core.getExposure() == pytest.approx(2.0)  # type: ignore[attr-defined]  # noqa: SLF001
        assert ctl.set("frame_stats.background_percentile", 50) == 50.0

        assert ctl.request("pause")["state"] == "paused"
        time.sleep(0.3)
        n_paused = ctl.status()["frames_received"]
        time.sleep(0.5)
        assert ctl.status()["frames_received"] == n_paused, "no frames while paused"
        assert ctl.request("resume")["state"] == "running"
        assert wait_for(lambda: ctl.status()["frames_received"] > n_paused), "frames must come again after resume"
        assert ctl.request("stop")["ok"]
    assert daemon.wait(20)
    stop = daemon.runner.run_stop
    assert stop is not None and stop.exit_status == "success"
    assert stop.frames_received == stop.frames_processed + stop.frames_dropped


def test_a_taken_endpoint_is_refused_by_name(make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]) -> None:
    first = Daemon(make_config("source.mm_config=demo", "stages=[frame_stats]"))
    daemons.append(first)
    assert first.events_endpoint is not None and first.control_endpoint is not None
    with pytest.raises(OSError, match=re.escape(f"cannot bind the event stream to {first.events_endpoint!r}")):
        Daemon(make_config(f"events.endpoint={first.events_endpoint}"))
    with pytest.raises(OSError, match=re.escape(f"cannot bind the control channel to {first.control_endpoint!r}")):
        Daemon(make_config(f"control.endpoint={first.control_endpoint}"))


def test_a_run_ended_by_a_signal_reports_aborted(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    """What the CLI's SIGINT/SIGTERM handler does: Daemon.stop(reason, "aborted"). A later plain
    stop cannot turn it back into success; run_stop, the status and the counts agree."""
    write_stack(tmp_path / "s.tif", 500)
    config = make_config("source.kind=file", f"source.file_path={tmp_path / 's.tif'}", "source.replay_fps=100",
                         "stages=[frame_stats]", "events.wait_for_subscriber_s=10")
    daemon = Daemon(config)
    daemons.append(daemon)
    sub = start_with_subscriber(daemon, ["run_stop"])
    assert wait_for(lambda: daemon.status().frames_received > 0), "the replay never started"
    daemon.stop("SIGTERM received", "aborted")
    daemon.stop("daemon closed")  # e.g. close() after the signal: the outcome stays aborted
    msgs = drain(sub)
    stop = msgs[-1].body
    assert stop["exit_status"] == "aborted" and stop["reason"] == "SIGTERM received"
    assert 0 < stop["frames_received"] < 500, "the signal ended the run before the file did"
    assert stop["frames_received"] == stop["frames_processed"] + stop["frames_dropped"]
    assert daemon.status().exit_status == "aborted"
    with pytest.raises(ValueError, match="exit_status"):
        daemon.stop("?", "maybe")  # type: ignore[arg-type]


def test_a_start_that_fails_closes_the_daemon(
    tmp_path: Path, make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon]
) -> None:
    """run_until_stopped (the CLI's `run`) with a configuration that does not load: the error
    propagates and no daemon thread is left behind (left running at interpreter exit, one aborted
    the CLI with "FATAL: exception not rethrown" instead of exit status 2)."""
    from scopestream.daemon._errors import InputError

    cfg = tmp_path / "bad.cfg"
    cfg.write_text("Device,Camera,NoSuchAdapterLibrary,DCam\nProperty,Core,Initialize,1\n")
    before = set(threading.enumerate())
    daemon = Daemon(make_config(f"source.mm_config={cfg}", "stages=[frame_stats]"))
    daemons.append(daemon)
    with pytest.raises(InputError, match="cannot load Micro-Manager configuration"):
        daemon.run_until_stopped()
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], f"threads left running after a failed start: {left}"
