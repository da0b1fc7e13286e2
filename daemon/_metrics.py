"""Prometheus metrics, one registry per daemon, served over HTTP on 127.0.0.1 by default."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_wsgi_server
from prometheus_client.registry import Collector

_LATENCY_BUCKETS_S = (
    5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)


class _StageCounters(Collector):
    """Whatever running totals the stages report through ``counters()``, read at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "scopestream_stage_counter", "Running totals reported by stages (e.g. MUSICAL windows skipped).",
            labels=["stage", "name"],
        )
        for stage, counters in self._read().items():
            for name, value in counters.items():
                family.add_metric([stage, name], float(value))
        yield family


class Metrics:
    """The daemon's metrics. Every name starts with ``scopestream_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_received = Counter("scopestream_frames_received", "Frames known to the daemon (delivered, or known lost in the camera).", registry=r)
        self.frames_processed = Counter("scopestream_frames_processed", "Frames that went through every stage.", registry=r)
        self.frames_dropped = Counter("scopestream_frames_dropped", "Frames lost, by where.", ["reason"], registry=r)
        for reason in ("camera_gap", "camera_overflow", "bus_full"):
            self.frames_dropped.labels(reason)
        self.stage_latency = Histogram("scopestream_stage_latency_seconds", "Time a stage took on one frame.", ["stage"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.stage_errors = Counter("scopestream_stage_errors", "Frames a stage raised on.", ["stage"], registry=r)
        self.frame_latency = Histogram("scopestream_frame_latency_seconds", "From acquisition to the end of the last stage.", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.events_published = Counter("scopestream_events_published", "Messages handed to the event socket.", ["topic"], registry=r)
        self.queue_depth = Gauge("scopestream_queue_depth_frames", "Frames waiting in the bus.", registry=r)
        self.camera_frame_rate = Gauge("scopestream_camera_frame_rate_hz", "Frame rate the source delivers (moving average).", registry=r)
        self.state = Gauge("scopestream_runner_state", "1 for the runner's current state.", ["state"], registry=r)
        self.subscriptions = Gauge("scopestream_event_subscriptions", "Topic subscriptions currently open on the event socket.", registry=r)
        self._server: Any = None
        self._lock = threading.Lock()

    def watch_stages(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self.registry.register(_StageCounters(read))

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
