"""The simulated cameras and stage as Micro-Manager Python devices (pymmcore-plus UniMMCore).

Load them with the shipped configuration files (see :func:`scopestream.sim_camera.config_path`)::

    from pymmcore_plus.experimental.unicore import UniMMCore
    core = UniMMCore()
    core.loadSystemConfiguration(config_path("simulated-widefield"))

or with ``#py pyDevice,<label>,scopestream.sim_camera.devices,<Class>`` lines of your own.

Devices
-------
:class:`SimulatedWidefieldCamera`, :class:`SimulatedScanningCamera`
    Cameras that pace themselves: frame ``i`` of a sequence is delivered at ``start + (i + 1) *
    period`` (absolute deadlines, no drift; the period is the frame interval, at least the
    exposure; for the scanning camera the frame scan time). A frame is made at the start of its
    exposure, ``exposure`` before its delivery, with the stage position of that moment, so a
    stage move shows in the first frame whose exposure starts after it (one frame of loop delay,
    as on a real camera with instantaneous readout). The scene carries on across sequences
    and snaps; simulation time advances one frame period per frame whatever the wall clock does.
:class:`SimulatedZStage`
    A focus (Z) stage. The cameras follow every ``stagePositionChanged`` event of their core
    (from this stage or any other Z stage the core drives): the focal plane
    sits at world z = the stage position, and a particle at defocus dz is imaged with a PSF of
    sigma0 sqrt(1 + (dz / z_R)²) (widefield; ``simulation.psf_rayleigh_nm``) or excited less
    (scanning, the axial excitation profile). Travel ±100 µm (a piezo objective drive).
:class:`SimulatedShutter`
    The excitation shutter (open when loaded). The cameras follow it: while it is closed their
    frames are dark (camera offset, background and noise, no particle photons; truth photons 0)
    and the scene carries on.
:class:`SimulatedXYStage`
    An XY stage (travel ±10 mm, reported in the properties ``TravelXMinUm`` ... ``TravelYMaxUm``). Moving it moves the field of view over the simulated sample: the camera follows
    every ``XYStagePositionChanged`` event of its core (from this stage or any other XY stage the
    core drives), so a particle at world position X appears at column ``(X - stage_x) /
    pixel_size - 0.5``: moving the stage by +1 µm moves the image content by -1000 / pixel_size_nm px.

Camera properties
-----------------
``SimulationJSON`` (string)
    JSON of ``{"simulation": {...}, "optics": {...}, "camera": {...}, "acquisition": {...}}``,
    the sections of the daemon configuration (``config_to_dict(config)``; other keys ignored).
    Setting it validates everything (an error names the key) and rebuilds the scene.
``Seed`` (integer)
    Random seed; setting it rebuilds the scene. Same JSON and seed, same frames and truth.
``FrameIntervalMs`` (widefield)
    Time from one frame's start to the next, ms (at least the exposure); the rate switch of
    event-driven acquisition. Takes effect at the next frame.
``Exposure``
    Widefield: exposure in ms (the frame interval stretches to at least the exposure; the scene
    carries on). Scanning: the frame scan time, fixed by the scan settings (setting it is
    ignored, so that a client's generic ``setExposure`` does not fail).
``FailAfterFrames`` (integer, default 0 = never; for tests)
    Failure injection: the camera raises :class:`SimulatedCameraFailure` when it is asked for
    a frame after delivering this many (counted over all sequences and snaps since the
    property was last set). A sequence acquisition then ends the way a failing driver ends
    it: the acquisition thread dies, ``isSequenceRunning()`` turns False. Set it in a
    configuration file (``Property,Camera,FailAfterFrames,50``) or with ``setProperty``;
    setting it again re-arms the count.
``LastError`` (string, read-only)
    The text of the last failure the camera raised ('' if none), so that a client that only
    sees a sequence stop can say why.
``DeviceId`` (string, read-only)
    A unique token of this device object; :func:`simulated_device` uses it to find the
    object behind a label through the public property API.

Ground truth (a side channel, never in the image)
-------------------------------------------------
Every frame's metadata carries these string-valued keys:

- ``scopestream_truth``: compact column-wise JSON of that frame's truth rows
  (:func:`scopestream.sim_camera.truth_from_json` turns it back into the structured array);
- ``scopestream_frame`` (simulation frame index), ``scopestream_frame_start_ms`` (simulation
  time of the start of the exposure / scan), ``scopestream_exposure_ms``,
  ``scopestream_frame_period_ms``, ``scopestream_saturated_px``, ``scopestream_stage_x_um``,
  ``scopestream_stage_y_um``, ``scopestream_kind``, ``scopestream_seed``,
  ``scopestream_t_acquired_s`` (the camera's time stamp: the frame's scheduled delivery time,
  Unix s; sequence acquisition only), ``scopestream_t_exposed_s`` (when the frame was made, Unix
  s: the start of its exposure, ``exposure_ms`` before delivery; the stage position then is the
  one in the frame; sequence acquisition only);
- scanning camera also ``scopestream_line_period_ms``, ``scopestream_dwell_us``,
  ``scopestream_retrace_ms`` (row r starts at ``frame_start + r * line_period``).

Metadata reaches clients through sequence acquisition (``popNextImageAndMD``; an MDA with hardware
sequencing puts it under ``camera_metadata``). ``snapImage`` drops camera metadata in UniMMCore,
so the camera also keeps a bounded queue of ``(frame, truth)`` pairs: ``camera.truth_queue``
(``collections.deque``, newest ``truth_queue_frames`` frames) and ``camera.pop_truth()``;
:func:`simulated_device` finds the device object behind a label.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
from pymmcore_plus.experimental.unicore import (
    CameraDevice,
    ShutterDevice,
    StageDevice,
    XYStageDevice,
)

from scopestream.daemon._config import ConfigError, build_config
from scopestream.sim_camera._scanning import ScanningSimulator
from scopestream.sim_camera._settings import physics_from_config
from scopestream.sim_camera._truth import truth_to_json
from scopestream.sim_camera._widefield import WidefieldSimulator

if TYPE_CHECKING:
    from numpy.typing import DTypeLike
    from pymmcore_plus.experimental.unicore import UniMMCore

__all__ = [
    "SimulatedCameraFailure",
    "SimulatedScanningCamera",
    "SimulatedShutter",
    "SimulatedWidefieldCamera",
    "SimulatedXYStage",
    "SimulatedZStage",
    "simulated_device",
]

logger = logging.getLogger(__name__)

_SECTIONS = ("simulation", "optics", "camera", "acquisition")
_RESYNC_AFTER_S = 1.0  # further behind than this, restart the deadlines instead of bursting
# The property a SimulatedShutter announces its state with (propertyChanged): the cameras listen
# for this name only, so no other device's property is taken for the shutter.
SHUTTER_PROPERTY = "ScopestreamShutterOpen"


# Every simulated camera object by its DeviceId; weak, so an unloaded device goes away.
_DEVICES: weakref.WeakValueDictionary[str, _SimulatedCamera] = weakref.WeakValueDictionary()
DEVICE_ID_PROPERTY = "DeviceId"


class SimulatedCameraFailure(RuntimeError):
    """Raised by a simulated camera whose ``FailAfterFrames`` count is reached."""


def simulated_device(core: UniMMCore, label: str | None = None) -> _SimulatedCamera:
    """The simulated camera object loaded under ``label`` (default: the current camera).

    Tests and tools use it to reach a simulated camera's truth queue. The object is found
    through the camera's read-only ``DeviceId`` property (the core's public property API).

    Raises
    ------
    LookupError
        If ``label`` is not a scopestream simulated camera loaded in ``core``.
    """
    label = label or core.getCameraDevice()
    loaded = list(core.getLoadedDevices())
    if label not in loaded or not core.hasProperty(label, DEVICE_ID_PROPERTY):
        raise LookupError(
            f"{label!r} is not a scopestream simulated camera in this core (loaded devices: {loaded})"
        )
    device = _DEVICES.get(str(core.getProperty(label, DEVICE_ID_PROPERTY)))
    if device is None:  # pragma: no cover - the property outlived its device
        raise LookupError(f"the simulated camera behind {label!r} is gone")
    return device


class _SimulatedCamera(CameraDevice):
    """Shared machinery of the simulated cameras: settings, scene rebuild, pacing, truth."""

    _KIND: ClassVar[str] = "widefield"
    truth_queue_frames: int = 1000

    def __init__(self) -> None:
        super().__init__()
        self._sim_lock = threading.Lock()
        self._settings_json = "{}"
        self._seed = 0
        self._stage_um = (0.0, 0.0)
        # (perf_counter s, x_um, y_um) of recent moves: a frame shows the stage where it was at
        # the scheduled start of its exposure even when the camera's thread wakes late.
        self._stage_moves: deque[tuple[float, float, float]] = deque(maxlen=256)
        self._stage_before_moves = (0.0, 0.0)  # where the stage was before the oldest of them
        self._focus_um = 0.0
        self._shutter_open = True
        self.truth_queue: deque[tuple[int, np.ndarray]] = deque(maxlen=self.truth_queue_frames)
        self._sections: dict[str, Any] = {}
        self._simulator: WidefieldSimulator | ScanningSimulator = self._build({})
        self.register_property(
            "SimulationJSON", default_value="{}", property_type=str,
            getter=type(self)._get_simulation_json, setter=type(self)._set_simulation_json,
        )
        self.register_property(
            "Seed", default_value=0, property_type=int, limits=(0, 2**31 - 1),
            getter=type(self)._get_seed, setter=type(self)._set_seed,
        )
        self.register_property("Kind", default_value=self._KIND, property_type=str, is_read_only=True)
        self._fail_after_frames = 0
        self._frames_since_armed = 0
        self._last_error = ""
        self.register_property(
            "FailAfterFrames", default_value=0, property_type=int, limits=(0, 2**31 - 1),
            getter=type(self)._get_fail_after, setter=type(self)._set_fail_after,
        )
        self.register_property(
            "LastError", default_value="", property_type=str, is_read_only=True,
            getter=type(self)._get_last_error,
        )
        device_id = uuid.uuid4().hex
        self.register_property(
            DEVICE_ID_PROPERTY, default_value=device_id, property_type=str, is_read_only=True,
        )
        _DEVICES[device_id] = self

    # -- settings --------------------------------------------------------------------------

    def _build(self, sections: Mapping[str, Any]) -> WidefieldSimulator | ScanningSimulator:
        config = build_config({k: sections[k] for k in _SECTIONS if k in sections})
        physics = physics_from_config(config)
        simulator: WidefieldSimulator | ScanningSimulator
        if self._KIND == "scanning":
            simulator = ScanningSimulator(physics, self._seed)
        else:
            simulator = WidefieldSimulator(physics, self._seed)
        simulator.set_stage_position_nm(self._stage_um[0] * 1000.0, self._stage_um[1] * 1000.0)
        simulator.set_focus_nm(self._focus_um * 1000.0)
        simulator.shutter_open = self._shutter_open
        return simulator

    def _rebuild(self, sections: Mapping[str, Any]) -> None:
        simulator = self._build(sections)
        with self._sim_lock:
            self._sections = dict(sections)
            self._simulator = simulator
            self.truth_queue.clear()

    def _get_simulation_json(self) -> str:
        return self._settings_json

    def _set_simulation_json(self, value: str) -> None:
        text = str(value).strip() or "{}"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"SimulationJSON is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"SimulationJSON must be a JSON object, got {type(data).__name__}")
        self._rebuild(data)
        self._settings_json = text

    def _get_seed(self) -> int:
        return self._seed

    def _set_seed(self, value: int) -> None:
        seed = int(value)
        if seed < 0:
            raise ConfigError(f"Seed must be a non-negative integer, got {value!r}")
        self._seed = seed
        self._rebuild(self._sections)

    def _get_fail_after(self) -> int:
        return self._fail_after_frames

    def _set_fail_after(self, value: int) -> None:
        frames = int(value)
        if frames < 0:
            raise ConfigError(f"FailAfterFrames must be a non-negative integer, got {value!r}")
        self._fail_after_frames = frames
        self._frames_since_armed = 0

    def _get_last_error(self) -> str:
        return self._last_error

    def _check_injected_failure(self) -> None:
        """Raise if the armed failure is due (called before each frame is made)."""
        if self._fail_after_frames and self._frames_since_armed >= self._fail_after_frames:
            self._last_error = (
                f"injected failure: FailAfterFrames={self._fail_after_frames} reached "
                f"(camera {self.get_label()!r})"
            )
            raise SimulatedCameraFailure(self._last_error)
        self._frames_since_armed += 1

    @property
    def simulator(self) -> WidefieldSimulator | ScanningSimulator:
        """The simulator behind the device (replaced when settings or seed change)."""
        return self._simulator

    # -- lifecycle ---------------------------------------------------------------------------

    def initialize(self) -> None:
        """Follow the core's XY and focus stage moves."""
        signal = self.core.events.XYStagePositionChanged
        cast("Any", signal).connect(self._on_stage_moved)
        cast("Any", self.core.events.stagePositionChanged).connect(self._on_focus_moved)
        cast("Any", self.core.events.propertyChanged).connect(self._on_property_changed)

    def shutdown(self) -> None:
        """Stop following the stages."""
        for signal, slot in ((self.core.events.XYStagePositionChanged, self._on_stage_moved),
                             (self.core.events.stagePositionChanged, self._on_focus_moved),
                             (self.core.events.propertyChanged, self._on_property_changed)):
            try:
                cast("Any", signal).disconnect(slot)
            except Exception:  # noqa: BLE001 - not connected, or the core is already gone
                pass

    def _on_focus_moved(self, label: str, z_um: float) -> None:
        # Every Z stage of the core moves the focal plane (as every XY stage moves the field);
        # the device's core proxy cannot tell which one is the focus device.
        self._focus_um = float(z_um)
        with self._sim_lock:
            self._simulator.set_focus_nm(float(z_um) * 1000.0)

    def _on_property_changed(self, label: str, name: str, value: object) -> None:
        if name != SHUTTER_PROPERTY:
            return
        self._shutter_open = str(value) == "1"
        with self._sim_lock:
            self._simulator.shutter_open = self._shutter_open

    def _on_stage_moved(self, label: str, x_um: float, y_um: float) -> None:
        self._stage_um = (float(x_um), float(y_um))
        with self._sim_lock:
            if len(self._stage_moves) == self._stage_moves.maxlen:
                self._stage_before_moves = self._stage_moves[0][1:]
            self._stage_moves.append((time.perf_counter(), float(x_um), float(y_um)))
            self._simulator.set_stage_position_nm(float(x_um) * 1000.0, float(y_um) * 1000.0)

    # -- camera API --------------------------------------------------------------------------

    def shape(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return self._simulator.shape

    def dtype(self) -> DTypeLike:
        """uint16."""
        return np.uint16

    def pop_truth(self) -> list[tuple[int, np.ndarray]]:
        """Remove and return the queued ``(frame, truth)`` pairs, oldest first."""
        out = []
        while True:
            try:
                out.append(self.truth_queue.popleft())
            except IndexError:
                return out

    def start_sequence(
        self, n: int | None, get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]
    ) -> Iterator[Mapping]:
        """Simulate frames into the core's buffers, paced at the frame period.

        Each frame is stamped with the camera's own clock (``scopestream_t_acquired_s``, Unix
        s): its scheduled delivery time, as a hardware time stamp would be, so frame intervals
        are exact even when the thread that delivers them is late."""
        clock_offset_s = time.time() - time.perf_counter()
        deadline = time.perf_counter()
        produced = 0
        while n is None or produced < n:
            self._check_injected_failure()
            with self._sim_lock:
                period_s = self._simulator.frame_period_ms / 1000.0
                exposure_s = self._simulator.exposure_ms / 1000.0
            deadline += period_s
            # The frame is exposed during the last exposure_s before its delivery (readout is
            # instantaneous here), so it is made then, with the stage where it is at the start
            # of that exposure: a stage move done before it shows in this frame, one done later
            # in the next. Making it a whole period ahead would add a frame of loop delay that
            # no real camera has. (Rendering takes well under a millisecond at 64 x 64 px.)
            delay = deadline - exposure_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -_RESYNC_AFTER_S:
                deadline = time.perf_counter() + exposure_s
            t_exposed = deadline - exposure_s
            with self._sim_lock:
                simulator = self._simulator
                start_ms = simulator.next_frame_start_ms
                stage_x_um, stage_y_um = self._stage_at(t_exposed)
                buffer = get_buffer(simulator.shape, np.uint16)
                if (stage_x_um, stage_y_um) != self._stage_um:  # moved since the exposure began
                    simulator.set_stage_position_nm(stage_x_um * 1000.0, stage_y_um * 1000.0)
                    _, truth = simulator.next_frame(buffer)
                    simulator.set_stage_position_nm(self._stage_um[0] * 1000.0, self._stage_um[1] * 1000.0)
                else:
                    _, truth = simulator.next_frame(buffer)
                frame = simulator.frame_index - 1
                if not simulator.shutter_open:
                    truth["photons"] = 0.0  # the particles are there, but send no light
                metadata = self._metadata(simulator, frame, start_ms, truth, stage_x_um, stage_y_um)
                self.truth_queue.append((frame, truth))
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            metadata["scopestream_t_exposed_s"] = repr(t_exposed + clock_offset_s)
            metadata["scopestream_t_acquired_s"] = repr(deadline + clock_offset_s)
            produced += 1
            yield metadata

    def _stage_at(self, t_perf_s: float) -> tuple[float, float]:
        """The XY stage position at ``t_perf_s`` (perf_counter s); call with the lock held."""
        for t, x, y in reversed(self._stage_moves):
            if t <= t_perf_s:
                return x, y
        return self._stage_before_moves

    def _metadata(
        self,
        simulator: WidefieldSimulator | ScanningSimulator,
        frame: int,
        start_ms: float,
        truth: np.ndarray,
        stage_x_um: float,
        stage_y_um: float,
    ) -> dict[str, str]:
        meta = {
            "scopestream_kind": self._KIND,
            "scopestream_seed": str(self._seed),
            "scopestream_frame": str(frame),
            "scopestream_frame_start_ms": repr(float(start_ms)),
            "scopestream_exposure_ms": repr(float(simulator.exposure_ms)),
            "scopestream_frame_period_ms": repr(float(simulator.frame_period_ms)),
            "scopestream_saturated_px": str(simulator.last_saturated_px),
            "scopestream_stage_x_um": repr(stage_x_um),
            "scopestream_stage_y_um": repr(stage_y_um),
            "scopestream_truth": truth_to_json(truth),
        }
        if isinstance(simulator, ScanningSimulator):
            sim = simulator.physics.sim
            meta["scopestream_line_period_ms"] = repr(float(simulator.line_period_ms))
            meta["scopestream_dwell_us"] = repr(float(sim.scan_dwell_us))
            meta["scopestream_retrace_ms"] = repr(float(sim.scan_retrace_ms))
        return meta


class SimulatedWidefieldCamera(_SimulatedCamera):
    """A widefield sCMOS/EMCCD camera over a simulated sample with exact ground truth."""

    _KIND = "widefield"

    def __init__(self) -> None:
        super().__init__()
        self.register_property(
            "FrameIntervalMs", default_value=10.0, property_type=float, limits=(0.01, 1e6),
            getter=type(self)._get_frame_interval_ms, setter=type(self)._set_frame_interval_ms,
        )

    def _get_frame_interval_ms(self) -> float:
        return float(self._simulator.physics.frame_interval_ms)

    def _set_frame_interval_ms(self, value: float) -> None:
        with self._sim_lock:
            simulator = self._simulator
            assert isinstance(simulator, WidefieldSimulator)
            simulator.set_timing(simulator.exposure_ms, float(value))

    def get_exposure(self) -> float:
        """Exposure time, ms."""
        return float(self._simulator.exposure_ms)

    def set_exposure(self, exposure: float) -> None:
        """Set the exposure, ms; the frame interval stretches to at least the exposure."""
        value = float(exposure)
        with self._sim_lock:
            simulator = self._simulator
            assert isinstance(simulator, WidefieldSimulator)
            simulator.set_timing(value, simulator.physics.frame_interval_ms)


class SimulatedScanningCamera(_SimulatedCamera):
    """A raster-scanning two-photon microscope over a simulated sample with exact ground truth."""

    _KIND = "scanning"

    def get_exposure(self) -> float:
        """Frame scan time, ms."""
        return float(self._simulator.exposure_ms)

    def set_exposure(self, exposure: float) -> None:
        """Ignored: the frame time follows from the scan (``simulation.scan_dwell_us`` and
        ``scan_retrace_ms`` through ``SimulationJSON``); ``getExposure`` reports it."""
        logger.debug(
            "%s: exposure %s ms ignored; the scan takes %s ms", self.get_label(), exposure,
            self._simulator.exposure_ms,
        )


class SimulatedXYStage(XYStageDevice):
    """An XY stage that moves the simulated cameras' field of view (positions in µm).

    Moves are instantaneous. Zeroing the origin is not supported: the reported position is the
    physical one, which the cameras rely on.
    """

    TRAVEL_UM = 10_000.0

    def __init__(self) -> None:
        super().__init__()
        self._x_um = 0.0
        self._y_um = 0.0
        for name, value in (("TravelXMinUm", -self.TRAVEL_UM), ("TravelXMaxUm", self.TRAVEL_UM),
                            ("TravelYMinUm", -self.TRAVEL_UM), ("TravelYMaxUm", self.TRAVEL_UM)):
            self.register_property(name, default_value=value, property_type=float, is_read_only=True)

    def set_position_um(self, x: float, y: float) -> None:
        """Move to (x, y) µm and tell the core (and so the cameras)."""
        self._x_um, self._y_um = float(x), float(y)
        self.core.events.XYStagePositionChanged.emit(self.get_label(), self._x_um, self._y_um)

    def get_position_um(self) -> tuple[float, float]:
        """Current (x, y), µm."""
        return self._x_um, self._y_um

    def home(self) -> None:
        """Go to (0, 0)."""
        self.set_position_um(0.0, 0.0)

    def stop(self) -> None:
        """Moves are instantaneous; nothing to stop."""

    def set_origin(self) -> None:
        """Not supported (the cameras need physical positions)."""
        raise NotImplementedError("SimulatedXYStage cannot zero its origin")

    def set_origin_x(self) -> None:
        """Not supported."""
        raise NotImplementedError("SimulatedXYStage cannot zero its origin")

    def set_origin_y(self) -> None:
        """Not supported."""
        raise NotImplementedError("SimulatedXYStage cannot zero its origin")


class SimulatedShutter(ShutterDevice):
    """The excitation shutter of the simulated cameras: closed, their frames are dark (camera
    offset, background and noise; no particle photons, truth ``photons`` 0) while the scene
    carries on. Open when loaded (the light is on), so a configuration without a shutter and
    one with it image the same. The cameras follow its ``ScopestreamShutterOpen`` property."""

    def __init__(self) -> None:
        super().__init__()
        self._open = True
        self.register_property(SHUTTER_PROPERTY, default_value="1", property_type=str, is_read_only=True,
                               getter=type(self)._get_state)

    def _get_state(self) -> str:
        return "1" if self._open else "0"

    def get_open(self) -> bool:
        """True when the light reaches the sample."""
        return self._open

    def set_open(self, open: bool) -> None:
        """Open or close; the cameras' next frame shows it."""
        self._open = bool(open)
        self.core.events.propertyChanged.emit(self.get_label(), SHUTTER_PROPERTY, self._get_state())


class SimulatedZStage(StageDevice):
    """A focus (Z) stage for the simulated cameras (positions in µm, travel ±100 µm).

    Moves are instantaneous; the cameras follow it when it is the core's focus device.
    """

    TRAVEL_UM = 100.0

    def __init__(self) -> None:
        super().__init__()
        self._z_um = 0.0
        self.register_property("TravelMinUm", default_value=-self.TRAVEL_UM, property_type=float, is_read_only=True)
        self.register_property("TravelMaxUm", default_value=self.TRAVEL_UM, property_type=float, is_read_only=True)

    def set_position_um(self, val: float) -> None:
        """Move to z µm and tell the core (and so the cameras)."""
        z = float(val)
        if not -self.TRAVEL_UM <= z <= self.TRAVEL_UM:
            raise ValueError(f"SimulatedZStage: {z} µm is outside its travel ±{self.TRAVEL_UM:g} µm")
        self._z_um = z
        self.core.events.stagePositionChanged.emit(self.get_label(), self._z_um)

    def get_position_um(self) -> float:
        """Current z, µm."""
        return self._z_um

    def home(self) -> None:
        """Go to 0."""
        self.set_position_um(0.0)

    def stop(self) -> None:
        """Moves are instantaneous; nothing to stop."""

    def set_origin(self) -> None:
        """Not supported (the cameras need physical positions)."""
        raise NotImplementedError("SimulatedZStage cannot zero its origin")
