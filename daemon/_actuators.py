"""Actuators: what an experiment can do to the microscope, with limits, executed one at a time.

Three parts:

- **Requests** (:data:`ActionRequest`): frozen pydantic models, a tagged union on ``action``
  (``move_xy``, ``move_z``, ``set_exposure``, ``set_interval``, ``shutter``,
  ``pause_acquisition``, ``resume_acquisition``, ``stop_acquisition``, ``run_mda``, ``mark``).
  The control channel's ``act`` command and the rules' ``do`` both produce one.
- **Actuators** (:class:`Actuators`): the hardware side, declared by each source
  (``source.actuators()``). :class:`MicroManagerActuators` drives a pymmcore-plus core (the
  DemoCamera's stages and shutter, scopestream's simulated stages); a source that lacks an
  actuator raises :class:`ActuatorUnavailable` naming it.
- **The action service** (:class:`ActionService`): checks a request against ``limits`` (travel
  box, largest step, highest rate per actuator; a refusal names the limit), runs it, and publishes
  every action, done or refused, on topic ``action`` with its latencies. ``stop_acquisition``
  always wins: once asked, every later request except another stop is refused.

Units are in the names: µm for stage positions, ms for times, Hz for rates.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from scopestream.daemon._messages import ActionBody

if TYPE_CHECKING:
    from pymmcore_plus.experimental.unicore import UniMMCore

log = logging.getLogger(__name__)

DEFAULT_TRAVEL_UM = 25_000.0  # ±25 mm when a stage reports no limits of its own

ACTIONS = (
    "move_xy", "move_z", "set_exposure", "set_interval", "shutter",
    "pause_acquisition", "resume_acquisition", "stop_acquisition", "run_mda", "mark",
)


# -- requests ------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class MoveXY(_Request):
    """Move the XY stage: by (x_um, y_um) when ``relative``, else to (x_um, y_um)."""

    action: Literal["move_xy"] = "move_xy"
    x_um: float = Field(description="X target or step, µm.")
    y_um: float = Field(description="Y target or step, µm.")
    relative: bool = Field(True, description="True: a step from the current position; False: an absolute position.")


class MoveZ(_Request):
    """Move the focus (Z) stage: by z_um when ``relative``, else to z_um."""

    action: Literal["move_z"] = "move_z"
    z_um: float = Field(description="Z target or step, µm.")
    relative: bool = Field(True, description="True: a step from the current position; False: an absolute position.")


class SetExposure(_Request):
    """Set the camera exposure."""

    action: Literal["set_exposure"] = "set_exposure"
    exposure_ms: float = Field(gt=0, description="Exposure time, ms.")


class SetInterval(_Request):
    """Set the time between frames (the frame-rate switch of event-driven acquisition)."""

    action: Literal["set_interval"] = "set_interval"
    frame_interval_ms: float = Field(gt=0, description="Time from one frame's start to the next's, ms.")


class Shutter(_Request):
    """Open or close the shutter."""

    action: Literal["shutter"] = "shutter"
    open: bool = Field(description="True opens, False closes.")


class PauseAcquisition(_Request):
    """Pause the acquisition (as the control channel's ``pause``)."""

    action: Literal["pause_acquisition"] = "pause_acquisition"


class ResumeAcquisition(_Request):
    """Resume a paused acquisition."""

    action: Literal["resume_acquisition"] = "resume_acquisition"


class StopAcquisition(_Request):
    """End the run (as ``stop``); always allowed, and after it nothing else is."""

    action: Literal["stop_acquisition"] = "stop_acquisition"


class RunMda(_Request):
    """Run a useq-schema MDA sequence at the current position, then go back to continuous acquisition."""

    action: Literal["run_mda"] = "run_mda"
    sequence: dict[str, Any] = Field(description="A useq.MDASequence as JSON (e.g. a time_plan burst or a z_plan stack).")

    @field_validator("sequence")
    @classmethod
    def _valid_sequence(cls, value: dict[str, Any]) -> dict[str, Any]:
        import useq

        try:
            seq = useq.MDASequence.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"not a valid useq MDASequence: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if seq.stage_positions:
            raise ValueError("run_mda runs at the current position; the sequence must not list stage_positions")
        return value


class Mark(_Request):
    """An annotation: only goes into the event stream."""

    action: Literal["mark"] = "mark"
    text: str = Field(max_length=1000, description="The annotation.")


ActionRequest = Annotated[
    MoveXY | MoveZ | SetExposure | SetInterval | Shutter | PauseAcquisition | ResumeAcquisition
    | StopAcquisition | RunMda | Mark,
    Field(discriminator="action"),
]
"""Any action request; ``action`` selects the model."""

REQUEST_MODELS: dict[str, type[_Request]] = {
    "move_xy": MoveXY, "move_z": MoveZ, "set_exposure": SetExposure, "set_interval": SetInterval,
    "shutter": Shutter, "pause_acquisition": PauseAcquisition, "resume_acquisition": ResumeAcquisition,
    "stop_acquisition": StopAcquisition, "run_mda": RunMda, "mark": Mark,
}

_REQUEST_ADAPTER: TypeAdapter[Any] = TypeAdapter(ActionRequest)


class ActionError(ValueError):
    """A request is invalid, refused by a limit, or cannot be carried out; the message says why."""


class ActuatorUnavailable(ActionError):
    """The source has no such actuator."""


def parse_action(data: Mapping[str, Any]) -> Any:
    """Validate a request mapping (``action`` + parameters) into its model.

    Raises
    ------
    ActionError
        Naming the unknown action, or each bad parameter with the value given.
    """
    action = data.get("action")
    if action not in REQUEST_MODELS:
        raise ActionError(f"unknown action {action!r}; actions are {list(ACTIONS)}")
    try:
        return _REQUEST_ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"][1:]) or "(request)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                parts.append(f"{loc}: unknown parameter of {action}")
            elif err["type"] == "missing":
                parts.append(f"{loc}: required by {action}")
            else:
                parts.append(f"{loc}: {msg} (given {err.get('input')!r})")
        raise ActionError(f"invalid {action} request: " + "; ".join(parts)) from None


# -- limits (configuration section ``limits``) ---------------------------------------------------


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Range = tuple[float, float]


class XYLimits(_Limits):
    travel_x_um: Range | None = Field(None, description="Allowed X positions [min, max], µm; None: the stage's own limits, or ±25 mm.")
    travel_y_um: Range | None = Field(None, description="Allowed Y positions [min, max], µm; None: the stage's own limits, or ±25 mm.")
    max_step_um: float = Field(100.0, gt=0, description="Largest single move (distance from the current position), µm.")
    max_rate_hz: float = Field(200.0, gt=0, description="Highest rate of XY moves, Hz (a move sooner than 1/rate after the last is refused).")


class ZLimits(_Limits):
    travel_um: Range | None = Field(None, description="Allowed Z positions [min, max], µm; None: the stage's own limits, or ±25 mm.")
    max_step_um: float = Field(10.0, gt=0, description="Largest single focus move, µm.")
    max_rate_hz: float = Field(100.0, gt=0, description="Highest rate of focus moves, Hz.")


class TimingLimits(_Limits):
    min_ms: float = Field(0.1, gt=0, description="Shortest value allowed, ms.")
    max_ms: float = Field(10_000.0, gt=0, description="Longest value allowed, ms.")
    max_rate_hz: float = Field(20.0, gt=0, description="Highest rate of changes, Hz.")


class RateLimit(_Limits):
    max_rate_hz: float = Field(20.0, gt=0, description="Highest rate of calls, Hz.")


class MdaLimits(_Limits):
    max_rate_hz: float = Field(1.0, gt=0, description="Highest rate of MDA runs, Hz.")
    max_events: int = Field(10_000, ge=1, description="Largest MDA sequence, events.")


class LimitsConfig(_Limits):
    """Per-actuator limits; a request outside them is refused with the limit named."""

    move_xy: XYLimits = Field(default_factory=XYLimits, description="XY stage.")
    move_z: ZLimits = Field(default_factory=ZLimits, description="Focus (Z) stage.")
    set_exposure: TimingLimits = Field(default_factory=TimingLimits, description="Exposure.")
    set_interval: TimingLimits = Field(default_factory=TimingLimits, description="Frame interval.")
    shutter: RateLimit = Field(default_factory=lambda: RateLimit(max_rate_hz=50.0), description="Shutter.")
    run_mda: MdaLimits = Field(default_factory=MdaLimits, description="MDA runs.")
    mark: RateLimit = Field(default_factory=lambda: RateLimit(max_rate_hz=1000.0), description="Marks.")

    @field_validator("move_xy", "move_z", "set_exposure", "set_interval")
    @classmethod
    def _ordered(cls, value: Any) -> Any:
        for name in ("travel_x_um", "travel_y_um", "travel_um"):
            rng = getattr(value, name, None)
            if rng is not None and not rng[0] < rng[1]:
                raise ValueError(f"{name}: [min, max] needs min < max, got {list(rng)}")
        if isinstance(value, TimingLimits) and not value.min_ms <= value.max_ms:
            raise ValueError(f"min_ms ({value.min_ms}) is above max_ms ({value.max_ms})")
        return value


# -- actuators -----------------------------------------------------------------------------------


@runtime_checkable
class Actuators(Protocol):
    """The hardware actions a source offers. A method for an actuator the source lacks raises
    :class:`ActuatorUnavailable` naming it; :meth:`available` lists those it has.

    Every method returns the actuator's state after the action (a JSON-able mapping).
    """

    def available(self) -> frozenset[str]: ...

    def xy_position_um(self) -> tuple[float, float]: ...

    def xy_travel_um(self) -> tuple[Range, Range] | None: ...

    def move_xy(self, x_um: float, y_um: float) -> dict[str, Any]:
        """Move to the absolute position (x_um, y_um)."""
        ...

    def z_position_um(self) -> float: ...

    def z_travel_um(self) -> Range | None: ...

    def move_z(self, z_um: float) -> dict[str, Any]:
        """Move the focus to the absolute position z_um."""
        ...

    def set_exposure(self, exposure_ms: float) -> dict[str, Any]: ...

    def set_interval(self, frame_interval_ms: float) -> dict[str, Any]: ...

    def shutter(self, open: bool) -> dict[str, Any]: ...

    def run_mda(self, sequence: Mapping[str, Any]) -> dict[str, Any]: ...


class NoActuators:
    """A source without hardware (a recorded file): every actuator is unavailable."""

    def __init__(self, source_name: str) -> None:
        self._name = source_name

    def available(self) -> frozenset[str]:
        return frozenset()

    def _missing(self, what: str) -> ActuatorUnavailable:
        return ActuatorUnavailable(f"{what}: the source ({self._name}) has no such actuator")

    def xy_position_um(self) -> tuple[float, float]:
        raise self._missing("move_xy")

    def xy_travel_um(self) -> tuple[Range, Range] | None:
        return None

    def move_xy(self, x_um: float, y_um: float) -> dict[str, Any]:
        raise self._missing("move_xy")

    def z_position_um(self) -> float:
        raise self._missing("move_z")

    def z_travel_um(self) -> Range | None:
        return None

    def move_z(self, z_um: float) -> dict[str, Any]:
        raise self._missing("move_z")

    def set_exposure(self, exposure_ms: float) -> dict[str, Any]:
        raise self._missing("set_exposure")

    def set_interval(self, frame_interval_ms: float) -> dict[str, Any]:
        raise self._missing("set_interval")

    def shutter(self, open: bool) -> dict[str, Any]:
        raise self._missing("shutter")

    def run_mda(self, sequence: Mapping[str, Any]) -> dict[str, Any]:
        raise self._missing("run_mda")


class LazyActuators:
    """The actuators of a source that is opened later (the runner opens it at start)."""

    def __init__(self, get: Callable[[], Actuators]) -> None:
        self._get = get
        self._actuators: Actuators | None = None

    def _resolve(self) -> Actuators:
        if self._actuators is None:
            try:
                self._actuators = self._get()
            except AssertionError:
                raise ActionError("the source is not open yet (the run has not started)") from None
        return self._actuators

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resolve(), name)


# Device properties a stage may carry to report its own travel (scopestream's simulated stages
# do; Micro-Manager has no generic call for stage limits).
XY_TRAVEL_PROPERTIES = ("TravelXMinUm", "TravelXMaxUm", "TravelYMinUm", "TravelYMaxUm")
Z_TRAVEL_PROPERTIES = ("TravelMinUm", "TravelMaxUm")
FRAME_INTERVAL_PROPERTY = "FrameIntervalMs"


class MicroManagerActuators:
    """Actuators of a pymmcore-plus core: the core's current XY stage, focus stage, shutter, camera.

    Parameters
    ----------
    core
        The loaded core (C++ adapters or Python devices).
    run_mda
        The source's ``run_mda_burst(sequence)`` (pauses continuous acquisition around it).
    """

    def __init__(self, core: UniMMCore, run_mda: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> None:
        self._core = core
        self._run_mda = run_mda

    def available(self) -> frozenset[str]:
        core = self._core
        out = {"set_exposure"}
        if core.getXYStageDevice():
            out.add("move_xy")
        if core.getFocusDevice():
            out.add("move_z")
        if core.getShutterDevice():
            out.add("shutter")
        camera = core.getCameraDevice()
        if camera and core.hasProperty(camera, FRAME_INTERVAL_PROPERTY):
            out.add("set_interval")
        if self._run_mda is not None:
            out.add("run_mda")
        return frozenset(out)

    def _device(self, kind: str, label: str) -> str:
        if not label:
            raise ActuatorUnavailable(f"{kind}: the Micro-Manager configuration sets no {_KIND_NAMES[kind]} device")
        return label

    def xy_position_um(self) -> tuple[float, float]:
        self._device("move_xy", self._core.getXYStageDevice())
        x, y = self._core.getXYPosition()
        return float(x), float(y)

    def xy_travel_um(self) -> tuple[Range, Range] | None:
        label = self._core.getXYStageDevice()
        values = self._travel_properties(label, XY_TRAVEL_PROPERTIES)
        if values is None:
            return None
        return (values[0], values[1]), (values[2], values[3])

    def move_xy(self, x_um: float, y_um: float) -> dict[str, Any]:
        core = self._core
        label = self._device("move_xy", core.getXYStageDevice())
        core.setXYPosition(label, x_um, y_um)
        core.waitForDevice(label)
        x, y = core.getXYPosition(label)
        return {"device": label, "x_um": float(x), "y_um": float(y)}

    def z_position_um(self) -> float:
        label = self._device("move_z", self._core.getFocusDevice())
        return float(self._core.getPosition(label))

    def z_travel_um(self) -> Range | None:
        values = self._travel_properties(self._core.getFocusDevice(), Z_TRAVEL_PROPERTIES)
        return None if values is None else (values[0], values[1])

    def move_z(self, z_um: float) -> dict[str, Any]:
        core = self._core
        label = self._device("move_z", core.getFocusDevice())
        core.setPosition(label, z_um)
        core.waitForDevice(label)
        return {"device": label, "z_um": float(core.getPosition(label))}

    def set_exposure(self, exposure_ms: float) -> dict[str, Any]:
        core = self._core
        camera = self._device("set_exposure", core.getCameraDevice())
        core.setExposure(camera, exposure_ms)
        state = {"device": camera, "exposure_ms": float(core.getExposure())}
        if core.hasProperty(camera, FRAME_INTERVAL_PROPERTY):
            state["frame_interval_ms"] = float(core.getProperty(camera, FRAME_INTERVAL_PROPERTY))
        return state

    def set_interval(self, frame_interval_ms: float) -> dict[str, Any]:
        core = self._core
        camera = self._device("set_interval", core.getCameraDevice())
        if not core.hasProperty(camera, FRAME_INTERVAL_PROPERTY):
            raise ActuatorUnavailable(
                f"set_interval: camera {camera!r} has no frame-interval control (no {FRAME_INTERVAL_PROPERTY} "
                "property); change the rate with set_exposure instead"
            )
        core.setProperty(camera, FRAME_INTERVAL_PROPERTY, frame_interval_ms)
        return {"device": camera, "frame_interval_ms": float(core.getProperty(camera, FRAME_INTERVAL_PROPERTY)),
                "exposure_ms": float(core.getExposure())}

    def shutter(self, open: bool) -> dict[str, Any]:
        core = self._core
        label = self._device("shutter", core.getShutterDevice())
        core.setShutterOpen(label, open)
        core.waitForDevice(label)
        return {"device": label, "open": bool(core.getShutterOpen(label))}

    def run_mda(self, sequence: Mapping[str, Any]) -> dict[str, Any]:
        if self._run_mda is None:
            raise ActuatorUnavailable("run_mda: this source cannot interrupt its acquisition for an MDA (mode 'mda' runs one already)")
        return self._run_mda(sequence)

    def _travel_properties(self, label: str, names: tuple[str, ...]) -> list[float] | None:
        if not label:
            return None
        core = self._core
        if not all(core.hasProperty(label, n) for n in names):
            return None
        try:
            return [float(core.getProperty(label, n)) for n in names]
        except (TypeError, ValueError):
            return None


_KIND_NAMES = {"move_xy": "XY stage", "move_z": "focus (Z) stage", "shutter": "shutter",
               "set_exposure": "camera", "set_interval": "camera"}


# -- the action service --------------------------------------------------------------------------


class AcquisitionControl(Protocol):
    """What pause/resume/stop act on (the runner)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def request_stop(self, reason: str = ..., exit_status: Literal["success", "aborted", "failed"] = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class Trigger:
    """The event an action answers: its topic, seq, frame and acquisition time."""

    topic: str | None = None
    seq: int | None = None
    frame_seq: int | None = None
    t_acquired: float | None = None


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What an action did: ``ok``, the actuator's new ``state`` or the ``error``, and when."""

    ok: bool
    state: dict[str, Any] | None
    error: str | None
    t_done: float
    body: ActionBody

    def reply(self) -> dict[str, Any]:
        """The control channel's reply."""
        if self.ok:
            return {"ok": True, "state": self.state, "t_done": self.t_done}
        return {"ok": False, "error": self.error, "t_done": self.t_done}


Publish = Callable[[ActionBody, Trigger], None]


class ActionService:
    """Checks requests against the limits, carries them out one at a time, publishes each.

    Thread-safe: the control thread and the rules thread both call :meth:`execute`; one lock
    serializes the actuators (a stage takes one move at a time).

    Parameters
    ----------
    actuators
        The source's actuators.
    acquisition
        The runner (pause, resume, request_stop).
    limits
        The ``limits`` section.
    publish
        ``publish(body, trigger)``: puts the ``action`` event on the stream.
    """

    def __init__(
        self,
        actuators: Actuators,
        acquisition: AcquisitionControl | None,
        limits: LimitsConfig,
        publish: Publish,
    ) -> None:
        self._actuators = actuators
        self.acquisition = acquisition
        self.limits = limits
        self._publish = publish
        self._lock = threading.Lock()
        self._last_call: dict[str, float] = {}
        self.stop_requested = threading.Event()
        # Told of every done set_exposure / set_interval: (frame_interval_ms or None, exposure_ms,
        # t_done); the engine passes the new timing to the stages (FollowsTiming).
        self.timing_listener: Callable[[float | None, float, float], object] | None = None
        # Done XY moves, (t_done, x_um, y_um, from_x_um, from_y_um): where the stage was when.
        self._xy_moves: deque[tuple[float, float, float, float, float]] = deque(maxlen=1024)
        self.counts: dict[str, int] = {"done": 0, "refused": 0, "failed": 0}

    def execute(
        self,
        request: Any,
        *,
        origin: Literal["client", "rule"],
        requested_by: str,
        trigger: Trigger | None = None,
        t_matched: float | None = None,
    ) -> ActionResult:
        """Carry out one validated request (a model of :data:`ActionRequest`); never raises.

        ``t_matched`` is when the rule matched or the request arrived (default: now).
        """
        trigger = trigger or Trigger()
        t_matched = time.time() if t_matched is None else t_matched
        t_called: float | None = None
        state: dict[str, Any] | None = None
        error: str | None = None
        with self._lock:
            try:
                self._check_stop(request)
                plan = self._plan(request)
                self._check_rate(request.action, time.perf_counter())
                t_called = time.time()
                self._last_call[request.action] = time.perf_counter()
                state = plan()
                self.counts["done"] += 1
            except ActionError as exc:
                error = str(exc)
                self.counts["refused" if t_called is None else "failed"] += 1
            except Exception as exc:  # noqa: BLE001 - a device error is a failed action, not a crash
                error = f"{request.action} failed: {type(exc).__name__}: {exc}"
                self.counts["failed"] += 1
                log.warning("%s", error)
        t_done = time.time()
        if error is None and state is not None and request.action in ("set_exposure", "set_interval"):
            self._timing_changed(state, t_done)
        body = _action_body(request, origin, requested_by, trigger, state, error, t_matched, t_called, t_done)
        try:
            self._publish(body, trigger)
        except Exception:  # noqa: BLE001 - the action happened; a failed publish must not hide it
            log.exception("publishing an action event failed")
        return ActionResult(ok=error is None, state=state, error=error, t_done=t_done, body=body)

    def _log_xy(self, state: dict[str, Any], from_x_um: float, from_y_um: float) -> dict[str, Any]:
        # Stamped when the stage reports done (under the service's lock, right after the call).
        x, y = state.get("x_um"), state.get("y_um")
        if isinstance(x, int | float) and isinstance(y, int | float):
            self._xy_moves.append((time.time(), float(x), float(y), from_x_um, from_y_um))
        return state

    def xy_position_at(self, t: float) -> tuple[float, float] | None:
        """Where the XY stage was at Unix time ``t``, from the moves done through this service
        (the current position when none was done yet); None without an XY stage."""
        moves = list(self._xy_moves)
        for t_done, x, y, _, _ in reversed(moves):
            if t_done <= t:
                return x, y
        if moves:
            return moves[0][3], moves[0][4]
        try:
            return self._actuators.xy_position_um()
        except Exception:  # noqa: BLE001 - no XY stage (or it failed): unknown
            return None

    def _timing_changed(self, state: Mapping[str, Any], t_done: float) -> None:
        listener = self.timing_listener
        exposure_ms = state.get("exposure_ms")
        if listener is None or not isinstance(exposure_ms, int | float):
            return
        interval_ms = state.get("frame_interval_ms")
        try:
            listener(float(interval_ms) if isinstance(interval_ms, int | float) else None, float(exposure_ms), t_done)
        except Exception:  # noqa: BLE001 - the action is done; a listener's failure must not undo it
            log.exception("passing the new timing to the stages failed")

    def act(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a control channel ``act`` request (the JSON object, ``command`` included).

        Besides the action's parameters a request may carry ``client`` (a name for the action
        stream, default ``"control"``) and ``trigger`` (``{"topic", "seq", "frame_seq",
        "t_acquired"}``: the event the client reacts to, for latency accounting).
        """
        t_received = time.time()
        client = request.get("client", "control")
        if not isinstance(client, str) or not client or len(client) > 64:
            return {"ok": False, "error": f"act: 'client' must be a name of 1 to 64 characters, got {client!r}"}
        try:
            trigger = _client_trigger(request.get("trigger"))
        except ActionError as exc:
            return {"ok": False, "error": str(exc)}
        data = {k: v for k, v in request.items() if k not in ("command", "client", "trigger")}
        try:
            parsed = parse_action(data)
        except ActionError as exc:
            return self.refuse(str(data.get("action")), data, str(exc), origin="client", requested_by=client,
                               trigger=trigger).reply()
        return self.execute(parsed, origin="client", requested_by=client, trigger=trigger, t_matched=t_received).reply()

    def stopping(self) -> bool:
        """True once a stop was asked (action, command or the run ending)."""
        if self.stop_requested.is_set():
            return True
        state = getattr(self.acquisition, "state", None)
        return getattr(state, "value", state) in ("stopping", "stopped")

    def refuse(
        self, action: str, params: Mapping[str, Any], error: str, *, origin: Literal["client", "rule"],
        requested_by: str, trigger: Trigger | None = None,
    ) -> ActionResult:
        """Publish a request that failed validation (it never reached an actuator)."""
        trigger = trigger or Trigger()
        now = time.time()
        body = ActionBody(
            action=str(action), params=_jsonable_params(params), origin=origin, requested_by=requested_by,
            trigger_topic=trigger.topic, trigger_seq=trigger.seq, trigger_frame_seq=trigger.frame_seq,
            ok=False, error=error, t_acquired=trigger.t_acquired, t_matched=now, t_done=now,
        )
        with self._lock:
            self.counts["refused"] += 1
        try:
            self._publish(body, trigger)
        except Exception:  # noqa: BLE001
            log.exception("publishing an action event failed")
        return ActionResult(ok=False, state=None, error=error, t_done=now, body=body)

    # -- checks and plans (under the lock) -------------------------------------------------------

    def _check_stop(self, request: Any) -> None:
        if request.action == "stop_acquisition":
            return
        if self.stopping():
            raise ActionError(f"{request.action} refused: the acquisition is stopping (stop always wins)")

    def _check_rate(self, action: str, now: float) -> None:
        limit = getattr(self.limits, action, None)
        rate = getattr(limit, "max_rate_hz", None)
        last = self._last_call.get(action)
        if rate is None or last is None:
            return
        since_s = now - last
        if since_s < 1.0 / rate:
            raise ActionError(
                f"{action} refused by limits.{action}.max_rate_hz ({rate:g} Hz): the last one was "
                f"{since_s * 1000:.1f} ms ago, at least {1000 / rate:.1f} ms needed"
            )

    def _plan(self, request: Any) -> Callable[[], dict[str, Any]]:
        """Check the limits and return the call that carries the request out."""
        a = self._actuators
        lim = self.limits
        action = request.action
        if action == "move_xy":
            x0, y0 = a.xy_position_um()
            x, y = (x0 + request.x_um, y0 + request.y_um) if request.relative else (request.x_um, request.y_um)
            step = math.hypot(x - x0, y - y0)
            if step > lim.move_xy.max_step_um:
                raise ActionError(
                    f"move_xy refused by limits.move_xy.max_step_um ({lim.move_xy.max_step_um:g} µm): "
                    f"the move is {step:.3f} µm"
                )
            own = a.xy_travel_um()
            box_x = lim.move_xy.travel_x_um or (own[0] if own else (-DEFAULT_TRAVEL_UM, DEFAULT_TRAVEL_UM))
            box_y = lim.move_xy.travel_y_um or (own[1] if own else (-DEFAULT_TRAVEL_UM, DEFAULT_TRAVEL_UM))
            _check_travel("move_xy", "travel_x_um", x, box_x, lim.move_xy.travel_x_um is None)
            _check_travel("move_xy", "travel_y_um", y, box_y, lim.move_xy.travel_y_um is None)
            return lambda: self._log_xy(a.move_xy(x, y), x0, y0)
        if action == "move_z":
            z0 = a.z_position_um()
            z = z0 + request.z_um if request.relative else request.z_um
            if abs(z - z0) > lim.move_z.max_step_um:
                raise ActionError(
                    f"move_z refused by limits.move_z.max_step_um ({lim.move_z.max_step_um:g} µm): "
                    f"the move is {abs(z - z0):.3f} µm"
                )
            own_z = a.z_travel_um()
            box_z = lim.move_z.travel_um or own_z or (-DEFAULT_TRAVEL_UM, DEFAULT_TRAVEL_UM)
            _check_travel("move_z", "travel_um", z, box_z, lim.move_z.travel_um is None)
            return lambda: a.move_z(z)
        if action in ("set_exposure", "set_interval"):
            value = request.exposure_ms if action == "set_exposure" else request.frame_interval_ms
            t_lim: TimingLimits = getattr(lim, action)
            if value < t_lim.min_ms:
                raise ActionError(f"{action} refused by limits.{action}.min_ms ({t_lim.min_ms:g} ms): asked {value:g} ms")
            if value > t_lim.max_ms:
                raise ActionError(f"{action} refused by limits.{action}.max_ms ({t_lim.max_ms:g} ms): asked {value:g} ms")
            if action == "set_exposure":
                return lambda: a.set_exposure(value)
            return lambda: a.set_interval(value)
        if action == "shutter":
            return lambda: a.shutter(request.open)
        if action == "run_mda":
            import useq

            n = sum(1 for _ in useq.MDASequence.model_validate(request.sequence))
            if n > lim.run_mda.max_events:
                raise ActionError(f"run_mda refused by limits.run_mda.max_events ({lim.run_mda.max_events}): the sequence has {n} events")
            return lambda: a.run_mda(request.sequence)
        if action == "mark":
            return lambda: {"text": request.text}
        acq = self.acquisition
        if acq is None:
            raise ActionError(f"{action}: no acquisition to control")
        if action == "pause_acquisition":
            return lambda: _acquisition_call(acq.pause, "paused")
        if action == "resume_acquisition":
            return lambda: _acquisition_call(acq.resume, "running")
        if action == "stop_acquisition":
            self.stop_requested.set()
            return lambda: _acquisition_call(lambda: acq.request_stop("stop_acquisition action"), "stopping")
        raise ActionError(f"unknown action {action!r}")  # pragma: no cover - the models allow no other


class _ClientTrigger(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    topic: str | None = None
    seq: int | None = Field(None, ge=0)
    frame_seq: int | None = Field(None, ge=0)
    t_acquired: float | None = None


def _client_trigger(raw: Any) -> Trigger:
    if raw is None:
        return Trigger()
    try:
        t = _ClientTrigger.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(object)"
        raise ActionError(f"act: trigger.{loc}: {err['msg']} (given {err.get('input')!r})") from None
    return Trigger(t.topic, t.seq, t.frame_seq, t.t_acquired)


def _acquisition_call(call: Callable[[], None], state: str) -> dict[str, Any]:
    try:
        call()
    except RuntimeError as exc:  # "cannot pause: the runner is stopping"
        raise ActionError(str(exc)) from None
    return {"acquisition": state}


def _check_travel(action: str, name: str, value: float, box: Range, from_device: bool) -> None:
    lo, hi = box
    if not lo <= value <= hi:
        where = "the stage's own travel (no limits." + action + "." + name + " set)" if from_device else f"limits.{action}.{name}"
        raise ActionError(
            f"{action} refused by {where} [{lo:g}, {hi:g}] µm: the target is {value:.3f} µm"
        )


def _jsonable_params(params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return dict(json.loads(json.dumps(dict(params), allow_nan=False, default=str)))
    except (TypeError, ValueError):
        return {k: repr(v) for k, v in params.items()}


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return (b - a) * 1000.0


def _action_body(
    request: Any, origin: Literal["client", "rule"], requested_by: str, trigger: Trigger,
    state: dict[str, Any] | None, error: str | None, t_matched: float, t_called: float | None, t_done: float,
) -> ActionBody:
    return ActionBody(
        action=request.action,
        params=request.model_dump(mode="json"),
        origin=origin,
        requested_by=requested_by,
        trigger_topic=trigger.topic,
        trigger_seq=trigger.seq,
        trigger_frame_seq=trigger.frame_seq,
        ok=error is None,
        error=error,
        state=state,
        t_acquired=trigger.t_acquired,
        t_matched=t_matched,
        t_called=t_called,
        t_done=t_done,
        acquired_to_matched_ms=_ms(trigger.t_acquired, t_matched),
        acquired_to_called_ms=_ms(trigger.t_acquired, t_called),
        acquired_to_done_ms=_ms(trigger.t_acquired, t_done),
        actuator_ms=_ms(t_called, t_done) if error is None else None,
    )
