"""Assembles a daemon from a configuration: metrics, event stream, runner, control."""

from __future__ import annotations

import logging
import time

import zmq

from scopestream.daemon._actuators import ActionService, LazyActuators, NoActuators, Trigger
from scopestream.daemon._config import ScopestreamConfig, stage_plugins
from scopestream.daemon._control import ControlServer
from scopestream.daemon._curve import ControlSecurity
from scopestream.daemon._messages import ActionBody, RunStopBody, WelcomeBody
from scopestream.daemon._metrics import Metrics
from scopestream.daemon._publish import (
    PUBLISHER_QUEUE_MESSAGES,
    RULES_QUEUE_MESSAGES,
    TABLES_QUEUE_MESSAGES,
    EventRouter,
    ZmqPublisher,
)
from scopestream.daemon._rules import FieldOfView, RulesSink
from scopestream.daemon._runner import ExitStatus, Runner, RunnerStatus, new_run_id
from scopestream.daemon._sources import FrameSource, make_source
from scopestream.daemon._stage import Offload
from scopestream.daemon._tables import ImageSink, TableSink

log = logging.getLogger(__name__)


class Daemon:
    """One run of scopestream: everything ``scopestream run`` (and ``analyze``) starts.

    Parameters
    ----------
    config
        The validated configuration.
    source
        Frames to analyse; default: the one the configuration names.
    serve_events, serve_control
        Bind the event stream / control channel (``analyze`` needs neither).
    results_dir
        Write result tables (CSV) here, as ``analyze`` does.
    context
        ZeroMQ context (tests share one to use ``inproc://`` endpoints).
    offload
        The off-thread service the stages get in their ``RunContext``; default: jobs run on the
        submitting thread and their results are published from the housekeeping tick.
    """

    def __init__(
        self,
        config: ScopestreamConfig,
        source: FrameSource | None = None,
        *,
        serve_events: bool = True,
        serve_control: bool = True,
        results_dir: str | None = None,
        context: zmq.Context | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.config = config
        self.run_id = new_run_id()
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self._ctx = context or zmq.Context.instance()
        self._closables: list[ControlServer] = []
        self._security: ControlSecurity | None = None
        self.publisher: ZmqPublisher | None = None
        self.tables: TableSink | None = None
        self.router = EventRouter(self.run_id, on_sink_failure=self._sink_failed)
        self.metrics.watch_sinks(self.router.sink_stats)
        try:
            if serve_events:
                self.publisher = ZmqPublisher(
                    config.events.endpoint,
                    config.events.send_hwm_messages,
                    context=self._ctx,
                    on_sent=lambda topic: self.metrics.events_published.labels(topic).inc(),
                    on_subscribe=self._welcome,
                )
                self.metrics.subscriptions.set_function(self.publisher.subscription_count)
                self.router.add_sink("publisher", self.publisher, PUBLISHER_QUEUE_MESSAGES, "drop")
            if results_dir is not None:
                plugins = stage_plugins(config.stages)
                tables = {t: f for name in config.stages for t, f in plugins[name].tables.items()}
                self.tables = TableSink(results_dir, tables)
                # analyze: a slow writer slows the run down, nothing is lost; without it the run fails.
                self.router.add_sink("tables", self.tables, TABLES_QUEUE_MESSAGES, "block", required=True)
                if "musical" in config.stages:  # MUSICAL images as TIFF files under <out>/musical/
                    images = ImageSink(results_dir, {"musical": "musical"})
                    self.router.add_sink("images", images, TABLES_QUEUE_MESSAGES, "block", required=True)
            source = source or make_source(config)
            # Actuators come from the source once it is open; actions from clients and rules go
            # through one service that checks the limits and publishes each on topic `action`.
            get_actuators = getattr(source, "actuators", None)
            self.actions = ActionService(
                LazyActuators(get_actuators if get_actuators is not None else lambda: NoActuators(type(source).__name__)),
                None, config.limits, self._publish_action,
            )
            self.rules: RulesSink | None = None
            if config.rules:
                self.rules = RulesSink(config.rules, self.actions, self._rule_context)
                # Rules never slow the stages: a rules sink that falls behind loses events (counted).
                self.router.add_sink("rules", self.rules, RULES_QUEUE_MESSAGES, "drop")
            self.runner = Runner(config, source, self.router, self.metrics, offload)
            self.actions.acquisition = self.runner
            self.actions.timing_listener = self.runner.pipeline.change_timing
            if serve_control:
                self._security = ControlSecurity(config.control, self._ctx)
                self._closables.append(ControlServer(
                    config.control.endpoint, self.runner, self._ctx,
                    act=self.actions.act, read_only=config.control.read_only,
                    secure=self._security.apply, on_stop=self.actions.stop_requested.set,
                ))
            if config.metrics.enabled:
                self.metrics_port = self.metrics.serve(config.metrics.host, config.metrics.port)
        except BaseException:
            self._close_sockets()
            raise

    @property
    def events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    @property
    def control_endpoint(self) -> str | None:
        return self._closables[0].endpoint if self._closables else None

    def _publish_action(self, body: ActionBody, trigger: Trigger) -> None:
        self.metrics.observe_action(body)
        self.router.publish("action", body, frame_seq=trigger.frame_seq, t_acquired=trigger.t_acquired)

    def _rule_context(self) -> FieldOfView | None:
        desc = self.runner.source_description
        if desc is None:
            return None
        context = self.runner.pipeline.context  # its timing follows rate switches
        acq = self.config.acquisition
        interval_ms = context.frame_interval_ms if context is not None else max(acq.frame_interval_ms, acq.exposure_ms)
        exposure_ms = context.exposure_ms if context is not None else acq.exposure_ms
        return FieldOfView(desc.width_px, desc.height_px, self.config.optics.pixel_size_nm, interval_ms / 1000.0,
                           exposure_ms / 1000.0, self.actions.xy_position_at)

    def _welcome(self, prefix: str) -> None:
        self.router.publish("welcome", WelcomeBody(subscription=prefix, run_id=self.run_id))

    def start(self) -> None:
        """Wait for a subscriber if configured, then start the run (returns at once)."""
        wait_s = self.config.events.wait_for_subscriber_s
        if wait_s > 0 and self.publisher is not None:
            if not self.publisher.subscribed.wait(wait_s):
                log.warning("no subscriber within %.1f s; starting anyway", wait_s)
        self.runner.start()

    def stop(self, reason: str = "stop requested", exit_status: ExitStatus = "success") -> None:
        """End the run: ``exit_status`` is ``"aborted"`` for a signal, ``"failed"`` for an error."""
        self.runner.request_stop(reason, exit_status)

    def _sink_failed(self, name: str, error: str, required: bool) -> None:
        if required and hasattr(self, "runner"):
            self.runner.request_stop(f"the {name} sink failed: {error}", "failed")

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.runner.wait(timeout_s)

    def status(self) -> RunnerStatus:
        return self.runner.status()

    def close(self) -> RunStopBody | None:
        """Stop if running, wait for run_stop, then close every socket and server."""
        if self.runner.state.value not in ("idle", "stopped"):
            self.runner.request_stop("daemon closed")
            self.runner.wait(60)
        self._close_sockets()
        return self.runner.run_stop

    def _close_sockets(self) -> None:
        for closable in self._closables:
            closable.close()
        self._closables.clear()
        if self._security is not None:
            self._security.close()
            self._security = None
        self.router.close()
        if self.publisher is not None and not self.router.sinks:  # failed before it was attached
            self.publisher.close()
        self.metrics.close()

    def run_until_stopped(self, poll_s: float = 0.2) -> RunStopBody | None:
        """Start, block until the run ends (stop command, signal, end of source), close.

        A start that fails (a configuration that does not load, a stage that cannot set up)
        closes the daemon before the error propagates: its threads must not outlive the caller
        (left running at interpreter exit they abort the process: "exception not rethrown")."""
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        while not self.runner.wait(poll_s):
            time.sleep(0)
        return self.close()
