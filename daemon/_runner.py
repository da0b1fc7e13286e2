"""The runner: owns a run's state, its threads, and the accounting of every frame.

State machine::

    IDLE ──start()──► RUNNING ◄──resume()── PAUSED
                        │  └──────pause()─────►│
                        ▼                      ▼
                     STOPPING ◄── request_stop() / source ends / signal
                        │  source stopped, bus drained, stages torn down, run_stop published
                        ▼
                     STOPPED

Threads: the source's own thread delivers frames (``deliver``/``missed``) into the bounded bus;
one stage thread takes frames from the bus and runs the stages in order; one housekeeping thread
publishes heartbeats and coalesced ``dropped_frames`` events; the lifecycle thread (``start``)
waits for the end and shuts down in order. Pause, settings changes and stop act at frame
boundaries. Invariant, at every moment a snapshot is taken and at the end:
``frames_received == frames_processed + frames_dropped + frames in flight`` (in flight = 0 at
the end).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from scopestream import __version__
from scopestream.daemon._bus import FrameBus
from scopestream.daemon._config import (
    ConfigError,
    ScopestreamConfig,
    config_to_dict,
    config_with,
    stage_plugins,
)
from scopestream.daemon._frames import Frame
from scopestream.daemon._messages import (
    DroppedFramesBody,
    HeartbeatBody,
    RunStartBody,
    RunStopBody,
    SourceDescription,
    SourceErrorBody,
    StageErrorBody,
)
from scopestream.daemon._metrics import Metrics
from scopestream.daemon._publish import EventRouter
from scopestream.daemon._sources import FrameSource
from scopestream.daemon._stage import Emission, Stage, build_stage

log = logging.getLogger(__name__)

DROP_REASONS = ("camera_gap", "camera_overflow", "bus_full", "source_error")


class RunnerState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RunnerStatus:
    """A consistent snapshot of the runner, taken under its lock."""

    state: RunnerState
    run_id: str
    frames_received: int
    frames_processed: int
    frames_dropped: int
    frames_dropped_by_reason: Mapping[str, int]
    frames_in_flight: int
    queue_depth_frames: int
    stage_errors: Mapping[str, int]
    uptime_s: float
    exit_status: str | None = None
    stop_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "run_id": self.run_id,
            "frames_received": self.frames_received,
            "frames_processed": self.frames_processed,
            "frames_dropped": self.frames_dropped,
            "frames_dropped_by_reason": dict(self.frames_dropped_by_reason),
            "frames_in_flight": self.frames_in_flight,
            "queue_depth_frames": self.queue_depth_frames,
            "stage_errors": dict(self.stage_errors),
            "uptime_s": self.uptime_s,
            "exit_status": self.exit_status,
            "stop_reason": self.stop_reason,
        }


@dataclass
class _Counts:
    received: int = 0
    processed: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    pending_drop_events: dict[str, int] = field(default_factory=dict)
    pending_drop_image_number: dict[str, int | None] = field(default_factory=dict)
    stage_errors: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Runner:
    """Runs the configured stages over the frames of one source, for one run.

    Parameters
    ----------
    config
        The validated configuration.
    source
        An opened or unopened :class:`FrameSource` (``start`` opens it).
    router
        Stamps and delivers events (to the ZeroMQ publisher and/or result tables).
    metrics
        Prometheus metrics to update, or None.
    """

    def __init__(
        self,
        config: ScopestreamConfig,
        source: FrameSource,
        router: EventRouter,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.run_id = router.run_id
        self._source = source
        self._router = router
        self._metrics = metrics
        self._plugins = stage_plugins()
        self._stages: list[Stage] = [
            build_stage(self._plugins[name], config, config.stage_settings(name)) for name in config.stages
        ]
        policy = config.bus.policy
        if policy == "auto":
            live = config.source.kind != "file" or config.source.replay_fps is not None
            policy = "drop" if live else "block"
        self._bus = FrameBus(config.bus.capacity_frames, policy)
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._state = RunnerState.IDLE
        self._next_seq = 0
        self._t_start = 0.0
        self._stop_requested = threading.Event()
        self._source_done = threading.Event()
        self._stopped = threading.Event()
        self._exit_status: Literal["success", "aborted", "failed"] = "success"
        self._stop_reason = ""
        self._pending_settings: list[tuple[Stage, BaseModel]] = []
        self._frame_rate_hz = 0.0
        self._t_last_frame: float | None = None
        self._description: SourceDescription | None = None
        self._threads: list[threading.Thread] = []
        self.run_stop: RunStopBody | None = None
        if metrics is not None:
            metrics.queue_depth.set_function(self._bus.depth)
            metrics.watch_stages(self._stage_counters)
            metrics.set_state(self._state.value, [s.value for s in RunnerState])

    # -- public control ------------------------------------------------------------------
    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def source_description(self) -> SourceDescription | None:
        return self._description

    def start(self) -> None:
        """Open the source, publish ``run_start`` and begin; returns at once."""
        with self._lock:
            if self._state is not RunnerState.IDLE:
                raise RuntimeError(f"runner is {self._state.value}, not idle")
        self._description = self._source.open()
        self._t_start = time.time()
        topics = sorted({"frame_stats", "run_start", "run_stop", "heartbeat", "dropped_frames", "stage_error", "source_error"}
                        | {t for name in self.config.stages for t in self._plugins[name].topics})
        self._router.publish(
            "run_start",
            RunStartBody(
                scopestream_version=__version__,
                source=self._description,
                stages=list(self.config.stages),
                topics=topics,
                config=config_to_dict(self.config),
                t_start=self._t_start,
            ),
        )
        self._set_state(RunnerState.RUNNING)
        for target, name in (
            (self._stage_loop, "scopestream-stages"),
            (self._housekeeping_loop, "scopestream-housekeeping"),
            (self._lifecycle, "scopestream-lifecycle"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        self._source.start(self)

    def pause(self) -> None:
        with self._lock:
            if self._state is RunnerState.PAUSED:
                return
            if self._state is not RunnerState.RUNNING:
                raise RuntimeError(f"cannot pause: the runner is {self._state.value}")
        self._source.pause()
        self._set_state(RunnerState.PAUSED)

    def resume(self) -> None:
        with self._lock:
            if self._state is RunnerState.RUNNING:
                return
            if self._state is not RunnerState.PAUSED:
                raise RuntimeError(f"cannot resume: the runner is {self._state.value}")
        self._source.resume()
        self._set_state(RunnerState.RUNNING)

    def request_stop(self, reason: str = "stop requested", exit_status: Literal["success", "aborted", "failed"] = "success") -> None:
        """Ask the run to end; the source stops, the bus drains, ``run_stop`` follows."""
        with self._lock:
            if not self._stop_requested.is_set():
                self._stop_reason = reason
                self._exit_status = exit_status
        self._stop_requested.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the run has stopped (run_stop published); False on timeout."""
        return self._stopped.wait(timeout_s)

    def status(self) -> RunnerStatus:
        with self._lock:
            c = self._counts
            return RunnerStatus(
                state=self._state,
                run_id=self.run_id,
                frames_received=c.received,
                frames_processed=c.processed,
                frames_dropped=c.dropped_total,
                frames_dropped_by_reason=dict(c.dropped),
                frames_in_flight=c.received - c.processed - c.dropped_total,
                queue_depth_frames=self._bus.depth(),
                stage_errors=dict(c.stage_errors),
                uptime_s=(time.time() - self._t_start) if self._t_start else 0.0,
                exit_status=self._exit_status if self._stopped.is_set() else None,
                stop_reason=self._stop_reason or None,
            )

    def change_setting(self, key: str, value: Any) -> Any:
        """Change one configuration value while running; returns the validated value.

        Runtime-changeable: ``acquisition.exposure_ms`` (applied to the camera) and each stage's
        ``runtime_settable`` fields (applied between frames). Raises ConfigError otherwise.
        """
        parts = key.split(".")
        allowed = self.runtime_settable_keys()
        if key not in allowed:
            raise ConfigError(f"{key!r} cannot change while running; keys that can: {sorted(allowed)}")
        new_config = config_with(self.config, key, value)
        if key == "acquisition.exposure_ms":
            try:
                self._source.set_exposure_ms(new_config.acquisition.exposure_ms)
            except Exception as exc:
                raise ConfigError(f"{key}: the source refused {value!r}: {exc}") from None
            self.config = new_config
            return new_config.acquisition.exposure_ms
        stage_name, field_name = parts[0], parts[1]
        settings = new_config.stage_settings(stage_name)
        if stage_name in self.config.stages:
            stage = self._stages[self.config.stages.index(stage_name)]
            if getattr(stage, "apply_settings", None) is None:
                raise ConfigError(f"stage {stage_name!r} does not take settings while running")
            with self._lock:
                self._pending_settings.append((stage, settings))
        self.config = new_config
        return getattr(settings, field_name)

    def runtime_settable_keys(self) -> set[str]:
        keys = {"acquisition.exposure_ms"}
        for name in self.config.stages:
            keys |= {f"{name}.{f}" for f in self._plugins[name].runtime_settable}
        return keys

    # -- FrameSink (called on the source's thread) ----------------------------------------
    def deliver(
        self,
        image: np.ndarray,
        t_acquired: float,
        camera_image_number: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._counts.received += 1
            now = time.perf_counter()
            if self._t_last_frame is not None:
                dt = now - self._t_last_frame
                if dt > 0:
                    self._frame_rate_hz = 0.95 * self._frame_rate_hz + 0.05 / dt if self._frame_rate_hz else 1.0 / dt
            self._t_last_frame = now
        if self._metrics is not None:
            self._metrics.frames_received.inc()
        frame = Frame(seq, image, t_acquired, camera_image_number, metadata or {})
        while not self._bus.offer(frame):
            if self._bus.policy == "drop":
                self._count_dropped("bus_full", 1, camera_image_number)
                return
            # block policy: wait for room; nothing accepted is lost, even while stopping

    def missed(self, count: int, reason: str, camera_image_number: int | None = None) -> None:
        if count <= 0:
            return
        if reason not in DROP_REASONS:
            reason = "camera_gap"
        with self._lock:
            self._counts.received += count
            self._next_seq += count  # lost frames keep their place in the frame numbering
        if self._metrics is not None:
            self._metrics.frames_received.inc(count)
        self._count_dropped(reason, count, camera_image_number)

    def source_error(self, body: SourceErrorBody) -> None:
        """Publish the source's error on topic ``source_error`` (the source acts on it itself)."""
        self._router.publish("source_error", body)

    def _count_dropped(self, reason: str, count: int, camera_image_number: int | None) -> None:
        with self._lock:
            c = self._counts
            c.dropped[reason] += count
            if reason not in c.pending_drop_events:
                c.pending_drop_image_number[reason] = camera_image_number
            c.pending_drop_events[reason] = c.pending_drop_events.get(reason, 0) + count
        if self._metrics is not None:
            self._metrics.frames_dropped.labels(reason).inc(count)

    # -- threads ---------------------------------------------------------------------------
    def _stage_loop(self) -> None:
        products: MutableMapping[str, Any] = {}
        while True:
            if self._pending_settings:
                with self._lock:
                    pending, self._pending_settings = self._pending_settings, []
                for stage, settings in pending:
                    stage.apply_settings(settings)  # type: ignore[attr-defined]
            frame = self._bus.take(0.02)
            if frame is None:
                if self._source_done.is_set() and self._bus.depth() == 0:
                    return
                continue
            products.clear()
            for stage in self._stages:
                t0 = time.perf_counter()
                try:
                    emissions = stage.process(frame, products)
                except Exception as exc:  # a stage bug or a bad frame must not end the run
                    self._stage_failed(stage.name, frame, exc)
                    continue
                finally:
                    if self._metrics is not None:
                        self._metrics.stage_latency.labels(stage.name).observe(time.perf_counter() - t0)
                self._emit(emissions)
            with self._lock:
                self._counts.processed += 1
            if self._metrics is not None:
                self._metrics.frames_processed.inc()
                self._metrics.frame_latency.observe(max(0.0, time.time() - frame.t_acquired))

    def _stage_failed(self, stage: str, frame: Frame, exc: Exception) -> None:
        with self._lock:
            n = self._counts.stage_errors[stage] = self._counts.stage_errors.get(stage, 0) + 1
        if n <= 10 or n % 1000 == 0:
            log.warning("stage %s failed on frame %d (%d so far): %s: %s", stage, frame.seq, n, type(exc).__name__, exc)
        if self._metrics is not None:
            self._metrics.stage_errors.labels(stage).inc()
        self._router.publish(
            "stage_error",
            StageErrorBody(stage=stage, error=f"{type(exc).__name__}: {exc}", errors_total=n),
            frame_seq=frame.seq,
            t_acquired=frame.t_acquired,
        )

    def _emit(self, emissions: Sequence[Emission]) -> None:
        for em in emissions:
            self._router.publish(em.topic, em.body, em.arrays, em.frame_seq, em.t_acquired)

    def _housekeeping_loop(self) -> None:
        interval_s = self.config.events.heartbeat_interval_s
        next_beat = time.monotonic()
        while not self._stopped.is_set():
            self._flush_drop_events()
            if self._metrics is not None:
                with self._lock:
                    stale = self._t_last_frame is not None and time.perf_counter() - self._t_last_frame > 2.0
                    rate = 0.0 if stale else self._frame_rate_hz
                self._metrics.camera_frame_rate.set(rate)
            if time.monotonic() >= next_beat:
                self._heartbeat()
                next_beat += interval_s
            self._stopped.wait(0.05)

    def _heartbeat(self) -> None:
        st = self.status()
        self._router.publish(
            "heartbeat",
            HeartbeatBody(
                state=st.state.value,
                frames_received=st.frames_received,
                frames_processed=st.frames_processed,
                frames_dropped=st.frames_dropped,
                queue_depth_frames=st.queue_depth_frames,
                uptime_s=st.uptime_s,
            ),
        )

    def _flush_drop_events(self) -> None:
        with self._lock:
            pending = self._counts.pending_drop_events
            numbers = self._counts.pending_drop_image_number
            self._counts.pending_drop_events, self._counts.pending_drop_image_number = {}, {}
            total = self._counts.dropped_total
        for reason, count in pending.items():
            self._router.publish(
                "dropped_frames",
                DroppedFramesBody(reason=reason, count=count, frames_dropped_total=total,  # type: ignore[arg-type]
                                  camera_image_number=numbers.get(reason)),
            )

    def _lifecycle(self) -> None:
        while not (self._stop_requested.is_set() or self._source.finished.is_set()):
            time.sleep(0.01)
        if not self._stop_requested.is_set():
            if self._source.error:
                self.request_stop(self._source.error, "failed")
            else:
                self.request_stop("the source ended")
        self._set_state(RunnerState.STOPPING)
        try:
            self._source.stop()
        except Exception as exc:  # noqa: BLE001 - a vanished camera must not stop the shutdown
            log.error("stopping the source failed: %s", exc)
        self._source_done.set()
        self._threads[0].join()  # the stage loop drains the bus
        for stage in self._stages:
            teardown = getattr(stage, "teardown", None)
            if teardown is None:
                continue
            try:
                self._emit(teardown())
            except Exception as exc:  # noqa: BLE001
                log.error("stage %s failed at teardown: %s", stage.name, exc)
        try:
            self._source.close()
        except Exception as exc:  # noqa: BLE001
            log.error("releasing the source failed: %s", exc)
        self._flush_drop_events()
        st = self.status()
        body = RunStopBody(
            frames_received=st.frames_received,
            frames_processed=st.frames_processed,
            frames_dropped=st.frames_dropped,
            exit_status=self._exit_status,
            reason=self._stop_reason,
            frames_dropped_by_reason=dict(st.frames_dropped_by_reason),
            stage_errors=dict(st.stage_errors),
            duration_s=time.time() - self._t_start,
        )
        self._heartbeat()
        self._router.publish("run_stop", body)
        self.run_stop = body
        self._set_state(RunnerState.STOPPED)
        self._stopped.set()

    def _set_state(self, state: RunnerState) -> None:
        with self._lock:
            self._state = state
        if self._metrics is not None:
            self._metrics.set_state(state.value, [s.value for s in RunnerState])

    def _stage_counters(self) -> dict[str, Mapping[str, int]]:
        out: dict[str, Mapping[str, int]] = {}
        for stage in self._stages:
            read = getattr(stage, "counters", None)
            if read is not None:
                try:
                    out[stage.name] = dict(read())
                except Exception:  # noqa: BLE001 - metrics must never fail a scrape
                    continue
        return out


def new_run_id() -> str:
    return uuid.uuid4().hex

