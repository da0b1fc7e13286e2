"""The runner: a run's state machine and its threads.

State machine::

    IDLE ──start()──► RUNNING ◄──resume()── PAUSED
                        │  └──────pause()─────►│
                        ▼                      ▼
                     STOPPING ◄── request_stop() / source ends / signal / required sink fails
                        │  source stopped, bus drained, stages torn down, off-thread work
                        │  collected, sinks drained, run_stop published
                        ▼
                     STOPPED

The runner owns the order of things; the stages, their products and their error isolation belong
to the :class:`~scopestream.daemon._pipeline.Pipeline`, the counts to the
:class:`~scopestream.daemon._accounting.Accounting`, and delivery to the sinks' own threads
(:class:`~scopestream.daemon._publish.EventRouter`).

Threads: the source's own thread delivers frames (``deliver``/``missed``) into the bounded bus;
one stage thread takes frames from the bus and runs the pipeline (it never dies: every stage call
is guarded); one housekeeping thread publishes heartbeats, coalesced ``dropped_frames`` events
(at most 10 a second) and the results of off-thread work (``offload.poll()`` on every tick, also
when no frames arrive and while paused); the lifecycle thread (``start``) waits for the end and
shuts down in order. Pause, settings changes and stop act at frame boundaries. Invariant, at
every snapshot and at the end: ``frames_received == frames_processed + frames_dropped + frames in
flight`` (in flight = 0 at the end).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from scopestream import __version__
from scopestream.daemon._accounting import DROP_REASONS, Accounting
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
)
from scopestream.daemon._metrics import Metrics
from scopestream.daemon._offload import Offload as OffloadService
from scopestream.daemon._pipeline import Pipeline
from scopestream.daemon._publish import EventRouter
from scopestream.daemon._sources import FrameSource
from scopestream.daemon._stage import Offload, RunContext

log = logging.getLogger(__name__)

ExitStatus = Literal["success", "aborted", "failed"]

# A later request can make the outcome worse, never better: a failure found while stopping wins.
_SEVERITY: dict[str, int] = {"success": 0, "aborted": 1, "failed": 2}

DROP_EVENT_INTERVAL_S = 0.1
"""Least time between two ``dropped_frames`` events (so at most 10 a second); drops in between
are coalesced into the next event."""

SETTINGS_WAIT_S = 5.0
"""How long ``change_setting`` waits for the stage thread to apply a stage setting."""

SINK_DRAIN_TIMEOUT_S = 60.0


class RunnerState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class RunnerStatus:
    """A consistent snapshot of the runner."""

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


class Runner:
    """Runs the configured stages over the frames of one source, for one run.

    Parameters
    ----------
    config
        The validated configuration.
    source
        An opened or unopened :class:`FrameSource` (``start`` opens it).
    router
        Stamps events and hands them to the sinks.
    metrics
        Prometheus metrics to feed, or None.
    offload
        The off-thread service the stages get in their :class:`RunContext`; default: one that runs
        jobs on the submitting thread.
    """

    def __init__(
        self,
        config: ScopestreamConfig,
        source: FrameSource,
        router: EventRouter,
        metrics: Metrics | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.config = config
        self.run_id = router.run_id
        self._source = source
        self._router = router
        self._metrics = metrics
        self._plugins = stage_plugins(config.stages)
        self.accounting = Accounting()
        self.pipeline = Pipeline(config, self._plugins, router, self.accounting, metrics)
        self._offload: Offload = offload if offload is not None else OffloadService.from_config(config.offload)
        policy = config.bus.policy
        if policy == "auto":
            live = config.source.kind != "file" or config.source.replay_fps is not None
            policy = "drop" if live else "block"
        self._bus = FrameBus(config.bus.capacity_frames, policy)
        self._lock = threading.Lock()
        self._state = RunnerState.IDLE
        self._t_start = 0.0
        self._stop_requested = threading.Event()
        self._source_done = threading.Event()
        self._housekeeping_done = threading.Event()
        self._stopped = threading.Event()
        self._exit_status: ExitStatus = "success"
        self._stop_reason = ""
        self._t_last_drop_event = 0.0
        self._description: SourceDescription | None = None
        self._stage_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self.run_stop: RunStopBody | None = None
        if metrics is not None:
            metrics.queue_depth.set_function(self._bus.depth)
            metrics.watch_accounting(self.accounting)
            metrics.watch_stages(self.pipeline.counters)
            metrics.set_state(self._state.value, [s.value for s in RunnerState])

    # -- public control ------------------------------------------------------------------
    @property
    def offload(self) -> Offload:
        """The run's off-thread service."""
        return self._offload

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def source_description(self) -> SourceDescription | None:
        return self._description

    def start(self) -> None:
        """Open the source, set the stages up, publish ``run_start`` and begin; returns at once.

        Raises
        ------
        ConfigError
            When a stage cannot set up (the source is closed again).
        """
        with self._lock:
            if self._state is not RunnerState.IDLE:
                raise RuntimeError(f"runner is {self._state.value}, not idle")
        self._description = self._source.open()
        try:
            self.pipeline.setup(self._run_context(self._description))
        except BaseException:
            self._close_source()
            raise
        self._t_start = time.time()
        topics = sorted({"frame_stats", "run_start", "run_stop", "heartbeat", "dropped_frames", "stage_error", "source_error", "action"}
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
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        self._stage_thread = self._threads[0]
        self._source.start(self)
        # Only now: a stop requested before start (a signal during start-up) must not stop the
        # source before it started, or its first frames would come after the stages finished.
        lifecycle = threading.Thread(target=self._lifecycle, name="scopestream-lifecycle", daemon=True)
        self._threads.append(lifecycle)
        lifecycle.start()

    def _run_context(self, desc: SourceDescription) -> RunContext:
        c = self.config
        return RunContext(
            frame_shape_px=(desc.height_px, desc.width_px),
            dtype=np.dtype(desc.dtype),
            pixel_size_nm=c.optics.pixel_size_nm,
            frame_interval_ms=c.acquisition.frame_interval_ms,
            exposure_ms=c.acquisition.exposure_ms,
            camera=c.camera,
            optics=c.optics,
            source=desc,
            offload=self._offload,
        )

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

    def request_stop(self, reason: str = "stop requested", exit_status: ExitStatus = "success") -> None:
        """Ask the run to end; the source stops, the bus drains, ``run_stop`` follows.

        ``exit_status``: ``"success"`` (asked to stop, or the source ended), ``"aborted"`` (a
        signal), ``"failed"`` (the source or a required sink failed). A later request may make it
        worse (a failure found while stopping), never better.
        """
        if exit_status not in _SEVERITY:
            raise ValueError(f"exit_status must be one of {list(_SEVERITY)}, not {exit_status!r}")
        with self._lock:
            if not self._stop_requested.is_set() or _SEVERITY[exit_status] > _SEVERITY[self._exit_status]:
                self._stop_reason = reason
                self._exit_status = exit_status
        self._stop_requested.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the run has stopped (run_stop published); False on timeout."""
        return self._stopped.wait(timeout_s)

    def status(self) -> RunnerStatus:
        c = self.accounting.snapshot()
        with self._lock:
            state, exit_status, reason = self._state, self._exit_status, self._stop_reason
        return RunnerStatus(
            state=state,
            run_id=self.run_id,
            frames_received=c.received,
            frames_processed=c.processed,
            frames_dropped=c.dropped,
            frames_dropped_by_reason=dict(c.dropped_by_reason),
            frames_in_flight=c.in_flight,
            queue_depth_frames=self._bus.depth(),
            stage_errors=dict(c.stage_errors),
            uptime_s=(time.time() - self._t_start) if self._t_start else 0.0,
            exit_status=exit_status if self._stopped.is_set() else None,
            stop_reason=reason or None,
        )

    def change_setting(self, key: str, value: Any) -> Any:
        """Change one configuration value while running; returns the validated value.

        Runtime-changeable: ``acquisition.exposure_ms`` (applied to the camera) and each stage's
        ``runtime_settable`` fields, applied by the stage thread between frames; this waits (up to
        :data:`SETTINGS_WAIT_S`) for the stage to take them. Raises ConfigError when the key cannot
        change, the value is invalid, or the stage refuses it (it then keeps its old settings).
        """
        if self._state in (RunnerState.STOPPING, RunnerState.STOPPED):
            raise ConfigError(f"the run is {self._state.value}; {key!r} cannot change any more")
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
        stage_name, field_name = key.split(".", 1)
        settings = new_config.stage_settings(stage_name)
        change = self.pipeline.request_settings(stage_name, settings)
        if self._state is RunnerState.IDLE:
            self.pipeline.apply_pending_settings()  # no stage thread yet: apply here
        elif not change.done.wait(SETTINGS_WAIT_S):
            log.warning("stage %s has not applied %s within %.0f s; it will between frames", stage_name, key, SETTINGS_WAIT_S)
        if change.error is not None:
            raise ConfigError(f"{key}={value!r}: {change.error}")
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
        seq = self.accounting.receive(1)
        frame = Frame(seq, image, t_acquired, camera_image_number, metadata or {})
        while not self._bus.offer(frame):
            if self._bus.policy == "drop" or not self._stages_alive():
                self._count_dropped("bus_full", 1, camera_image_number)
                return
            # block policy: wait for room; nothing accepted is lost, even while stopping

    def missed(self, count: int, reason: str, camera_image_number: int | None = None) -> None:
        if count <= 0:
            return
        if reason not in DROP_REASONS:
            reason = "camera_gap"
        self.accounting.receive(count, delivered=False)  # lost frames keep their place in the numbering
        self._count_dropped(reason, count, camera_image_number)

    def source_error(self, body: SourceErrorBody) -> None:
        """Publish the source's error on topic ``source_error`` (the source acts on it itself)."""
        self._router.publish("source_error", body)

    def _count_dropped(self, reason: str, count: int, camera_image_number: int | None) -> None:
        self.accounting.dropped(reason, count, camera_image_number)

    def _stages_alive(self) -> bool:
        thread = self._stage_thread
        return thread is None or thread.is_alive()

    # -- threads ---------------------------------------------------------------------------
    def _stage_loop(self) -> None:
        while True:
            try:
                self.pipeline.apply_pending_settings()
                frame = self._bus.take(0.02)
                if frame is None:
                    if self._source_done.is_set() and self._bus.depth() == 0:
                        return
                    continue
                batch = [frame]
                look_ahead = self.pipeline.look_ahead_frames
                if look_ahead > 1 and self._bus.depth() > 0:  # behind: let batching stages take the waiting frames together
                    batch += self._bus.take_waiting(look_ahead - 1)
                    self.pipeline.look_ahead(batch)
                for i, each in enumerate(batch):
                    if i:
                        self.pipeline.apply_pending_settings()
                    try:
                        self.pipeline.process(each)
                    finally:
                        self.accounting.processed()
                        if self._metrics is not None:
                            self._metrics.frame_latency.observe(max(0.0, time.time() - each.t_acquired))
            except Exception:  # noqa: BLE001 - the pipeline guards the stages; this guards the rest
                log.exception("unexpected error in the stage thread; it goes on")

    def _housekeeping_loop(self) -> None:
        interval_s = self.config.events.heartbeat_interval_s
        next_beat = time.monotonic()
        while not self._housekeeping_done.is_set():
            try:
                self._publish_offloaded()
                self._flush_drop_events(final=False)
                if time.monotonic() >= next_beat:
                    self._heartbeat()
                    next_beat += interval_s
            except Exception:  # noqa: BLE001 - heartbeats must go on
                log.exception("unexpected error in the housekeeping thread; it goes on")
            self._housekeeping_done.wait(0.02)

    def _publish_offloaded(self) -> None:
        try:
            emissions = self._offload.poll()
        except Exception:  # noqa: BLE001
            log.exception("collecting off-thread results failed")
            return
        if emissions:
            self.pipeline.publish("offload", emissions)

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

    def _flush_drop_events(self, final: bool) -> None:
        """Publish pending drops, one event per :data:`DROP_EVENT_INTERVAL_S` at most; ``final``
        publishes all that remain (still spaced)."""
        while True:
            wait_s = self._t_last_drop_event + DROP_EVENT_INTERVAL_S - time.monotonic()
            if wait_s > 0:
                if not final:
                    return
                time.sleep(wait_s)
            report = self.accounting.take_drop_report()
            if report is None:
                return
            self._t_last_drop_event = time.monotonic()
            self._router.publish(
                "dropped_frames",
                DroppedFramesBody(reason=report.reason, count=report.count,  # type: ignore[arg-type]
                                  frames_dropped_total=report.dropped_total,
                                  camera_image_number=report.camera_image_number),
            )
            if not final:
                return

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
        self.pipeline.teardown()
        try:  # waits at most offload.teardown_timeout_s; what is left is reported as skipped
            closing = self._offload.close(self.config.offload.teardown_timeout_s)
        except Exception:  # noqa: BLE001
            log.exception("closing the off-thread service failed")
            closing = []
        if closing:
            self.pipeline.publish("offload", closing)
        self._housekeeping_done.set()
        self._threads[1].join()
        self._publish_offloaded()  # what finished in the meantime
        self._close_source()
        self._flush_drop_events(final=True)
        if not self._router.drain(SINK_DRAIN_TIMEOUT_S):
            log.error("the sinks did not catch up within %.0f s", SINK_DRAIN_TIMEOUT_S)
        st = self.status()
        with self._lock:
            exit_status, reason = self._exit_status, self._stop_reason
        body = RunStopBody(
            frames_received=st.frames_received,
            frames_processed=st.frames_processed,
            frames_dropped=st.frames_dropped,
            exit_status=exit_status,
            reason=reason,
            frames_dropped_by_reason=dict(st.frames_dropped_by_reason),
            stage_errors=dict(st.stage_errors),
            duration_s=time.time() - self._t_start,
        )
        self._heartbeat()
        self._router.publish("run_stop", body)
        self.run_stop = body
        self._set_state(RunnerState.STOPPED)
        self._stopped.set()

    def _close_source(self) -> None:
        try:
            self._source.close()
        except Exception as exc:  # noqa: BLE001
            log.error("releasing the source failed: %s", exc)

    def _set_state(self, state: RunnerState) -> None:
        with self._lock:
            self._state = state
        if self._metrics is not None:
            self._metrics.set_state(state.value, [s.value for s in RunnerState])


def new_run_id() -> str:
    return uuid.uuid4().hex
