"""``scopestream.client``: subscribe to a daemon's events and send it control requests.

Re-exports :mod:`scopestream.daemon.client`.
"""

from __future__ import annotations

from scopestream.daemon.client import ControlClient, ControlError, Message, Subscriber, WireError

__all__ = ["ControlClient", "ControlError", "Message", "Subscriber", "WireError"]
