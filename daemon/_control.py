"""The control channel: ZeroMQ REP, one JSON object per request, one JSON object per reply.

Requests: ``{"command": "status"}``, ``pause``, ``resume``, ``stop``,
``{"command": "set", "key": "dotted.key", "value": ...}``. Every reply has ``ok``; a failure
carries ``error`` naming the problem. Nothing a client sends can stop the daemon except ``stop``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import zmq

from scopestream.daemon._config import ConfigError
from scopestream.daemon._publish import bind_socket
from scopestream.daemon._runner import Runner

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "stop", "set")


class ControlServer:
    """Answers control requests on its own thread until closed."""

    def __init__(self, endpoint: str, runner: Runner, context: zmq.Context | None = None) -> None:
        self._runner = runner
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 500)
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
