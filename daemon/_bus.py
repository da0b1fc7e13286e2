"""The bounded queue between the source thread and the stage thread."""

from __future__ import annotations

import queue
from typing import Literal

from scopestream.daemon._frames import Frame


class FrameBus:
    """Bounded frame queue.

    ``policy="drop"`` (live cameras): a full bus refuses the frame at once and the caller counts
    it dropped, so acquisition never waits for analysis. ``policy="block"`` (replay): the source
    waits for room, and nothing is lost.
    """

    def __init__(self, capacity_frames: int, policy: Literal["drop", "block"]) -> None:
        self.capacity_frames = capacity_frames
        self.policy = policy
        self._queue: queue.Queue[Frame | None] = queue.Queue(maxsize=capacity_frames)

    def offer(self, frame: Frame, stop_waiting: float = 0.1) -> bool:
        """Put a frame on the bus; False if it was dropped (drop policy) or timed out (block)."""
        if self.policy == "drop":
            try:
                self._queue.put_nowait(frame)
            except queue.Full:
                return False
            return True
        try:
            self._queue.put(frame, timeout=stop_waiting)
        except queue.Full:
            return False
        return True

    def take(self, timeout_s: float) -> Frame | None:
        """The next frame, or None after ``timeout_s`` without one."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def take_waiting(self, limit: int) -> list[Frame]:
        """Up to ``limit`` frames that are already waiting, without waiting for more."""
        frames: list[Frame] = []
        while len(frames) < limit:
            try:
                frame = self._queue.get_nowait()
            except queue.Empty:
                break
            if frame is None:
                continue
            frames.append(frame)
        return frames

    def depth(self) -> int:
        return self._queue.qsize()
