"""From emissions to the wire: the router stamps per-topic sequence numbers, the sinks deliver.

The ZeroMQ socket is owned by one thread (:class:`ZmqPublisher`); every other thread hands it
envelopes through a queue, so a slow subscriber (PUB high-water mark) or a slow encoder never
blocks the camera thread or the stages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import zmq
from pydantic import BaseModel

from scopestream.daemon._messages import SCHEMA_VERSION, Header, encode

log = logging.getLogger(__name__)


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
    """Receives every envelope of a run, in order per topic. Must not block for long."""

    def handle(self, envelope: Envelope) -> None: ...

    def close(self) -> None: ...


class EventRouter:
    """Stamps envelopes (per-topic ``seq`` from 0, no gaps) and hands them to the sinks.

    Thread-safe: the camera thread, the stage thread and the heartbeat thread all publish here.
    """

    def __init__(self, run_id: str, sinks: Sequence[Sink]) -> None:
        self.run_id = run_id
        self._sinks = list(sinks)
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def sinks(self) -> list[Sink]:
        return list(self._sinks)

    def publish(
        self,
        topic: str,
        body: BaseModel,
        arrays: Mapping[str, np.ndarray] | None = None,
        frame_seq: int | None = None,
        t_acquired: float | None = None,
    ) -> None:
        with self._lock:
            seq = self._seq.get(topic, 0)
            self._seq[topic] = seq + 1
            env = Envelope(self.run_id, topic, seq, body, arrays or {}, frame_seq, t_acquired)
            for sink in self._sinks:
                sink.handle(env)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


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


class ZmqPublisher:
    """A ZeroMQ XPUB socket, sent to from whichever thread publishes, under one lock.

    Sending in the publishing thread (rather than handing each message to a sender thread) saves
    one thread wake-up per message, which is most of the camera-to-subscriber latency. ZeroMQ
    sockets may be used from several threads when every access is serialized, as here.

    XPUB (rather than PUB) lets the daemon see subscriptions: a small thread reads them and each
    one is answered with a ``welcome`` message (through ``on_subscribe``), so a subscriber knows
    when it is live and a run can wait for its first subscriber. Above the send high-water mark a
    subscriber loses messages; the daemon never waits for it.
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
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
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
            self._closed = True
            self._socket.close()

    def _watch_subscriptions(self) -> None:
        while not self._closing.wait(0.005):
            new: list[str] = []
            with self._lock:
                while True:
                    try:
                        msg = self._socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if not msg:
                        continue
                    prefix = msg[1:].decode("ascii", errors="replace")
                    if msg[0] == 1:
                        self.subscriptions[prefix] = self.subscriptions.get(prefix, 0) + 1
                        new.append(prefix)
                    elif msg[0] == 0 and self.subscriptions.get(prefix):
                        self.subscriptions[prefix] -= 1
            for prefix in new:  # outside the lock: the callback publishes
                if prefix in ("", "welcome"):
                    self.subscribed.set()
                if self._on_subscribe is not None:
                    self._on_subscribe(prefix)
