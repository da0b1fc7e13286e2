"""The network input of one track window, as the training data and the live stage compute it.

A window is ``frames × region × region`` camera pixels (ADU) around a track (16 × 16 × 16 by
default). It is normalized per window so that the network sees the shape of the spots and their
motion, not the camera's scale: the background (the window's median) is subtracted and the result
divided by the mean over frames of the brightest pixel above it (at least 1 ADU). The blur
coefficient R of the acquisition is the second input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["StackSpec", "stack_input"]


@dataclass(frozen=True)
class StackSpec:
    """Geometry and optics the network was trained for (stored in the card's ``input_spec``)."""

    frames: int = 16
    region_px: int = 16
    pixel_size_nm: float = 100.0
    frame_interval_ms: float = 10.0
    psf_sigma_px: float = 0.765

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stack_input(pixels: np.ndarray) -> np.ndarray:
    """Normalized network input ``(..., T, S, S)`` float32 of windows of pixels (ADU).

    Raises
    ------
    ValueError
        When a window holds NaN or infinite pixels.
    """
    px = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(px).all():
        raise ValueError(f"{int(np.count_nonzero(~np.isfinite(px)))} NaN or infinite pixel value(s) in the window")
    lead = px.shape[:-3]
    flat = px.reshape(-1, *px.shape[-3:])
    bg = np.median(flat.reshape(len(flat), -1), axis=1)[:, None, None, None]
    sig = flat - bg
    peak = sig.reshape(*sig.shape[:2], -1).max(axis=2).mean(axis=1)
    scale = np.maximum(peak, 1.0)[:, None, None, None]
    return (sig / scale).astype(np.float32).reshape(*lead, *px.shape[-3:])
