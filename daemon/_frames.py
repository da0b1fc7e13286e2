"""The unit of work that flows from a source through the frame bus to the stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera frame as the daemon received it.

    Attributes
    ----------
    seq
        The daemon's own frame counter for this run, from 0, without gaps: every frame the source
        received gets the next number (frames lost inside the camera get none; they are reported
        as dropped).
    image
        The 2-D image (rows, columns), in the camera's dtype (ADU). Stages must not modify it.
    t_acquired
        Unix time (seconds) at which the frame was acquired, as well as the source can tell.
    camera_image_number
        The camera's own frame counter (Micro-Manager ``ImageNumber``), when it has one.
    metadata
        Whatever else the source knows (Micro-Manager metadata, MDA event indices, simulator truth).
    """

    seq: int
    image: np.ndarray
    t_acquired: float
    camera_image_number: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
