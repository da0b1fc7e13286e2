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

ENGINE_TOPICS = ("run_start", "run_stop", "heartbeat", "dropped_frames", "stage_error", "welcome")


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

    reason: Literal["camera_gap", "camera_overflow", "bus_full"] = Field(description="Where they were lost.")
    count: int = Field(ge=1, description="Frames lost in this incident.")
    frames_dropped_total: int = Field(ge=0, description="All frames dropped so far in this run.")
    camera_image_number: int | None = Field(None, description="Camera ImageNumber of the first frame after the gap (camera_gap).")


class StageErrorBody(_Frozen):
    """A stage raised on a frame; the frame counts as processed, the run goes on."""

    stage: str = Field(description="Stage name.")
    error: str = Field(description="Exception type and message.")
    errors_total: int = Field(ge=1, description="Frames this stage has failed on so far.")


class WelcomeBody(_Frozen):
    """Sent when a subscription reaches the daemon: whoever receives it knows its subscriptions are live."""

    subscription: str = Field(description="The topic prefix just subscribed to ('' = all).")
    run_id: str = Field(description="The current run.")


ENGINE_BODIES: dict[str, type[BaseModel]] = {
    "run_start": RunStartBody,
    "run_stop": RunStopBody,
    "heartbeat": HeartbeatBody,
    "dropped_frames": DroppedFramesBody,
    "stage_error": StageErrorBody,
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
