"""Assembles a daemon from a configuration: metrics, event stream, runner, control."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

import zmq

from scopestream.daemon._config import ScopestreamConfig, stage_plugins
from scopestream.daemon._control import ControlServer
from scopestream.daemon._messages import RunStopBody, WelcomeBody
from scopestream.daemon._metrics import Metrics
from scopestream.daemon._publish import EventRouter, Sink, ZmqPublisher
from scopestream.daemon._runner import Runner, RunnerStatus, new_run_id
from scopestream.daemon._sources import FrameSource, make_source
from scopestream.daemon._tables import TableSink

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
    ) -> None:
        self.config = config
        self.run_id = new_run_id()
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self._ctx = context or zmq.Context.instance()
        self._closables: list[ControlServer] = []
        sinks: list[Sink] = []
        self.publisher: ZmqPublisher | None = None
        self.tables: TableSink | None = None
        try:
            if serve_events:
                self.publisher = ZmqPublisher(
                    config.events.endpoint,
                    config.events.send_hwm_messages,
                    context=self._ctx,
                    on_sent=lambda topic: self.metrics.events_published.labels(topic).inc(),
                    on_subscribe=self._welcome,
                )
                sinks.append(self.publisher)
            if results_dir is not None:
                plugins = stage_plugins(config.stages)
                tables = {t: f for name in config.stages for t, f in plugins[name].tables.items()}
                self.tables = TableSink(results_dir, tables)
                sinks.append(self.tables)
            self.router = EventRouter(self.run_id, sinks)
            self.runner = Runner(config, source or make_source(config), self.router, self.metrics)
            if serve_control:
                self._closables.append(ControlServer(config.control.endpoint, self.runner, self._ctx))
            if config.metrics.enabled:
                self.metrics_port = self.metrics.serve(config.metrics.host, config.metrics.port)
        except BaseException:
            self._close_sockets(sinks)
            raise

    @property
    def events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    @property
    def control_endpoint(self) -> str | None:
        return self._closables[0].endpoint if self._closables else None

    def _welcome(self, prefix: str) -> None:
        if self.publisher is not None:
            self.metrics.subscriptions.set(sum(self.publisher.subscriptions.values()))
        self.router.publish("welcome", WelcomeBody(subscription=prefix, run_id=self.run_id))

    def start(self) -> None:
        """Wait for a subscriber if configured, then start the run (returns at once)."""
        wait_s = self.config.events.wait_for_subscriber_s
        if wait_s > 0 and self.publisher is not None:
            if not self.publisher.subscribed.wait(wait_s):
                log.warning("no subscriber within %.1f s; starting anyway", wait_s)
        self.runner.start()

    def stop(
        self, reason: str = "stop requested", exit_status: Literal["success", "aborted", "failed"] = "success"
    ) -> None:
        """Ask the run to end; ``exit_status`` goes into ``run_stop`` ("aborted" for a signal)."""
        self.runner.request_stop(reason, exit_status)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.runner.wait(timeout_s)

    def status(self) -> RunnerStatus:
        return self.runner.status()

    def close(self) -> RunStopBody | None:
        """Stop if running, wait for run_stop, then close every socket and server."""
        if self.runner.state.value not in ("idle", "stopped"):
            self.runner.request_stop("daemon closed")
            self.runner.wait(60)
        self._close_sockets(self.router.sinks)
        return self.runner.run_stop

    def _close_sockets(self, sinks: Sequence[Sink]) -> None:
        for closable in self._closables:
            closable.close()
        self._closables.clear()
        for sink in sinks:
            sink.close()
        self.metrics.close()

    def run_until_stopped(self, poll_s: float = 0.2) -> RunStopBody | None:
        """Start, block until the run ends (stop command, signal, end of source), close."""
        self.start()
        while not self.runner.wait(poll_s):
            time.sleep(0)
        return self.close()
