"""Module-level jobs for the off-thread service tests (picklable by reference in worker processes)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np


def square_after(value: float, seconds: float = 0.0) -> float:
    """``value²`` after sleeping ``seconds``."""
    time.sleep(seconds)
    return value * value


def pid_after(seconds: float) -> int:
    """This worker's process id, after sleeping ``seconds``."""
    time.sleep(seconds)
    return os.getpid()


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def kill_own_process(after_s: float = 0.0) -> None:
    """The worker dies mid-job (after ``after_s``), as a crash or the OOM killer would do it."""
    time.sleep(after_s)
    os.kill(os.getpid(), signal.SIGKILL)


def niceness() -> int:
    """The worker's niceness."""
    return os.nice(0)


def blas_threads() -> list[int]:
    """Thread counts of the BLAS libraries loaded in this worker (after a BLAS call)."""
    from threadpoolctl import threadpool_info

    a = np.ones((64, 64))
    _ = a @ a
    return [int(info["num_threads"]) for info in threadpool_info() if info.get("user_api") == "blas"]


def musical_window(stack: np.ndarray, subpixels: int, threshold: float) -> np.ndarray:
    """The float64 MUSICAL canvas of a normalized stack at the published optics (N_w = 7)."""
    from scopestream.plugins import _musical_core as core

    geometry = core.musical_geometry(510.0, 1.49, 65.0, subpixels)
    return core.musical_canvas(stack, geometry, threshold, 4.0)


def echo(value: Any) -> Any:
    return value
