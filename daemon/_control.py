"""The control channel: ZeroMQ REP, one JSON object per request, one JSON object per reply.

Requests: ``{"command": "status"}``, ``pause``, ``resume``, ``stop``,
``{"command": "set", "key": "dotted.key", "value": ...}``, ``{"command": "act", "action": ...}``
(carried out by :mod:`scopestream.daemon._actuators`). Every reply has ``ok``; a failure
carries ``error`` naming the problem. Nothing a client sends can stop the daemon except ``stop``.
In read-only mode ``act`` and ``set`` are refused.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from scopestream.daemon._config import ConfigError
from scopestream.daemon._publish import bind_socket
from scopestream.daemon._runner import Runner

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "stop", "set", "act")

ActHandler = Callable[[Mapping[str, Any]], dict[str, Any]]


class ControlServer:
    """Answers control requests on its own thread until closed."""

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
        self._socket = self._ctx.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 500)
        if secure is not None:
            secure(self._socket)  # CURVE server options, before bind
        self.endpoint = bind_socket(self._socket, endpoint, "control channel")
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scopestream-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._closing.is_set():
                if not poller.poll(50):
                    continue
                raw = self._socket.recv()
                try:
                    reply = self.handle(raw)
                except Exception as exc:  # noqa: BLE001 - a reply must always go back
                    log.exception("control request failed")
                    reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
                self._socket.send(json.dumps(reply).encode())
        finally:
            self._socket.close()

    def handle(self, raw: bytes) -> dict[str, Any]:
        """Answer one request (bytes of a JSON object)."""
        try:
            request = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": f"request must be a JSON object, got {type(request).__name__}"}
        command = request.get("command")
        if command not in COMMANDS:
            return {"ok": False, "error": f"unknown command {command!r}; commands are {list(COMMANDS)}"}
        runner = self._runner
        if command in ("act", "set") and self._read_only:
            return {"ok": False, "error": f"{command} refused: the control channel is read-only (control.read_only)"}
        if command == "act":
            if self._act is None:
                return {"ok": False, "error": "act: this daemon has no actuators"}
            return self._act(request)
        try:
            if command == "status":
                return {"ok": True, "status": runner.status().as_dict()}
            if command == "pause":
                runner.pause()
                return {"ok": True, "state": runner.state.value}
            if command == "resume":
                runner.resume()
                return {"ok": True, "state": runner.state.value}
            if command == "stop":
                if self._on_stop is not None:
                    self._on_stop()  # stop always wins over rules and later actions
                runner.request_stop("stop command on the control channel")
                return {"ok": True, "state": "stopping"}
            key = request.get("key")
            if not isinstance(key, str) or not key:
                return {"ok": False, "error": "set needs a 'key' (a dotted configuration key, e.g. 'acquisition.exposure_ms')"}
            if "value" not in request:
                return {"ok": False, "error": f"set {key!r} needs a 'value'"}
            value = runner.change_setting(key, request["value"])
            return {"ok": True, "key": key, "value": value}
        except (ConfigError, RuntimeError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
