"""From emissions to the wire: the router stamps per-topic sequence numbers, the sinks deliver.

Each sink (the ZeroMQ publisher, the result-table writer, the rules engine) is fed from its own
bounded queue by its own thread (:class:`SinkFeed`), so a slow sink delays only itself and a
failing one is reported and closed: neither ever blocks or ends the stage thread. What a full
queue does is the sink's policy: ``drop`` (the publisher: the message is counted in
``scopestream_sink_dropped_total{sink}`` and subscribers see a ``seq`` gap) or ``block`` (the table
writer in ``analyze``: the publishing thread waits for room, nothing is lost).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import zmq
from pydantic import BaseModel

from scopestream.daemon._messages import SCHEMA_VERSION, Header, encode

log = logging.getLogger(__name__)

PUBLISHER_QUEUE_MESSAGES = 10_000
"""Messages waiting for the ZeroMQ publisher's thread before new ones are dropped (and counted)."""

TABLES_QUEUE_MESSAGES = 1_000
"""Messages waiting for the table writer before the publishing thread waits for room."""

RULES_QUEUE_MESSAGES = 1_000
"""Events waiting for the rules engine before new ones are dropped (and counted): rules never slow the stages."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """An emission stamped with its run and per-topic sequence number."""

    run_id: str
    topic: str
    seq: int
    body: BaseModel
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    frame_seq: int | None = None
    t_acquired: float | None = None

    def header(self, t_published: float) -> Header:
        return Header(
            schema_version=SCHEMA_VERSION,
            run_id=self.run_id,
            topic=self.topic,
            seq=self.seq,
            frame_seq=self.frame_seq,
            t_acquired=self.t_acquired,
            t_published=t_published,
        )


@runtime_checkable
class Sink(Protocol):
    """Receives the envelopes of a run, in order per topic, on its own thread.

    ``handle`` may be slow (its queue absorbs bursts) and may raise (the sink is then reported
    and closed). ``close`` is called once, after the last ``handle``.
    """

    def handle(self, envelope: Envelope) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkStats:
    """What a sink's feed has seen: a snapshot for metrics and the end of a run."""

    name: str
    queued: int
    handled: int
    dropped: int
    failed: bool
    error: str | None
    required: bool


class _Close:
    """Sentinel: the feed's thread ends after the envelopes before it."""


_CLOSE = _Close()

SinkFailed = Callable[[str, str, bool], None]
"""``on_failure(sink_name, error, required)``, called on the sink's thread when it fails."""


class SinkFeed:
    """One sink, its bounded queue and its thread.

    Parameters
    ----------
    name
        The sink's name in logs and metrics (``publisher``, ``tables``, ``rules``).
    sink
        The sink.
    capacity
        Envelopes the queue holds.
    when_full
        ``"drop"``: drop the envelope and count it; ``"block"``: the publishing thread waits for
        room (for as long as the sink is alive).
    required
        The run cannot succeed without this sink (the table writer of ``analyze``): its failure
        makes the run fail.
    on_failure
        Called when the sink fails (after it was closed).
    """

    def __init__(
        self,
        name: str,
        sink: Sink,
        capacity: int,
        when_full: Literal["drop", "block"],
        required: bool = False,
        on_failure: SinkFailed | None = None,
    ) -> None:
        if not isinstance(sink, Sink):
            raise TypeError(f"sink {name!r} ({type(sink).__name__}) needs handle(envelope) and close()")
        self.name = name
        self.sink = sink
        self.when_full = when_full
        self.required = required
        self._on_failure = on_failure
        self._queue: queue.Queue[Envelope | _Close] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._handled = 0
        self._dropped = 0
        self._error: str | None = None
        self._failed = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"scopestream-sink-{name}", daemon=True)
        self._thread.start()

    def offer(self, envelope: Envelope) -> None:
        """Queue ``envelope`` for the sink (drop or wait when full, as configured)."""
        if self._failed.is_set() or self._closed:
            self._count_dropped()
            return
        if self.when_full == "drop":
            try:
                self._queue.put_nowait(envelope)
            except queue.Full:
                self._count_dropped()
            return
        while True:
            try:
                self._queue.put(envelope, timeout=0.1)
                return
            except queue.Full:
                if self._failed.is_set() or not self._thread.is_alive():
                    self._count_dropped()
                    return

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued envelope was handled; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._queue.all_tasks_done.wait(min(remaining, 0.1))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Let the sink handle what is queued (up to ``timeout_s``), then close it."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_CLOSE, timeout=timeout_s)
        except queue.Full:
            log.error("sink %s: still %d messages behind after %.0f s; closing it anyway",
                      self.name, self._queue.qsize(), timeout_s)
        self._thread.join(timeout_s)
        if not self._failed.is_set():
            try:
                self.sink.close()
            except Exception as exc:  # noqa: BLE001 - closing must go on for the other sinks
                self._fail(exc, closing=True)

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(self.name, self._queue.qsize(), self._handled, self._dropped,
                             self._failed.is_set(), self._error, self.required)

    def _count_dropped(self) -> None:
        with self._lock:
            self._dropped += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if isinstance(item, _Close):
                    return
                if self._failed.is_set():
                    self._count_dropped()  # what was queued when it failed is lost
                    continue
                try:
                    self.sink.handle(item)
                except Exception as exc:  # noqa: BLE001 - a failing sink must not end anything else
                    self._fail(exc)
                    self._count_dropped()
                    continue
                with self._lock:
                    self._handled += 1
            finally:
                self._queue.task_done()

    def _fail(self, exc: BaseException, closing: bool = False) -> None:
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) or not str(exc) else str(exc)
        with self._lock:
            self._error = error
        self._failed.set()
        log.error("sink %s failed%s: %s", self.name, " while closing" if closing else "; it is closed", error)
        if not closing:
            try:
                self.sink.close()
            except Exception as close_exc:  # noqa: BLE001
                log.error("sink %s: closing it failed too: %s", self.name, close_exc)
        if self._on_failure is not None:
            try:
                self._on_failure(self.name, error, self.required)
            except Exception:  # noqa: BLE001
                log.exception("sink %s: the failure callback failed", self.name)


class EventRouter:
    """Stamps envelopes (per-topic ``seq`` from 0, no gaps) and hands them to the sinks' feeds.

    Thread-safe: the camera thread, the stage thread and the housekeeping thread all publish here.
    Stamping and queueing happen under one lock, so every sink sees each topic in ``seq`` order.

    Parameters
    ----------
    run_id
        The run's id, in every header.
    on_sink_failure
        Called (on the failing sink's thread) with the sink's name, the error and whether the sink
        is required.
    """

    def __init__(self, run_id: str, on_sink_failure: SinkFailed | None = None) -> None:
        self.run_id = run_id
        self._feeds: list[SinkFeed] = []
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self._on_sink_failure = on_sink_failure

    def set_failure_handler(self, on_sink_failure: SinkFailed) -> None:
        self._on_sink_failure = on_sink_failure

    def add_sink(
        self,
        name: str,
        sink: Sink,
        capacity: int,
        when_full: Literal["drop", "block"] = "drop",
        required: bool = False,
    ) -> SinkFeed:
        """Feed ``sink`` from now on, from its own queue and thread."""
        with self._lock:
            if any(f.name == name for f in self._feeds):
                raise ValueError(f"a sink named {name!r} is already attached")
            feed = SinkFeed(name, sink, capacity, when_full, required, self._sink_failed)
            self._feeds.append(feed)
        return feed

    @property
    def sinks(self) -> list[Sink]:
        return [f.sink for f in self._feeds]

    def sink_stats(self) -> list[SinkStats]:
        return [f.stats() for f in self._feeds]

    def publish(
        self,
        topic: str,
        body: BaseModel,
        arrays: Mapping[str, np.ndarray] | None = None,
        frame_seq: int | None = None,
        t_acquired: float | None = None,
    ) -> None:
        if not isinstance(topic, str) or not topic:
            raise TypeError(f"a topic must be a non-empty str, not {topic!r}")
        if not isinstance(body, BaseModel):
            raise TypeError(f"topic {topic!r}: the body must be a pydantic model, not {type(body).__name__}")
        with self._lock:
            seq = self._seq.get(topic, 0)
            self._seq[topic] = seq + 1
            env = Envelope(self.run_id, topic, seq, body, arrays or {}, frame_seq, t_acquired)
            for feed in self._feeds:
                feed.offer(env)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every sink has handled what was published so far; False on timeout."""
        deadline = time.monotonic() + timeout_s
        return all(f.drain(max(0.0, deadline - time.monotonic())) for f in list(self._feeds))

    def close(self, timeout_s: float = 10.0) -> None:
        """Let each sink finish its queue, then close it."""
        for feed in list(self._feeds):
            feed.close(timeout_s)

    def _sink_failed(self, name: str, error: str, required: bool) -> None:
        if self._on_sink_failure is not None:
            self._on_sink_failure(name, error, required)


def bind_socket(socket: zmq.Socket[bytes], endpoint: str, role: str) -> str:
    """Bind ``socket`` to ``endpoint``; returns the bound endpoint (with the port a ``:0`` got).

    On failure the socket is closed and an OSError names the role and the endpoint.
    """
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        socket.close(0)
        raise OSError(f"cannot bind the {role} to {endpoint!r}: {exc}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


SUBSCRIPTION_CHECK_S = 0.02
"""How often the publisher looks for (un)subscriptions, s (a subscriber is seen within this)."""


class ZmqPublisher:
    """A ZeroMQ XPUB socket; a :class:`Sink` whose ``handle`` runs on its own feed thread.

    XPUB (rather than PUB) lets the daemon see subscriptions: a small thread reads them and each
    one is answered with a ``welcome`` message (through ``on_subscribe``), so a subscriber knows
    when it is live and a run can wait for its first subscriber. ``XPUB_VERBOSER`` passes every
    subscribe and every unsubscribe (also the ones ZeroMQ generates when a subscriber disconnects),
    so :meth:`subscription_count` follows subscribers as they come and go. The socket is shared by
    the sending thread and the subscription thread under one lock. Above the send high-water mark
    a subscriber loses messages; the daemon never waits for it.
    """

    def __init__(
        self,
        endpoint: str,
        send_hwm_messages: int,
        context: zmq.Context | None = None,
        on_sent: Callable[[str], None] | None = None,
        on_subscribe: Callable[[str], None] | None = None,
    ) -> None:
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, send_hwm_messages)
        self._socket.setsockopt(zmq.XPUB_VERBOSER, 1)
        self._socket.setsockopt(zmq.LINGER, 2000)
        self.endpoint = bind_socket(self._socket, endpoint, "event stream")
        self._lock = threading.Lock()
        self._closed = False
        self._on_sent = on_sent
        self._on_subscribe = on_subscribe
        self.subscriptions: dict[str, int] = {}
        self.subscribed = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._watch_subscriptions, name="scopestream-subscriptions", daemon=True)
        self._thread.start()

    def subscription_count(self) -> int:
        """Topic subscriptions open now, over all subscribers."""
        with self._lock:
            return sum(self.subscriptions.values())

    def handle(self, envelope: Envelope) -> None:
        frames = encode(envelope.header(time.time()), envelope.body, envelope.arrays)
        with self._lock:
            if self._closed:
                return
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames) <= 3)
            except zmq.Again:  # pragma: no cover - XPUB drops at the HWM rather than raising
                return
        if self._on_sent is not None:
            self._on_sent(envelope.topic)

    def close(self) -> None:
        """Close the socket; messages already sent are flushed for up to the linger time."""
        self._closing.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close()

    def _watch_subscriptions(self) -> None:
        # The socket is not thread-safe (the sink thread sends on it), so the watcher cannot block
        # in a poll on it: it looks every SUBSCRIPTION_CHECK_S under the lock, and asks the socket
        # whether a message waits (ZMQ_EVENTS) rather than letting recv raise zmq.Again.
        while not self._closing.wait(SUBSCRIPTION_CHECK_S):
            new: list[str] = []
            with self._lock:
                if self._closed:
                    return
                while self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    try:
                        msg = self._socket.recv(zmq.NOBLOCK)
                    except zmq.Again:  # pragma: no cover - EVENTS said there was one
                        break
                    if not msg:
                        continue
                    prefix = msg[1:].decode("ascii", errors="replace")
                    if msg[0] == 1:
                        self.subscriptions[prefix] = self.subscriptions.get(prefix, 0) + 1
                        new.append(prefix)
                    elif msg[0] == 0 and self.subscriptions.get(prefix):
                        self.subscriptions[prefix] -= 1
                        if not self.subscriptions[prefix]:
                            del self.subscriptions[prefix]
            for prefix in new:  # outside the lock: the callback publishes
                if prefix in ("", "welcome"):
                    self.subscribed.set()
                if self._on_subscribe is not None:
                    self._on_subscribe(prefix)
