"""The control channel: ZeroMQ ROUTER, one JSON object per request, one JSON object per reply.

Requests: ``{"command": "status"}``, ``pause``, ``resume``, ``stop``,
``{"command": "set", "key": "dotted.key", "value": ...}``, ``{"command": "act", "action": ...}``
(carried out by :mod:`scopestream.daemon._actuators`). Every reply is one JSON object with
``ok``; a failure carries ``error`` naming the problem. Nothing a client sends can stop the daemon
or the channel except ``stop``. In read-only mode ``act`` and ``set`` are refused.

A ROUTER socket (not REP) so that no framing breaks the channel: REP has a strict
receive-then-send state machine and raises on what does not fit it, whereas a ROUTER sees every
message with its peer's envelope. A REQ client (the usual one) gets exactly one reply per request;
a multipart request is answered ``ok: false``; a DEALER client is answered with the envelope it
sent; a peer that speaks broken ZMTP is dropped by libzmq without reaching this code.

Bounds: a request is at most :data:`MAX_REQUEST_BYTES` (larger ones up to
:data:`HARD_LIMIT_BYTES` are answered ``ok: false`` naming the limit; beyond that libzmq drops the
connection unread, ``ZMQ_MAXMSGSIZE``), nests at most :data:`MAX_JSON_DEPTH` levels, and no reply
echoes more than a few hundred characters of what was sent.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from scopestream.daemon._errors import ConfigError
from scopestream.daemon._publish import bind_socket
from scopestream.daemon._runner import Runner, RunnerState

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "stop", "set", "act")

ActHandler = Callable[[Mapping[str, Any]], dict[str, Any]]

MAX_REQUEST_BYTES = 64 * 1024
"""Largest request answered, bytes; a larger one is refused with ``ok: false`` naming this limit."""
HARD_LIMIT_BYTES = 1 << 20
"""``ZMQ_MAXMSGSIZE``: a peer sending a frame larger than this is disconnected without an answer."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of objects and arrays in a request."""
MAX_FRAMES = 16
"""Most frames (envelope included) read from one message; the rest are discarded."""
_ECHO_CHARS = 120


def _short(value: Any) -> str:
    """``repr(value)`` cut short: a reply never echoes a large request back."""
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else f"{text[:_ECHO_CHARS]}… ({len(text)} characters)"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests dicts/lists deeper than ``limit`` (iterative: no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())]
        if not level:
            return False
    return True


def _fail(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


class ControlServer:
    """Answers control requests on its own thread until closed.

    Parameters
    ----------
    endpoint
        ZeroMQ endpoint to bind (``tcp://127.0.0.1:0`` picks a free port; see ``endpoint``).
    runner
        The run that requests act on.
    context
        ZeroMQ context (tests share one for ``inproc://``).
    """

    def __init__(
        self,
        endpoint: str,
        runner: Runner,
        context: zmq.Context | None = None,
        *,
        act: ActHandler | None = None,
        read_only: bool = False,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._runner = runner
        self._act = act
        self._read_only = read_only
        self._on_stop = on_stop
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 500)
        if secure is not None:
            secure(self._socket)  # CURVE server options, before bind
        self._socket.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT_BYTES)
        self._socket.setsockopt(zmq.RCVHWM, 100)
        self._socket.setsockopt(zmq.SNDHWM, 100)
        self.endpoint = bind_socket(self._socket, endpoint, "control channel")
        self.requests_answered = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scopestream-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)

    # -- the loop ---------------------------------------------------------------------------
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._closing.is_set():
                try:
                    if not poller.poll(50):
                        continue
                    self._serve_one()
                except zmq.ZMQError as exc:  # never let the channel die: log and go on
                    if self._closing.is_set() or exc.errno == zmq.ETERM:
                        break
                    log.warning("control channel: %s", exc)
                except Exception:  # noqa: BLE001 - the channel outlives any one request
                    log.exception("control channel: unexpected failure; still serving")
        finally:
            self._socket.close()

    def _receive(self) -> tuple[list[bytes], int]:
        """One whole message: its first MAX_FRAMES frames and the number of frames it had."""
        frames: list[bytes] = []
        count = 0
        while True:
            frame = self._socket.recv(zmq.NOBLOCK)
            count += 1
            if len(frames) < MAX_FRAMES:
                frames.append(frame)
            if not self._socket.getsockopt(zmq.RCVMORE):
                return frames, count

    def _serve_one(self) -> None:
        try:
            frames, count = self._receive()
        except zmq.Again:
            return
        # ROUTER prepends the peer's identity; a REQ peer then sends an empty delimiter. The
        # envelope (identity up to and including the delimiter, if any) goes back unchanged.
        if len(frames) < 2:
            return  # an identity with nothing after it: nothing to answer
        try:
            split = frames.index(b"", 1) + 1
        except ValueError:
            split = 1
        envelope, body = frames[:split], frames[split:]
        n_body = count - split
        if n_body != 1:
            reply = _fail(
                f"a request is one frame holding one JSON object; got {n_body} frames"
            )
        else:
            reply = self.answer(body[0])
        self.requests_answered += 1
        try:
            payload = json.dumps(reply, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:  # a reply must be one JSON object, whatever happens
            log.error("control reply not JSON (%s): %r", exc, reply)
            payload = json.dumps(_fail(f"internal error: the reply could not be encoded: {exc}")).encode()
        try:
            self._socket.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer went away or is not reading: drop the reply
            log.debug("control reply not sent: %s", exc)

    # -- requests ---------------------------------------------------------------------------
    def answer(self, raw: bytes) -> dict[str, Any]:
        """The reply (a JSON-able dict with ``ok``, and ``error`` on failure) to one request."""
        try:
            return self.handle(raw)
        except Exception as exc:  # noqa: BLE001 - a reply must always go back
            log.exception("control request failed")
            return _fail(f"internal error: {type(exc).__name__}: {_short(str(exc))}")

    def handle(self, raw: bytes) -> dict[str, Any]:
        """Answer one request (bytes of a JSON object)."""
        if len(raw) > MAX_REQUEST_BYTES:
            return _fail(f"request is {len(raw)} bytes; the limit is {MAX_REQUEST_BYTES} bytes")
        try:
            request = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _fail(f"request is not JSON: {_short(str(exc))}")
        except RecursionError:
            return _fail(f"request nests deeper than {MAX_JSON_DEPTH} levels")
        if _depth_exceeds(request, MAX_JSON_DEPTH):
            return _fail(f"request nests deeper than {MAX_JSON_DEPTH} levels")
        if not isinstance(request, dict):
            return _fail(f"request must be a JSON object, got {type(request).__name__}")
        command = request.get("command")
        if not isinstance(command, str) or command not in COMMANDS:
            return _fail(f"unknown command {_short(command)}; commands are {list(COMMANDS)}")
        runner = self._runner
        if command == "status":
            return {"ok": True, "status": runner.status().as_dict()}
        if command == "stop":
            if self._on_stop is not None:
                self._on_stop()  # stop always wins over rules and later actions
            runner.request_stop("stop command on the control channel")
            return {"ok": True, "state": "stopping"}
        if command in ("act", "set") and self._read_only:
            return _fail(f"{command} refused: the control channel is read-only (control.read_only)")
        if command == "act":  # the action service refuses what a stop forbids, naming why
            if self._act is None:
                return _fail("act: this daemon has no actuators")
            return self._act(request)
        ended = self._ended()
        if ended is not None:
            return _fail(f"cannot {command}: {ended}")
        try:
            if command == "pause":
                runner.pause()
                return {"ok": True, "state": runner.state.value}
            if command == "resume":
                runner.resume()
                return {"ok": True, "state": runner.state.value}
            key = request.get("key")
            if not isinstance(key, str) or not key:
                return _fail("set needs a 'key' (a dotted configuration key, e.g. 'acquisition.exposure_ms')")
            if "value" not in request:
                return _fail(f"set {_short(key)} needs a 'value'")
            value = runner.change_setting(key, request["value"])
            return {"ok": True, "key": key, "value": value}
        except (ConfigError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            message = str(exc).strip('"')
            return _fail(message if len(message) <= 2000 else f"{message[:2000]}…")

    def _ended(self) -> str | None:
        """Why the run takes no more pause/resume/set (it is stopping or stopped), or None."""
        status = self._runner.status()
        if status.state in (RunnerState.STOPPING, RunnerState.STOPPED):
            return f"the run is {status.state.value}"
        if status.stop_reason is not None:
            return f"the run is stopping ({status.stop_reason})"
        return None
