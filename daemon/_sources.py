"""Frame sources behind one protocol: Micro-Manager through pymmcore-plus, and recorded files.

A source owns one thread that takes frames from the camera (or file) and hands each to a
:class:`FrameSink` (the runner) as soon as it has it. Acquisition never waits for analysis: in
live mode the sink drops frames when the bus is full; in replay mode it blocks the reader.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from scopestream.daemon._actuators import ActionError, Actuators, MicroManagerActuators, NoActuators
from scopestream.daemon._config import ConfigError, ScopestreamConfig, config_to_dict
from scopestream.daemon._errors import InputError
from scopestream.daemon._messages import SourceDescription, SourceErrorBody

if TYPE_CHECKING:
    from pymmcore_plus.experimental.unicore import UniMMCore

log = logging.getLogger(__name__)

# The key a scopestream simulated camera puts in its frame metadata: acquisition time, Unix s.
T_ACQUIRED_KEY = "scopestream_t_acquired_s"
SIMULATION_PROPERTY = "SimulationJSON"


class FrameSink(Protocol):
    """Where a source delivers frames (implemented by the runner)."""

    def deliver(
        self,
        image: np.ndarray,
        t_acquired: float,
        camera_image_number: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None: ...

    def missed(self, count: int, reason: str, camera_image_number: int | None = None) -> None: ...

    def source_error(self, body: SourceErrorBody) -> None:
        """The source failed; ``body.action`` says whether it stops, reconnects or skips a frame.

        Called on the source's thread before the source acts on the error (before it ends, so
        the event precedes ``run_stop``; before it reconnects; before the skipped frame is
        counted with :meth:`missed`)."""
        ...


class CameraFailure(RuntimeError):
    """The camera failed mid-run: it raised, stopped its acquisition by itself, or vanished."""


@runtime_checkable
class FrameSource(Protocol):
    """A camera or a file. ``open`` connects, ``start`` begins delivering on the source's own thread.

    ``finished`` is set when the source ends by itself (frame limit, end of file, camera error);
    ``error`` then says why, if it was an error. Errors mid-run are also reported to the sink
    with :meth:`FrameSink.source_error` as they happen.
    """

    finished: threading.Event
    error: str | None

    def open(self) -> SourceDescription: ...

    def start(self, sink: FrameSink) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self) -> None:
        """Stop acquiring, deliver the frames already taken from the camera, join the thread."""
        ...

    def set_exposure_ms(self, exposure_ms: float) -> None: ...

    def close(self) -> None:
        """Release the hardware or the file."""
        ...


def make_source(config: ScopestreamConfig) -> FrameSource:
    """The source the configuration asks for."""
    if config.source.kind == "file":
        if not config.source.file_path:
            raise ConfigError("source.file_path: required when source.kind is 'file' (given None)")
        return FileSource(
            config.source.file_path,
            replay_fps=config.source.replay_fps,
            frames_limit=config.source.frames_limit,
        )
    return MicroManagerSource(config)


# -- Micro-Manager -----------------------------------------------------------------------------


def resolve_mm_config(name: str) -> tuple[Path, list[str]]:
    """A system configuration file and the adapter folders it needs, from source.mm_config."""
    if name == "demo":
        try:
            import mm_test_adapters
        except ImportError:
            raise ConfigError(
                "source.mm_config: 'demo' needs the DemoCamera adapters; install them with "
                "`pip install 'scopestream[demo]'` (package mm-test-adapters)"
            ) from None
        folder = mm_test_adapters.device_adapter_path()
        return Path(folder) / "MMConfig_demo.cfg", [folder]
    if name.startswith("simulated-"):
        try:
            from scopestream.sim_camera import config_path
        except ImportError:  # pragma: no cover - the simulators ship with the package
            raise ConfigError(f"source.mm_config: {name!r} needs scopestream.sim_camera") from None
        try:
            return Path(config_path(name)), []
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"source.mm_config: {exc}") from None
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"source.mm_config: no such Micro-Manager configuration file {name!r} "
            "(or use 'demo', 'simulated-widefield', 'simulated-scanning')"
        )
    extra: list[str] = []
    try:
        import mm_test_adapters

        extra.append(mm_test_adapters.device_adapter_path())
    except ImportError:
        pass
    return path, extra


class MicroManagerSource:
    """A Micro-Manager core (``UniMMCore``: C++ adapters and Python devices alike).

    Continuous mode runs a sequence acquisition and drains the circular buffer from one thread
    (pymmcore gives no per-frame signal there). Lost frames are found from ``ImageNumber`` gaps
    (the DemoCamera clears its buffer on overflow without raising the overflow flag) and from
    ``isBufferOverflowed``. MDA mode runs a ``useq.MDASequence`` through ``core.mda`` and takes
    frames from ``frameReady``.

    A camera that fails mid-run (a core call raises, the sequence stops by itself, the camera
    device is unloaded) is reported with :meth:`FrameSink.source_error`. With
    ``source.on_error: stop`` the source then ends with :attr:`error` set; with ``reconnect``
    (continuous mode) it releases the core, waits ``source.reconnect_delay_ms``, loads the
    configuration into a new core and restarts the sequence, up to ``source.reconnect_attempts``
    times per outage. The frames the camera would have taken meanwhile (the outage over the
    frame period measured before it) are counted as missed, reason ``camera_gap``.
    """

    def __init__(self, config: ScopestreamConfig) -> None:
        self._config = config
        self._core: UniMMCore | None = None
        self._core_lock = threading.RLock()  # the core may be replaced by a reconnect
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._sink: FrameSink | None = None
        self._mda_done = threading.Event()
        self.finished = threading.Event()
        self.error: str | None = None
        self._last_image_number: int | None = None
        self._overflow_pending = False
        self._exposure_ms = config.acquisition.exposure_ms
        self._cfg_path = ""
        self.frames_delivered = 0
        self._frames_seen = 0  # delivered + known missed: what source.frames_limit counts
        self._mda_expected: int | None = None
        # Timing of delivered frames (camera time stamps), to size a reconnect's gap.
        self._t_last_frame: float | None = None
        self._intervals_s: deque[float] = deque(maxlen=64)
        self._gap_since: float | None = None

    @property
    def core(self) -> UniMMCore | None:
        """The core this source drives (None before ``open`` and after ``close``)."""
        return self._core

    # lifecycle ---------------------------------------------------------------------------
    def open(self) -> SourceDescription:
        src = self._config.source
        core, camera = self._open_core()
        self._core = core
        dtype = {1: "uint8", 2: "uint16", 4: "uint32"}.get(core.getBytesPerPixel(), "uint16")
        return SourceDescription(
            kind="micromanager",
            detail=self._cfg_path,
            camera=camera,
            width_px=core.getImageWidth(),
            height_px=core.getImageHeight(),
            dtype=dtype,
            mode=src.mode,
        )

    def _open_core(self) -> tuple[UniMMCore, str]:
        """A new core with the configuration loaded and the camera set up; (core, camera)."""
        from pymmcore_plus.experimental.unicore import UniMMCore

        src = self._config.source
        cfg_path, adapter_paths = resolve_mm_config(src.mm_config)
        self._cfg_path = str(cfg_path)
        core = UniMMCore()
        paths = [*adapter_paths, *src.mm_adapter_paths]
        if paths:
            core.setDeviceAdapterSearchPaths(paths)
        try:
            core.loadSystemConfiguration(str(cfg_path))
        except Exception as exc:  # pymmcore raises RuntimeError / CMMError with the adapter's text
            _release(core)
            raise InputError(f"cannot load Micro-Manager configuration {str(cfg_path)!r}: {exc}") from None
        camera = core.getCameraDevice()
        if not camera:
            _release(core)
            raise InputError(f"Micro-Manager configuration {str(cfg_path)!r} sets no camera device")
        try:
            if core.hasProperty(camera, SIMULATION_PROPERTY):
                core.setProperty(camera, SIMULATION_PROPERTY, json.dumps(config_to_dict(self._config)))
            core.setExposure(self._exposure_ms)
            if src.sequence_buffer_mb is not None:
                core.setCircularBufferMemoryFootprint(src.sequence_buffer_mb)
        except Exception as exc:
            _release(core)
            raise InputError(f"cannot set up camera {camera!r} of {str(cfg_path)!r}: {exc}") from None
        return core, camera

    def start(self, sink: FrameSink) -> None:
        assert self._core is not None, "open() first"
        self._sink = sink
        if self._config.source.mode == "mda":
            self._start_mda()
        else:
            self._start_sequence(self._core)
            self._thread = threading.Thread(target=self._drain, name="scopestream-camera", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        core = self._core
        if core is None or self._paused.is_set():
            return
        self._paused.set()
        if self._config.source.mode == "mda":
            core.mda.set_paused(True)

    def resume(self) -> None:
        core = self._core
        if core is None or not self._paused.is_set():
            return
        if self._config.source.mode == "mda":
            core.mda.set_paused(False)
        self._paused.clear()

    def set_exposure_ms(self, exposure_ms: float) -> None:
        with self._core_lock:
            if self._core is None:
                raise ValueError("the camera is not connected (reconnecting, or closed)")
            self._core.setExposure(exposure_ms)
            self._exposure_ms = exposure_ms  # a reconnect applies it to the new core

    def stop(self) -> None:
        core = self._core
        self._stop.set()
        if self._config.source.mode == "mda":
            if core is not None and core.mda.is_running():
                core.mda.cancel()
            if core is not None:
                self._mda_done.wait(timeout=10)
        elif self._thread is not None:
            self._thread.join(timeout=10)

    def close(self) -> None:
        with self._core_lock:
            if self._core is not None:
                _release(self._core)
                self._core = None

    # actuators ---------------------------------------------------------------------------
    def actuators(self) -> Actuators:
        """The core's stages, shutter and camera settings (after :meth:`open`)."""
        assert self._core is not None, "open() first"
        burst = self.run_mda_burst if self._config.source.mode == "continuous" else None
        return MicroManagerActuators(self._core, burst)

    def run_mda_burst(self, sequence: Mapping[str, Any]) -> dict[str, Any]:
        """Pause continuous acquisition, run ``sequence`` (a useq.MDASequence as a mapping) at the
        current position with its frames delivered to the sink, restore XY and Z, resume.

        Blocks until the sequence has run. Frames are snapped one by one (no hardware
        sequencing), so the circular buffer stays the continuous drain's alone.
        """
        import useq

        core = self._core
        if core is None or self._sink is None:
            raise ActionError("run_mda: the source is not acquiring")
        if self._stop.is_set():
            raise ActionError("run_mda: the acquisition is stopping")
        seq = useq.MDASequence.model_validate(dict(sequence))
        was_paused = self._paused.is_set()
        self._paused.set()
        deadline = time.monotonic() + 5.0
        while core.isSequenceRunning() and time.monotonic() < deadline:  # the drain stops it
            time.sleep(0.001)
        xy_label, z_label = core.getXYStageDevice(), core.getFocusDevice()
        xy = core.getXYPosition() if xy_label else None
        z = core.getPosition() if z_label else None
        engine = core.mda.engine
        hw = getattr(engine, "use_hardware_sequencing", None)
        delivered = 0

        def on_frame(image: np.ndarray, event: Any, meta: Any) -> None:
            nonlocal delivered
            assert self._sink is not None
            delivered += 1
            index = dict(getattr(event, "index", {}) or {})
            self._sink.deliver(np.asarray(image), time.time(), None, {"mda_index": index, "mda_burst": True})

        core.mda.events.frameReady.connect(on_frame)
        try:
            if hw is not None:
                engine.use_hardware_sequencing = False  # type: ignore[union-attr]
            if not core.getShutterDevice():
                core.setAutoShutter(False)
            core.mda.run(seq)
        finally:
            core.mda.events.frameReady.disconnect(on_frame)
            if hw is not None:
                engine.use_hardware_sequencing = hw  # type: ignore[union-attr]
            if xy is not None:
                core.setXYPosition(xy_label, *xy)
            if z is not None:
                core.setPosition(z_label, z)
            if not was_paused:
                self._paused.clear()
        return {"events": sum(1 for _ in seq), "frames_delivered": delivered, "acquisition": "paused" if was_paused else "running"}

    # continuous --------------------------------------------------------------------------
    def _start_sequence(self, core: UniMMCore) -> None:
        limit = self._config.source.frames_limit
        self._last_image_number = None
        if limit is None:
            core.startContinuousSequenceAcquisition(0)
        else:
            core.startSequenceAcquisition(max(1, limit - self._frames_seen), 0, False)

    def _limit_reached(self) -> bool:
        limit = self._config.source.frames_limit
        return limit is not None and self._frames_seen >= limit

    def _drain(self) -> None:
        sink = self._sink
        assert sink is not None
        src = self._config.source
        attempt = 0  # reconnect attempts in the current outage
        core = self._core
        message = "the Micro-Manager core was released under the source"
        try:
            while True:
                delivered_before = self.frames_delivered
                if core is not None:
                    try:
                        self._acquire(core, sink)
                        return  # stopped, or the frame limit reached
                    except CameraFailure as exc:
                        message = str(exc)
                    except Exception as exc:  # the camera vanished or the adapter failed
                        message = f"camera error: {type(exc).__name__}: {exc}"
                        if _camera_gone(core):  # say why the call failed, not only how
                            message = f"{_why_stopped(core)} ({type(exc).__name__}: {exc})"
                if self.frames_delivered > delivered_before:
                    attempt = 0  # the last reconnect worked: this is a new outage
                if self._stop.is_set():
                    log.warning("%s (while stopping)", message)
                    return
                attempt += 1
                reconnect = src.on_error == "reconnect" and attempt <= src.reconnect_attempts
                self._report(sink, message, attempt if reconnect else 0)
                if not reconnect:
                    if src.on_error == "reconnect":
                        message = f"{message} (gave up after {src.reconnect_attempts} reconnect attempt(s))"
                    self.error = message
                    log.error("%s", message)
                    return
                log.warning("%s; reconnecting (attempt %d of %d)", message, attempt, src.reconnect_attempts)
                if self._gap_since is None:
                    self._gap_since = self._t_last_frame if self._t_last_frame is not None else time.time()
                core, failure = self._reconnect()
                if core is None:
                    if self._stop.is_set():
                        return
                    message = failure or message
        finally:
            with self._core_lock:
                core = self._core
                try:
                    if core is not None and core.isSequenceRunning():
                        core.stopSequenceAcquisition()
                except Exception:  # noqa: BLE001 - already failing; keep the first error
                    pass
            self.finished.set()

    def _report(self, sink: FrameSink, message: str, attempt: int) -> None:
        src = self._config.source
        body = SourceErrorBody(
            source_kind="micromanager",
            error=message,
            frames_delivered=self.frames_delivered,
            action="reconnect" if attempt else "stop",
            reconnecting=bool(attempt),
            reconnect_attempt=attempt,
            reconnect_attempts_max=src.reconnect_attempts if src.on_error == "reconnect" else 0,
        )
        try:
            sink.source_error(body)
        except Exception as exc:  # noqa: BLE001 - reporting must not change what the source does
            log.error("the sink refused a source_error event: %s", exc)

    def _reconnect(self) -> tuple[UniMMCore | None, str | None]:
        """Release the failed core, wait, open a new one and restart the sequence.

        Returns ``(core, None)`` on success, ``(None, why)`` when this attempt failed, and
        ``(None, None)`` when a stop came during the wait."""
        with self._core_lock:
            old, self._core = self._core, None
        if old is not None:
            _release(old)
        if self._stop.wait(self._config.source.reconnect_delay_ms / 1000.0):
            return None, None
        try:
            core, _ = self._open_core()
        except Exception as exc:  # noqa: BLE001 - the next attempt, or the final error
            return None, f"reconnect failed: {exc}"
        try:
            self._start_sequence(core)
        except Exception as exc:  # noqa: BLE001
            _release(core)
            return None, f"reconnect failed: the camera did not start: {type(exc).__name__}: {exc}"
        with self._core_lock:
            self._core = core
        return core, None

    def _acquire(self, core: UniMMCore, sink: FrameSink) -> None:
        """Drain one core until stopped or the frame limit; raise :class:`CameraFailure` or the
        core's own error when the camera fails."""
        poll_s = self._config.source.poll_interval_ms / 1000.0
        acquiring = True
        while True:
            if self._stop.is_set() or self._paused.is_set():
                if acquiring:
                    core.stopSequenceAcquisition()
                    acquiring = False
                while core.getRemainingImageCount():  # deliver what the camera already took
                    self._pop(core, sink)
                if self._stop.is_set():
                    return
                time.sleep(poll_s)
                continue
            if not acquiring:  # resumed
                self._start_sequence(core)
                acquiring = True
            if core.getRemainingImageCount():
                self._pop(core, sink)
                continue
            if core.isBufferOverflowed():
                log.warning("Micro-Manager circular buffer overflowed; clearing it")
                self._overflow_pending = True
                core.clearCircularBuffer()
                continue
            if not core.isSequenceRunning():
                if core.getRemainingImageCount():
                    continue
                if self._limit_reached():
                    return
                raise CameraFailure(_why_stopped(core))
            time.sleep(poll_s)

    def _pop(self, core: UniMMCore, sink: FrameSink) -> None:
        image, raw_md = core.popNextImageAndMD()
        md = dict(raw_md)  # pymmcore's Metadata.get raises on a missing key
        number = _int_or_none(md.get("ImageNumber"))
        t_acq = _t_acquired(md)
        follows = self._t_last_frame is not None  # this frame directly follows the last one
        if self._gap_since is not None:  # first frame after a reconnect
            lost = self._frames_lost_since(self._gap_since, t_acq)
            self._gap_since = None
            follows = False
            if lost:
                self._frames_seen += lost
                sink.missed(lost, "camera_gap", number)
        elif number is not None:
            last = self._last_image_number
            if last is not None and number > last + 1:
                reason = "camera_overflow" if self._overflow_pending else "camera_gap"
                self._frames_seen += number - last - 1
                follows = False
                sink.missed(number - last - 1, reason, number)
        if number is not None:
            self._overflow_pending = False
            self._last_image_number = number
        if follows and self._t_last_frame is not None:
            # The camera's own frame period sizes a reconnect's gap: the median interval between
            # recent frames with nothing missed between them (robust to a stall and the burst
            # that catches up after it, which a mean or a moving average is not).
            self._intervals_s.append(t_acq - self._t_last_frame)
        self._t_last_frame = t_acq
        self._frames_seen += 1
        self.frames_delivered += 1
        sink.deliver(image, t_acq, number, md)

    def _frames_lost_since(self, t_last_s: float, t_now_s: float) -> int:
        """Frames the camera would have taken between two delivered frames (exclusive)."""
        period_s = float(np.median(self._intervals_s)) if self._intervals_s else 0.0
        if period_s <= 0:
            acq = self._config.acquisition
            period_s = max(acq.frame_interval_ms, self._exposure_ms) / 1000.0
        lost = max(0, round((t_now_s - t_last_s) / period_s) - 1)
        limit = self._config.source.frames_limit
        if limit is not None:  # frames_limit counts received frames; this one must still fit
            lost = min(lost, max(0, limit - self._frames_seen - 1))
        return int(lost)

    # MDA ---------------------------------------------------------------------------------
    def _start_mda(self) -> None:
        import useq

        core = self._core
        assert core is not None
        src = self._config.source
        try:
            if src.mda_sequence is not None:
                sequence = useq.MDASequence.model_validate(src.mda_sequence)
            else:
                loops = src.frames_limit or 2**31 - 1
                sequence = useq.MDASequence(time_plan=useq.TIntervalLoops(interval=0, loops=loops))
                self._mda_expected = loops
        except Exception as exc:
            raise ConfigError(f"source.mda_sequence: not a valid useq.MDASequence: {exc}") from None
        if not core.getShutterDevice():
            core.setAutoShutter(False)
        core.mda.events.frameReady.connect(self._on_mda_frame)
        core.mda.events.sequenceFinished.connect(self._on_mda_finished)
        core.run_mda(sequence)

    def _on_mda_frame(self, image: np.ndarray, event: Any, meta: Mapping[str, Any]) -> None:
        assert self._sink is not None
        number = None
        cam_md = meta.get("camera_metadata") if isinstance(meta, Mapping) else None
        t_acq = time.time()
        if cam_md is not None:
            cam_md = dict(cam_md)
            number = _int_or_none(cam_md.get("ImageNumber"))
            t_acq = _t_acquired(cam_md)
        index = dict(getattr(event, "index", {}) or {})
        self.frames_delivered += 1
        self._sink.deliver(image, t_acq, number, {"mda_index": index, **(meta if isinstance(meta, Mapping) else {})})

    def _on_mda_finished(self, *args: Any) -> None:
        """The MDA ended: completed, cancelled by us, or failed (the runner's finish reason says
        'errored', or fewer frames came than the default sequence asks for)."""
        try:
            core = self._core
            message = None
            if core is not None and not self._stop.is_set():
                reason = str(getattr(core.mda.status, "finish_reason", "") or "")
                expected = self._mda_expected
                if reason == "errored":
                    message = f"the MDA sequence failed: {_why_stopped(core)}"
                elif expected is not None and self.frames_delivered < expected:
                    message = (f"the MDA sequence ended after {self.frames_delivered} of {expected} frames: "
                               f"{_why_stopped(core)}")
            if message is not None and self._sink is not None:
                self._report(self._sink, message, 0)
                self.error = message
                log.error("%s", message)
        finally:
            self._mda_done.set()
            self.finished.set()


def _camera_gone(core: UniMMCore) -> bool:
    try:
        return not core.getCameraDevice()
    except Exception:  # noqa: BLE001
        return True


def _why_stopped(core: UniMMCore) -> str:
    """Words for a sequence that stopped without being asked to."""
    try:
        camera = core.getCameraDevice()
    except Exception as exc:  # noqa: BLE001
        return f"the camera vanished ({type(exc).__name__}: {exc})"
    if not camera:
        return "the camera device vanished (it is no longer loaded in the core)"
    detail = ""
    try:
        if core.hasProperty(camera, "LastError"):
            detail = str(core.getProperty(camera, "LastError"))
    except Exception:  # noqa: BLE001 - the camera may be half gone
        pass
    if not detail:
        # An unloaded device stops its sequence before it leaves the core: look again briefly
        # (error path only) so that a camera being removed is reported as vanished.
        for _ in range(10):
            time.sleep(0.025)
            try:
                if camera not in core.getLoadedDevices() or not core.getCameraDevice():
                    return "the camera device vanished (it is no longer loaded in the core)"
            except Exception as exc:  # noqa: BLE001
                return f"the camera vanished ({type(exc).__name__}: {exc})"
    text = f"camera {camera!r} stopped its sequence acquisition by itself"
    return f"{text}: {detail}" if detail else text


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _t_acquired(md: Mapping[str, Any]) -> float:
    own = md.get(T_ACQUIRED_KEY)
    if own is not None:
        try:
            return float(own)
        except (TypeError, ValueError):
            pass
    received = md.get("TimeReceivedByCore")
    if isinstance(received, str):
        try:
            return datetime.fromisoformat(received).timestamp()
        except ValueError:
            pass
    return time.time()


def _release(core: UniMMCore) -> None:
    """Release a core so that nothing aborts at interpreter exit (SCIENCE.md pitfall)."""
    try:
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    except Exception:  # noqa: BLE001
        pass
    try:
        core.mda.events.frameReady.disconnect()
        core.mda.events.sequenceFinished.disconnect()
    except Exception:  # noqa: BLE001
        pass
    try:
        core.unloadAllDevices()
    except Exception:  # noqa: BLE001
        pass


# -- files -------------------------------------------------------------------------------------


class FileSource:
    """A multi-page TIFF / OME-TIFF, frame by frame (memory-mapped when the file allows it).

    With ``replay_fps`` frames are paced like a live camera (and may be dropped downstream);
    without, they are read as fast as the pipeline takes them and nothing is dropped. A page
    that does not decode (corrupt compressed data, a page of another shape) is reported with
    :meth:`FrameSink.source_error` (action ``skip_frame``) and counted missed, reason
    ``source_error``; the replay goes on with the next page.
    """

    def __init__(self, path: str | Path, replay_fps: float | None = None, frames_limit: int | None = None) -> None:
        self.path = Path(path)
        self.replay_fps = replay_fps
        self.frames_limit = frames_limit
        self.finished = threading.Event()
        self.error: str | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames: Any = None
        self._tif: Any = None
        self.n_frames = 0
        self.frames_delivered = 0
        self.frames_skipped = 0

    def open(self) -> SourceDescription:
        import tifffile

        if not self.path.is_file():
            raise InputError(f"no such file: {str(self.path)!r}")
        try:
            tif = tifffile.TiffFile(self.path)
            series = tif.series[0]
            shape = tuple(series.shape)
        except Exception as exc:
            raise InputError(f"{str(self.path)!r} is not a readable TIFF: {exc}") from None
        if len(shape) < 2:
            tif.close()
            raise InputError(f"{str(self.path)!r}: expected 2-D frames, the image has shape {shape}")
        if series.dtype.kind not in "uif" or (len(shape) >= 3 and shape[-1] in (3, 4) and series.keyframe.samplesperpixel > 1):
            tif.close()
            raise InputError(f"{str(self.path)!r}: only single-channel grey images are supported (shape {shape}, dtype {series.dtype})")
        height, width = shape[-2:]
        frames: np.ndarray | _PageReader
        try:
            frames = tifffile.memmap(self.path, mode="r").reshape(-1, height, width)
        except (ValueError, OSError):
            frames = _PageReader(series, height, width)
        self._tif = tif
        self._frames = frames
        self.n_frames = len(frames)
        if self.n_frames == 0:
            raise InputError(f"{str(self.path)!r} holds no frames")
        return SourceDescription(
            kind="file", detail=str(self.path), width_px=int(width), height_px=int(height),
            dtype=str(series.dtype), mode="replay",
        )

    def start(self, sink: FrameSink) -> None:
        self._thread = threading.Thread(target=self._read, args=(sink,), name="scopestream-file", daemon=True)
        self._thread.start()

    def _read(self, sink: FrameSink) -> None:
        n = self.n_frames if self.frames_limit is None else min(self.n_frames, self.frames_limit)
        period_s = 1.0 / self.replay_fps if self.replay_fps else 0.0
        t0 = time.perf_counter()
        paused_s = 0.0
        try:
            for i in range(n):
                while self._paused.is_set() and not self._stop.is_set():
                    t_pause = time.perf_counter()
                    time.sleep(0.01)
                    paused_s += time.perf_counter() - t_pause
                if self._stop.is_set():
                    return
                if period_s:
                    delay = t0 + paused_s + i * period_s - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                try:
                    image = np.asarray(self._frames[i])
                except Exception as exc:  # a page that does not decode: skip it, count it
                    self._skip_frame(sink, i, exc)
                    continue
                self.frames_delivered += 1
                sink.deliver(image, time.time(), i, {"file_index": i})
        except Exception as exc:
            self.error = f"cannot read frame from {str(self.path)!r}: {exc}"
            log.error("%s", self.error)
            sink.source_error(SourceErrorBody(
                source_kind="file", error=self.error, frames_delivered=self.frames_delivered,
                action="stop", reconnecting=False, reconnect_attempt=0, reconnect_attempts_max=0,
            ))
        finally:
            self.finished.set()

    def _skip_frame(self, sink: FrameSink, index: int, exc: Exception) -> None:
        """Report a frame that cannot be read, then count it dropped (reason ``source_error``)."""
        self.frames_skipped += 1
        message = f"{str(self.path)!r}: frame {index} cannot be read: {type(exc).__name__}: {exc}"
        if self.frames_skipped <= 10 or self.frames_skipped % 1000 == 0:
            log.warning("%s (%d unreadable so far)", message, self.frames_skipped)
        sink.source_error(SourceErrorBody(
            source_kind="file", error=message, frames_delivered=self.frames_delivered,
            action="skip_frame", reconnecting=False, reconnect_attempt=0, reconnect_attempts_max=0,
            frame_index=index,
        ))
        sink.missed(1, "source_error", index)

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def set_exposure_ms(self, exposure_ms: float) -> None:
        raise ValueError("a recorded file has no exposure to change")

    def actuators(self) -> Actuators:
        """None: a recorded file has no hardware to drive."""
        return NoActuators(f"recorded file {self.path.name!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def close(self) -> None:
        self._frames = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None


class _PageReader:
    """Frame access for TIFFs that cannot be memory-mapped (compressed, tiled, ...)."""

    def __init__(self, series: Any, height: int, width: int) -> None:
        self._pages = series.pages
        self._shape = (height, width)

    def __len__(self) -> int:
        return len(self._pages)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._pages[i].asarray()).reshape(self._shape)
