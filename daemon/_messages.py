"""Event messages: the header, the engine's own bodies, and the multipart wire format.

Wire format (one ZeroMQ multipart message per event)::

    frame 0   topic, ASCII
    frame 1   header, JSON (Header)
    frame 2   body, JSON (the topic's body model)
    frame 3+  one raw buffer per entry of header["buffers"], C order, dtype and shape from the header

Schema versions: ``SCHEMA_VERSION`` is bumped on any change to a header or body field
(MAJOR on a breaking change, MINOR when fields are added); see CHANGELOG.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "2.0"

ENGINE_TOPICS = ("run_start", "run_stop", "heartbeat", "dropped_frames", "stage_error", "source_error", "welcome", "action")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BufferSpec(_Frozen):
    """One raw array buffer that follows the body."""

    name: str = Field(description="Array name, e.g. 'x' or 'image'.")
    dtype: str = Field(description="NumPy dtype string with byte order, e.g. '<f8', '<u2', '|b1'.")
    shape: list[int] = Field(description="Array shape; the buffer holds prod(shape) items in C order.")


class Header(_Frozen):
    """Frame 1 of every message."""

    schema_version: str = Field(SCHEMA_VERSION, description="Version of this header and of the body models.")
    run_id: str = Field(description="Identifier of the run (a UUID4 hex string), the same in every message of a run.")
    topic: str = Field(description="The topic, equal to frame 0.")
    seq: int = Field(ge=0, description="Per-topic message counter of this run, from 0, without gaps.")
    frame_seq: int | None = Field(None, description="The camera frame (daemon frame counter) this derives from, if any.")
    t_acquired: float | None = Field(None, description="Acquisition time of that frame, Unix seconds.")
    t_published: float = Field(description="Time the message was handed to the socket, Unix seconds.")
    buffers: list[BufferSpec] = Field(default_factory=list, description="The raw buffers after the body, in order.")


class SourceDescription(_Frozen):
    kind: str = Field(description="'micromanager' or 'file'.")
    detail: str = Field(description="Configuration file, device label or file path.")
    camera: str | None = Field(None, description="Camera device label (Micro-Manager).")
    width_px: int = Field(description="Image width.")
    height_px: int = Field(description="Image height.")
    dtype: str = Field(description="Pixel dtype, e.g. 'uint16'.")
    mode: str = Field(description="'continuous', 'mda' or 'replay'.")


class RunStartBody(_Frozen):
    """Published once when a run starts, before any frame."""

    scopestream_version: str = Field(description="Package version of the daemon.")
    source: SourceDescription = Field(description="What the frames come from.")
    stages: list[str] = Field(description="The stages that run, in order.")
    topics: list[str] = Field(description="Topics this run may publish.")
    config: dict[str, Any] = Field(description="The complete configuration of the run.")
    t_start: float = Field(description="Unix seconds.")


class FrameCounts(_Frozen):
    frames_received: int = Field(ge=0, description="Frames known to the daemon: delivered by the source, or known lost in the camera.")
    frames_processed: int = Field(ge=0, description="Frames that went through every stage (a stage error still counts as processed).")
    frames_dropped: int = Field(ge=0, description="Frames lost: in the camera buffer, or dropped by a full bus. received = processed + dropped.")


class RunStopBody(FrameCounts):
    """Published once when a run ends, after the last frame's events."""

    exit_status: Literal["success", "aborted", "failed"] = Field(description="'success' (source ended or stop asked), 'aborted' (signal), 'failed' (source error).")
    reason: str = Field(description="Why the run ended, in words.")
    frames_dropped_by_reason: dict[str, int] = Field(description="frames_dropped split by reason ('camera_gap', 'camera_overflow', 'bus_full').")
    stage_errors: dict[str, int] = Field(description="Frames on which each stage raised.")
    duration_s: float = Field(description="Seconds from run_start to run_stop.")


class HeartbeatBody(FrameCounts):
    """Published every events.heartbeat_interval_s while the daemon runs."""

    state: str = Field(description="Runner state: idle, running, paused, stopping, stopped.")
    queue_depth_frames: int = Field(description="Frames waiting in the bus.")
    uptime_s: float = Field(description="Seconds since run_start.")


class DroppedFramesBody(_Frozen):
    """Frames lost, published when it happens."""

    reason: Literal["camera_gap", "camera_overflow", "bus_full", "source_error"] = Field(
        description="Where they were lost: 'camera_gap' (missing camera image numbers, or frames the camera would have taken while it was reconnecting), 'camera_overflow', 'bus_full', 'source_error' (a frame the source could not read, e.g. a corrupt file page; a source_error event names it)."
    )
    count: int = Field(ge=1, description="Frames lost in this incident.")
    frames_dropped_total: int = Field(ge=0, description="All frames dropped so far in this run.")
    camera_image_number: int | None = Field(None, description="Camera ImageNumber of the first frame after the gap (camera_gap).")


class StageErrorBody(_Frozen):
    """A stage raised on a frame; the frame counts as processed, the run goes on."""

    stage: str = Field(description="Stage name.")
    error: str = Field(description="Exception type and message.")
    errors_total: int = Field(ge=1, description="Frames this stage has failed on so far.")


class SourceErrorBody(_Frozen):
    """The source failed: the camera raised, stopped its acquisition by itself or vanished, or a
    recorded frame could not be read. ``action`` says what happens next."""

    source_kind: str = Field(description="'micromanager' or 'file'.")
    error: str = Field(description="What went wrong, in words (exception type and message where there was one).")
    frames_delivered: int = Field(ge=0, description="Frames the source had delivered to the daemon in this run when the error happened.")
    action: Literal["stop", "reconnect", "skip_frame"] = Field(
        description="'stop': the run ends (run_stop follows with exit_status 'failed'); 'reconnect': the source reopens the camera and restarts the acquisition (source.on_error: reconnect), frames missed meanwhile are counted dropped as 'camera_gap'; 'skip_frame': the frame is counted dropped as 'source_error' and the run goes on."
    )
    reconnecting: bool = Field(description="True when the source will try to reconnect (action 'reconnect').")
    reconnect_attempt: int = Field(ge=0, description="Which reconnect attempt follows (1 = the first after this outage); 0 when not reconnecting.")
    reconnect_attempts_max: int = Field(ge=0, description="source.reconnect_attempts: attempts allowed per outage.")
    frame_index: int | None = Field(None, description="The frame of the file that could not be read (action 'skip_frame').")


class WelcomeBody(_Frozen):
    """Sent when a subscription reaches the daemon: whoever receives it knows its subscriptions are live."""

    subscription: str = Field(description="The topic prefix just subscribed to ('' = all).")
    run_id: str = Field(description="The current run.")


class ActionBody(_Frozen):
    """Published for every actuator action, from a client or a rule, done or refused.

    A run's actions can be replayed from a recording of the stream: ``action`` and ``params`` are
    the validated request (the same object an ``act`` command takes, less ``command``).
    """

    action: str = Field(description="The action: move_xy, move_z, set_exposure, set_interval, shutter, pause_acquisition, resume_acquisition, stop_acquisition, run_mda, mark.")
    params: dict[str, Any] = Field(description="The validated request: 'action' and its parameters (e.g. x_um, y_um, relative).")
    origin: Literal["client", "rule"] = Field(description="Who asked: a control-channel client or a rule of the configuration.")
    requested_by: str = Field(description="The client's name (the act request's 'client', default 'control') or the rule's name.")
    trigger_topic: str | None = Field(None, description="Topic of the event that triggered the action, if any.")
    trigger_seq: int | None = Field(None, description="That event's per-topic seq.")
    trigger_frame_seq: int | None = Field(None, description="That event's frame_seq (the camera frame it derives from).")
    ok: bool = Field(description="True when the actuator did it; False when it was refused or failed (see error).")
    error: str | None = Field(None, description="Why it was refused or failed (names the limit, the missing actuator, ...).")
    state: dict[str, Any] | None = Field(None, description="The actuator's state after the action (e.g. x_um, y_um), None when refused.")
    t_acquired: float | None = Field(None, description="Acquisition time of the triggering frame, Unix s.")
    t_matched: float = Field(description="When the request was accepted for execution (rule matched / request received), Unix s.")
    t_called: float | None = Field(None, description="When the actuator was called, Unix s (None when refused before).")
    t_done: float = Field(description="When the actuator finished (or the request was refused), Unix s.")
    acquired_to_matched_ms: float | None = Field(None, description="Frame acquired -> rule matched / request received, ms.")
    acquired_to_called_ms: float | None = Field(None, description="Frame acquired -> actuator called, ms.")
    acquired_to_done_ms: float | None = Field(None, description="Frame acquired -> actuator done, ms.")
    actuator_ms: float | None = Field(None, description="Actuator called -> done, ms.")


ENGINE_BODIES: dict[str, type[BaseModel]] = {
    "action": ActionBody,
    "run_start": RunStartBody,
    "run_stop": RunStopBody,
    "heartbeat": HeartbeatBody,
    "dropped_frames": DroppedFramesBody,
    "stage_error": StageErrorBody,
    "source_error": SourceErrorBody,
    "welcome": WelcomeBody,
}


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded event: header, body (plain JSON data) and arrays."""

    topic: str
    header: Header
    body: dict[str, Any]
    arrays: Mapping[str, np.ndarray]


def _wire_array(array: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"array dtype {arr.dtype} cannot go on the wire (numbers and booleans only)")
    return arr


def encode(header: Header, body: BaseModel | Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """Build the multipart frames of one message (the header's ``buffers`` is filled in here)."""
    wire = {name: _wire_array(a) for name, a in arrays.items()}
    specs = [BufferSpec(name=n, dtype=a.dtype.str, shape=list(a.shape)) for n, a in wire.items()]
    full = header.model_copy(update={"buffers": specs})
    body_json = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    frames: list[bytes | memoryview] = [
        full.topic.encode("ascii"),
        full.model_dump_json().encode(),
        body_json.encode(),
    ]
    frames.extend(a.data.cast("B") if a.size else b"" for a in wire.values())
    return frames


class WireError(ValueError):
    """A received message does not follow the wire format."""


def decode(frames: Sequence[bytes | memoryview]) -> Message:
    """Decode a multipart message; raises :class:`WireError` naming what is wrong."""
    if len(frames) < 3:
        raise WireError(f"message has {len(frames)} frames; at least 3 (topic, header, body) expected")
    try:
        topic = bytes(frames[0]).decode("ascii")
        header = Header.model_validate_json(bytes(frames[1]))
        body = json.loads(bytes(frames[2]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"undecodable message: {exc}") from None
    if header.topic != topic:
        raise WireError(f"header topic {header.topic!r} differs from frame 0 {topic!r}")
    if len(frames) - 3 != len(header.buffers):
        raise WireError(f"header lists {len(header.buffers)} buffers, message carries {len(frames) - 3}")
    arrays: dict[str, np.ndarray] = {}
    for spec, raw in zip(header.buffers, frames[3:], strict=True):
        dtype = np.dtype(spec.dtype)
        expected = int(np.prod(spec.shape)) * dtype.itemsize
        buf = bytes(raw) if not isinstance(raw, bytes) else raw
        if len(buf) != expected:
            raise WireError(f"buffer {spec.name!r}: {len(buf)} bytes, {expected} expected for {spec.dtype}{spec.shape}")
        arrays[spec.name] = np.frombuffer(buf, dtype=dtype).reshape(spec.shape)
    return Message(topic=topic, header=header, body=body, arrays=arrays)
