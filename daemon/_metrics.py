"""Prometheus metrics, one registry per daemon, served over HTTP on 127.0.0.1 by default.

Counts of frames and stage errors are not kept here: collectors read them from the run's
:class:`~scopestream.daemon._accounting.Accounting` (and the sinks' feeds) at scrape time, so the
metrics, the status reply and ``run_stop`` come from one source of truth. Histograms (latencies)
and the per-topic message counter are observed where the events happen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_wsgi_server
from prometheus_client.registry import Collector

from scopestream.daemon._accounting import DROP_REASONS, Accounting
from scopestream.daemon._publish import SinkStats

_LATENCY_BUCKETS_S = (
    5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)


class _StageCounters(Collector):
    """Whatever running totals the stages report through ``counters()``, read at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "scopestream_stage_counter", "Running totals reported by stages (e.g. MUSICAL windows skipped).",
            labels=["stage", "name"],
        )
        for stage, counters in self._read().items():
            for name, value in counters.items():
                family.add_metric([stage, name], float(value))
        yield family


class _AccountingCollector(Collector):
    """Frame counts and stage errors, read from the accounting at scrape time."""

    def __init__(self, accounting: Accounting) -> None:
        self._accounting = accounting

    def collect(self) -> Iterable[Metric]:
        c = self._accounting.snapshot()
        yield CounterMetricFamily("scopestream_frames_received", "Frames known to the daemon (delivered, or known lost in the camera).", value=c.received)
        yield CounterMetricFamily("scopestream_frames_processed", "Frames that went through every stage.", value=c.processed)
        dropped = CounterMetricFamily("scopestream_frames_dropped", "Frames lost, by where.", labels=["reason"])
        for reason in DROP_REASONS:
            dropped.add_metric([reason], c.dropped_by_reason.get(reason, 0))
        yield dropped
        yield GaugeMetricFamily("scopestream_frames_in_flight", "Frames received but not yet processed or dropped.", value=c.in_flight)
        errors = CounterMetricFamily("scopestream_stage_errors", "Stage failures: frames a stage raised on, settings it refused, emissions it could not publish.", labels=["stage"])
        for stage, n in sorted(c.stage_errors.items()):
            errors.add_metric([stage], n)
        yield errors
        yield GaugeMetricFamily("scopestream_camera_frame_rate_hz", "Frame rate the source delivers (moving average).", value=c.frame_rate_hz)


class _SinkCollector(Collector):
    """Each sink's queue, losses and health, read from the router at scrape time."""

    def __init__(self, read: Callable[[], Sequence[SinkStats]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        stats = self._read()
        dropped = CounterMetricFamily("scopestream_sink_dropped", "Messages a sink lost (its queue was full, or it had failed).", labels=["sink"])
        depth = GaugeMetricFamily("scopestream_sink_queue_depth", "Messages waiting in a sink's queue.", labels=["sink"])
        failed = GaugeMetricFamily("scopestream_sink_failed", "1 when a sink failed and was closed.", labels=["sink"])
        for s in stats:
            dropped.add_metric([s.name], s.dropped)
            depth.add_metric([s.name], s.queued)
            failed.add_metric([s.name], 1.0 if s.failed else 0.0)
        yield dropped
        yield depth
        yield failed


class Metrics:
    """The daemon's metrics. Every name starts with ``scopestream_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_latency = Histogram("scopestream_stage_latency_seconds", "Time a stage took on one frame.", ["stage"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.frame_latency = Histogram("scopestream_frame_latency_seconds", "From acquisition to the end of the last stage.", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.events_published = Counter("scopestream_events_published", "Messages handed to the event socket.", ["topic"], registry=r)
        self.queue_depth = Gauge("scopestream_queue_depth_frames", "Frames waiting in the bus.", registry=r)
        self.state = Gauge("scopestream_runner_state", "1 for the runner's current state.", ["state"], registry=r)
        self.subscriptions = Gauge("scopestream_event_subscriptions", "Topic subscriptions currently open on the event socket.", registry=r)
        self.actions = Counter(
            "scopestream_actions", "Actuator actions (act from clients, rule firings), by action, result "
            "(done, refused: never reached the actuator, failed: the actuator raised) and origin (client, rule).",
            ["action", "result", "origin"], registry=r,
        )
        self.action_latency = Histogram(
            "scopestream_action_latency_seconds", "Latencies of done actions: span acquired_to_called (the "
            "triggering frame acquired -> actuator called), acquired_to_done, called_to_done (the actuator itself).",
            ["action", "origin", "span"], buckets=_LATENCY_BUCKETS_S, registry=r,
        )
        self._server: Any = None
        self._lock = threading.Lock()

    def watch_accounting(self, accounting: Accounting) -> None:
        """Export the run's frame counts and stage errors, read at scrape time."""
        self.registry.register(_AccountingCollector(accounting))

    def watch_stages(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self.registry.register(_StageCounters(read))

    def watch_sinks(self, read: Callable[[], Sequence[SinkStats]]) -> None:
        self.registry.register(_SinkCollector(read))

    def observe_action(self, body: Any) -> None:
        """Count one action (an ``ActionBody``) and observe its latencies."""
        result = "done" if body.ok else ("refused" if body.t_called is None else "failed")
        self.actions.labels(body.action, result, body.origin).inc()
        if not body.ok:
            return
        spans = (("acquired_to_called", body.acquired_to_called_ms), ("acquired_to_done", body.acquired_to_done_ms),
                 ("called_to_done", body.actuator_ms))
        for span, ms in spans:
            if ms is not None:
                self.action_latency.labels(body.action, body.origin, span).observe(max(0.0, ms / 1000.0))

    def set_state(self, state: str, states: Iterable[str]) -> None:
        for s in states:
            self.state.labels(s).set(1.0 if s == state else 0.0)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (useful with port 0)."""
        try:
            server, _ = start_wsgi_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
