"""Shared fixtures: configurations with free local ports, and daemons that always get closed."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

# Each UniMMCore reserves a large sequence buffer by default; tests need little.
os.environ.setdefault("UNICORE_SEQUENCE_BUFFER_MB", "64")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from scopestream.daemon._config import ScopestreamConfig, load_config  # noqa: E402
from scopestream.daemon._service import Daemon  # noqa: E402

LOCAL = [
    "events.endpoint=tcp://127.0.0.1:0",
    "control.endpoint=tcp://127.0.0.1:0",
    "metrics.port=0",
    "events.heartbeat_interval_s=0.2",
]


@pytest.fixture
def make_config() -> Callable[..., ScopestreamConfig]:
    """``make_config("key=value", ...)``: defaults + free local ports + the given overrides."""

    def make(*overrides: str) -> ScopestreamConfig:
        return load_config(None, [*LOCAL, *overrides])

    return make


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons appended here are closed after the test, whatever happens."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()
