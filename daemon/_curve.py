"""ZeroMQ CURVE for the control channel: loopback without keys, any other address only with them.

The server's key pair and the allowed clients' public keys are files in the format of
``zmq.auth`` (``create_certificates``): the server reads ``control.curve_server_secret_key_file``
(a ``.key_secret`` file holding both keys) and answers only the clients whose public keys are in
``control.curve_allowed_clients_dir`` (``.key`` files); a ``zmq.auth.ThreadAuthenticator`` checks
each connection. A client without an allowed key gets no answer at all.

Make keys with::

    python -m scopestream.daemon._curve DIR          # DIR/server.key(_secret), DIR/client.key(_secret)

and give the daemon ``server.key_secret`` and a folder holding ``client.key``; give the client
``client.key_secret`` and ``server.key`` (see :class:`scopestream.client.ControlClient`).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from scopestream.daemon._config import ConfigError, ControlConfig


def is_loopback(endpoint: str) -> bool:
    """True for inproc/ipc endpoints and TCP on 127.0.0.0/8, ::1 or localhost."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("inproc", "ipc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or a host name: not known to be loopback
        return False


class ControlSecurity:
    """CURVE server settings for the control socket, with the authenticator that enforces them.

    Parameters
    ----------
    config
        The ``control`` section.
    context
        The ZeroMQ context of the control socket (the authenticator serves that context).

    Raises
    ------
    ConfigError
        When the endpoint is not loopback and the keys are not configured or not readable.
    """

    def __init__(self, config: ControlConfig, context: zmq.Context[Any]) -> None:
        self.enabled = False
        self._auth: ThreadAuthenticator | None = None
        key_file, clients_dir = config.curve_server_secret_key_file, config.curve_allowed_clients_dir
        if key_file is None and clients_dir is None:
            if not is_loopback(config.endpoint):
                raise ConfigError(
                    f"control.endpoint {config.endpoint!r} is not a loopback address: the control channel then "
                    "requires ZeroMQ CURVE keys; set control.curve_server_secret_key_file and "
                    "control.curve_allowed_clients_dir (make keys with `python -m scopestream.daemon._curve DIR`), "
                    "or bind to tcp://127.0.0.1"
                )
            return
        if key_file is None or clients_dir is None:
            raise ConfigError(
                "control: CURVE needs both curve_server_secret_key_file and curve_allowed_clients_dir "
                f"(given {key_file!r} and {clients_dir!r})"
            )
        if not zmq.has("curve"):
            raise ConfigError("control: this libzmq was built without CURVE support")
        try:
            public, secret = zmq.auth.load_certificate(key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"control.curve_server_secret_key_file: cannot read {key_file!r}: {exc}") from None
        if not secret:
            raise ConfigError(f"control.curve_server_secret_key_file: {key_file!r} holds no secret key (use the .key_secret file)")
        clients = Path(clients_dir)
        if not clients.is_dir() or not any(clients.glob("*.key")):
            raise ConfigError(f"control.curve_allowed_clients_dir: {clients_dir!r} is not a folder holding client .key files")
        self._public, self._secret = public, secret
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(clients))
        self.enabled = True

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` a CURVE server (before it binds)."""
        if not self.enabled:
            return
        socket.curve_secretkey = self._secret
        socket.curve_publickey = self._public
        socket.curve_server = True

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make CURVE key pairs for the control channel: server and client.")
    parser.add_argument("directory", help="where to write server.key, server.key_secret, client.key, client.key_secret")
    parser.add_argument("--client-name", default="client", help="base name of the client's key files")
    args = parser.parse_args(argv)
    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("server", args.client_name):
        public, secret = zmq.auth.create_certificates(out, name)
        print(f"wrote {public} and {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
