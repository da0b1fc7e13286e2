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
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from scopestream.daemon._actuators import ActionError, Actuators, MicroManagerActuators, NoActuators
from scopestream.daemon._config import ConfigError, ScopestreamConfig, config_to_dict
from scopestream.daemon._errors import InputError
from scopestream.daemon._messages import SourceDescription

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


@runtime_checkable
class FrameSource(Protocol):
    """A camera or a file. ``open`` connects, ``start`` begins delivering on the source's own thread.

    ``finished`` is set when the source ends by itself (frame limit, end of file, camera error);
    ``error`` then says why, if it was an error.
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
    """

    def __init__(self, config: ScopestreamConfig) -> None:
        self._config = config
        self._core: UniMMCore | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._sink: FrameSink | None = None
        self._mda_done = threading.Event()
        self.finished = threading.Event()
        self.error: str | None = None
        self._last_image_number: int | None = None
        self._overflow_pending = False

    # lifecycle ---------------------------------------------------------------------------
    def open(self) -> SourceDescription:
        from pymmcore_plus.experimental.unicore import UniMMCore

        src = self._config.source
        cfg_path, adapter_paths = resolve_mm_config(src.mm_config)
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
        if core.hasProperty(camera, SIMULATION_PROPERTY):
            core.setProperty(camera, SIMULATION_PROPERTY, json.dumps(config_to_dict(self._config)))
        core.setExposure(self._config.acquisition.exposure_ms)
        self._core = core
        dtype = {1: "uint8", 2: "uint16", 4: "uint32"}.get(core.getBytesPerPixel(), "uint16")
        return SourceDescription(
            kind="micromanager",
            detail=str(cfg_path),
            camera=camera,
            width_px=core.getImageWidth(),
            height_px=core.getImageHeight(),
            dtype=dtype,
            mode=src.mode,
        )

    def start(self, sink: FrameSink) -> None:
        assert self._core is not None, "open() first"
        self._sink = sink
        if self._config.source.mode == "mda":
            self._start_mda()
        else:
            self._start_sequence()
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
        assert self._core is not None
        self._core.setExposure(exposure_ms)

    def stop(self) -> None:
        core = self._core
        if core is None:
            return
        self._stop.set()
        if self._config.source.mode == "mda":
            if core.mda.is_running():
                core.mda.cancel()
            self._mda_done.wait(timeout=10)
        elif self._thread is not None:
            self._thread.join(timeout=10)

    def close(self) -> None:
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
    def _start_sequence(self) -> None:
        assert self._core is not None
        limit = self._config.source.frames_limit
        self._last_image_number = None
        if limit is None:
            self._core.startContinuousSequenceAcquisition(0)
        else:
            self._core.startSequenceAcquisition(limit, 0, False)

    def _drain(self) -> None:
        core = self._core
        sink = self._sink
        assert core is not None and sink is not None
        poll_s = self._config.source.poll_interval_ms / 1000.0
        acquiring = True
        try:
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
                    self._start_sequence()
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
                    if self._config.source.frames_limit is None:
                        self.error = "the camera stopped its sequence acquisition by itself"
                    return
                time.sleep(poll_s)
        except Exception as exc:  # the camera vanished or the adapter failed
            self.error = f"camera error: {type(exc).__name__}: {exc}"
            log.error("%s", self.error)
        finally:
            try:
                if core.isSequenceRunning():
                    core.stopSequenceAcquisition()
            except Exception:  # noqa: BLE001 - already failing; keep the first error
                pass
            self.finished.set()

    def _pop(self, core: UniMMCore, sink: FrameSink) -> None:
        image, raw_md = core.popNextImageAndMD()
        md = dict(raw_md)  # pymmcore's Metadata.get raises on a missing key
        number = _int_or_none(md.get("ImageNumber"))
        if number is not None:
            last = self._last_image_number
            if last is not None and number > last + 1:
                reason = "camera_overflow" if self._overflow_pending else "camera_gap"
                sink.missed(number - last - 1, reason, number)
            self._overflow_pending = False
            self._last_image_number = number
        sink.deliver(image, _t_acquired(md), number, md)

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
        self._sink.deliver(image, t_acq, number, {"mda_index": index, **(meta if isinstance(meta, Mapping) else {})})

    def _on_mda_finished(self, *args: Any) -> None:
        self._mda_done.set()
        self.finished.set()


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
    without, they are read as fast as the pipeline takes them and nothing is dropped.
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
                image = np.asarray(self._frames[i])
                sink.deliver(image, time.time(), i, {"file_index": i})
        except Exception as exc:
            self.error = f"cannot read frame from {str(self.path)!r}: {exc}"
            log.error("%s", self.error)
        finally:
            self.finished.set()

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
