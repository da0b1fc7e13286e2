"""The control channel's CURVE security: loopback without keys; otherwise keys, and only allowed clients."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
import zmq.auth

from scopestream.daemon._config import ConfigError, ScopestreamConfig
from scopestream.daemon._curve import is_loopback
from scopestream.daemon._curve import main as make_keys
from scopestream.daemon._service import Daemon
from scopestream.daemon.client import ControlClient, ControlError

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
BASE = ["stages=[frame_stats]", "simulation.frame_height_px=16", "simulation.frame_width_px=16",
        "simulation.n_particles=1", "metrics.enabled=false"]


def test_loopback_detection() -> None:
    assert is_loopback("tcp://127.0.0.1:5557") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:5")
    assert is_loopback("inproc://x") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://0.0.0.0:5557") and not is_loopback("tcp://eth0:5557") and not is_loopback("tcp://10.0.0.2:1")


def test_non_loopback_control_without_keys_refuses_to_start(make_config: Callable[..., ScopestreamConfig]) -> None:
    with pytest.raises(ConfigError, match="requires ZeroMQ CURVE keys"):
        Daemon(make_config(*BASE, "control.endpoint=tcp://0.0.0.0:0"))


def test_only_a_client_with_an_allowed_key_is_answered(
    make_config: Callable[..., ScopestreamConfig], daemons: list[Daemon], tmp_path: Path
) -> None:
    assert make_keys([str(tmp_path / "keys")]) == 0
    make_keys([str(tmp_path / "keys"), "--client-name", "stranger"])
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(tmp_path / "keys" / "client.key", allowed)
    d = Daemon(make_config(*BASE, f"control.curve_server_secret_key_file={tmp_path / 'keys' / 'server.key_secret'}",
                           f"control.curve_allowed_clients_dir={allowed}"))
    daemons.append(d)
    d.start()
    assert d.control_endpoint
    server_public, _ = zmq.auth.load_certificate(tmp_path / "keys" / "server.key")

    plain = ControlClient(d.control_endpoint, timeout_s=1.0)
    with pytest.raises(ControlError, match="no reply"):
        plain.status()
    plain.close()

    stranger = ControlClient(d.control_endpoint, timeout_s=1.0, curve_server_key=server_public,
                             curve_client_key_file=tmp_path / "keys" / "stranger.key_secret")
    with pytest.raises(ControlError, match="no reply"):
        stranger.status()
    stranger.close()

    trusted = ControlClient(d.control_endpoint, timeout_s=5.0, curve_server_key=server_public,
                            curve_client_key_file=tmp_path / "keys" / "client.key_secret")
    assert trusted.status()["state"] == "running"
    reply = trusted.request_raw(json.dumps({"command": "act", "action": "mark", "text": "hello"}).encode())
    assert reply["ok"]
    trusted.close()


def test_half_configured_keys_are_a_configuration_error(make_config: Callable[..., ScopestreamConfig], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs both"):
        Daemon(make_config(*BASE, f"control.curve_server_secret_key_file={tmp_path / 'x'}"))
