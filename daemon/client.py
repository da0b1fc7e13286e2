"""A typed Python client for the event stream and the control channel.

Example::

    from scopestream.client import Subscriber, ControlClient

    with Subscriber("tcp://127.0.0.1:5556", topics=["track", "run_stop"]) as sub:
        sub.wait_ready()
        for msg in sub:
            print(msg.topic, msg.header.seq, msg.body)
            if msg.topic == "run_stop":
                break
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import zmq
import zmq.auth as zmq_auth

from scopestream.daemon._messages import Message, WireError, decode

__all__ = ["ControlClient", "ControlError", "Message", "Subscriber", "WireError"]


class Subscriber:
    """Subscribe to topics of a scopestream daemon and iterate decoded messages.

    Topics match exactly (ZeroMQ filters by prefix; the client drops the rest). Sequence gaps per
    (run, topic) are counted in :attr:`gaps`: a gap means messages were lost (a slow subscriber
    past the daemon's high-water mark, or a late start).

    Parameters
    ----------
    endpoint
        The daemon's ``events.endpoint``.
    topics
        Topics to receive; empty means all.
    rcvhwm_messages
        Receive high-water mark.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5556",
        topics: Iterable[str] = (),
        context: zmq.Context | None = None,
        rcvhwm_messages: int = 100000,
    ) -> None:
        self.topics = frozenset(topics)
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.RCVHWM, rcvhwm_messages)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)
        for topic in sorted(self.topics) or [""]:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self._last_seq: dict[tuple[str, str], int] = {}
        self.gaps: dict[str, int] = {}
        self._buffer: deque[Message] = deque()
        self._welcomed = False

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Wait until the daemon has our subscriptions (it answers with ``welcome``).

        Subscribes to ``welcome`` last: ZeroMQ applies one connection's subscriptions in order, so
        once a welcome arrives every earlier subscription is live. Messages that arrive meanwhile
        are kept for iteration. Returns False if no daemon answered in time.
        """
        if self._welcomed:
            return True
        if self.topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, b"welcome")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self._recv_raw(max(0.0, deadline - time.monotonic()))
            if msg is None:
                break
            if msg.topic == "welcome":
                self._welcomed = True
                if self.topics:
                    self._socket.setsockopt(zmq.UNSUBSCRIBE, b"welcome")
                return True
            self._buffer.append(msg)
        return False

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next message of a subscribed topic, or None after ``timeout_s``."""
        if self._buffer:
            return self._buffer.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self._recv_raw(remaining)
            if msg is None:
                return None
            if msg.topic == "welcome" and "welcome" not in self.topics:
                continue
            if self.topics and msg.topic not in self.topics:
                continue
            return msg

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.recv()
            if msg is not None:
                yield msg

    def _recv_raw(self, timeout_s: float | None) -> Message | None:
        timeout_ms = -1 if timeout_s is None else int(timeout_s * 1000)
        if not self._socket.poll(timeout_ms):
            return None
        msg = decode(self._socket.recv_multipart(copy=True))
        key = (msg.header.run_id, msg.topic)
        last = self._last_seq.get(key)
        if last is not None and msg.header.seq != last + 1:
            self.gaps[msg.topic] = self.gaps.get(msg.topic, 0) + max(0, msg.header.seq - last - 1)
        self._last_seq[key] = msg.header.seq
        return msg

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class ControlError(RuntimeError):
    """The daemon answered ``ok: false`` (the message is its ``error``), or did not answer."""


class ControlClient:
    """Send control requests (REQ) to a daemon's ``control.endpoint``.

    For a daemon that requires CURVE (control bound to a non-loopback address), give the server's
    public key (``curve_server_key``, z85 bytes, e.g. from ``zmq.auth.load_certificate("server.key")``)
    and this client's key pair (``curve_client_key_file``, a ``.key_secret`` file whose public key
    the daemon allows).
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        context: zmq.Context | None = None,
        timeout_s: float = 5.0,
        *,
        curve_server_key: bytes | None = None,
        curve_client_key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        self._curve: tuple[bytes, bytes, bytes] | None = None
        if curve_server_key is not None or curve_client_key_file is not None:
            if curve_server_key is None or curve_client_key_file is None:
                raise ValueError("CURVE needs both curve_server_key and curve_client_key_file")
            public, secret = zmq_auth.load_certificate(curve_client_key_file)
            if not secret:
                raise ValueError(f"{curve_client_key_file}: no secret key (use the .key_secret file)")
            self._curve = (curve_server_key, public, secret)
        self._socket = self._new_socket()

    def _new_socket(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self._curve
        sock.connect(self.endpoint)
        return sock

    def request_raw(self, payload: bytes) -> dict[str, Any]:
        """Send raw bytes (for testing malformed requests); return the decoded reply."""
        self._socket.send(payload)
        if not self._socket.poll(int(self.timeout_s * 1000)):
            self._socket.close(0)
            self._socket = self._new_socket()  # a REQ socket is stuck after a lost reply
            raise ControlError(f"no reply from {self.endpoint} within {self.timeout_s} s")
        reply: dict[str, Any] = json.loads(self._socket.recv())
        return reply

    def request(self, command: str, **fields: Any) -> dict[str, Any]:
        """Send ``{"command": command, **fields}``; raise ControlError if the reply is not ok."""
        reply = self.request_raw(json.dumps({"command": command, **fields}).encode())
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error")))
        return reply

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.request("status")["status"]
        return status

    def set(self, key: str, value: Any) -> Any:
        return self.request("set", key=key, value=value)["value"]

    def act(self, action: str, **params: Any) -> dict[str, Any]:
        """Drive an actuator (``act``): e.g. ``act("move_xy", x_um=1.0, y_um=0.0)``; returns the
        reply (``ok``, ``state``, ``t_done``) and raises ControlError when refused."""
        return self.request("act", action=action, **params)

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
