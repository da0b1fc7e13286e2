"""Running a real daemon in tests: a recorded stack to replay, a subscriber that sees run_start,
and draining the stream up to a topic."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from scopestream.daemon._service import Daemon
from scopestream.daemon.client import Subscriber


def write_stack(path: Path, n: int, shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    """A Poisson(200) uint16 stack of ``n`` frames written as a TIFF; returns the frames."""
    stack = np.random.default_rng(seed).poisson(200, size=(n, *shape)).astype(np.uint16)
    tifffile.imwrite(path, stack)
    return stack


def start_with_subscriber(daemon: Daemon, topics: Sequence[str] = ()) -> Subscriber:
    """Subscribe before the run starts, so run_start is seen (the daemon waits for us)."""
    assert daemon.events_endpoint is not None
    sub = Subscriber(daemon.events_endpoint, topics)
    starter = threading.Thread(target=daemon.start)
    starter.start()
    assert sub.wait_ready(10), "no welcome from the daemon"
    starter.join(10)
    return sub


def drain(sub: Subscriber, until_topic: str = "run_stop", timeout_s: float = 30) -> list[Any]:
    """Every message up to and including the first on ``until_topic``."""
    msgs = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = sub.recv(0.5)
        if m is None:
            continue
        msgs.append(m)
        if m.topic == until_topic:
            return msgs
    raise AssertionError(f"no {until_topic} within {timeout_s} s; got {[m.topic for m in msgs][-10:]}")
