"""A pymmcore-plus Python camera that paces itself exactly, for benchmarks.

Frames are 512 x 512 uint16 copied from a small pool of noise images (so the camera itself costs
little), stamped with the wall-clock time they were filled (``scopestream_t_acquired_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from numpy.typing import DTypeLike
from pymmcore_plus.experimental.unicore import CameraDevice

SHAPE = (512, 512)


class PacedCamera(CameraDevice):
    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 1.0
        rng = np.random.default_rng(0)
        self._pool = rng.poisson(200, size=(8, *SHAPE)).astype(np.uint16)

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = float(exposure)

    def shape(self) -> tuple[int, int]:
        return SHAPE

    def dtype(self) -> DTypeLike:
        return np.uint16

    def start_sequence(self, n: int | None, get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]) -> Iterator[Mapping]:
        period_s = self._exposure_ms / 1000.0
        t0 = time.perf_counter()
        i = 0
        while n is None or i < n:
            delay = t0 + (i + 1) * period_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            buf = get_buffer(SHAPE, np.uint16)
            buf[:] = self._pool[i % len(self._pool)]
            yield {"scopestream_t_acquired_s": repr(time.time())}
            i += 1
