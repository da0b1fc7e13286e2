"""Frame statistics: mean, max, background, saturation, per frame.

Cheap enough to run on every frame of a 1 kHz camera; useful on its own to watch focus,
bleaching and saturation live.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import FrameStatistics, Products
from scopestream.daemon._stage import Emission, RunContext, StagePlugin


class FrameStatsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    background_percentile: float = Field(
        10.0, gt=0, lt=100,
        description="Percentile of the pixel values taken as the background estimate (robust to sparse bright spots), %.",
    )
    sample_stride_px: int = Field(
        4, ge=1, le=64,
        description="Background percentile is computed on every n-th pixel in each axis (cheap on big frames); 1 uses all.",
    )


class FrameStatsBody(BaseModel):
    """Statistics of one frame, in ADU as the camera reports them."""

    model_config = ConfigDict(frozen=True)

    frame_seq: int = Field(description="The frame's daemon sequence number.")
    camera_image_number: int | None = Field(None, description="The camera's own frame counter, if any.")
    height_px: int = Field(description="Image rows.")
    width_px: int = Field(description="Image columns.")
    mean_adu: float = Field(description="Mean pixel value, ADU (NaN pixels excluded).")
    max_adu: float = Field(description="Largest pixel value, ADU.")
    min_adu: float = Field(description="Smallest pixel value, ADU.")
    background_adu: float = Field(description="Background estimate: the configured percentile of the pixel values, ADU.")
    saturated_fraction: float = Field(description="Fraction of pixels at or above camera.saturation_adu.")
    nonfinite_fraction: float = Field(description="Fraction of pixels that are NaN or infinite (float frames only).")
    sharpness: float = Field(
        0.0,
        description="Brenner focus measure: mean squared difference of pixels two columns apart, on every "
        "sample_stride_px-th row, ADU^2 (falls as the image blurs; compare with its own earlier values).",
    )


class FrameStatsStage:
    """Per-frame statistics; the first stage of every default pipeline."""

    name = "frame_stats"

    def __init__(self, config: ScopestreamConfig, settings: FrameStatsSettings) -> None:
        self._saturation_adu = config.camera.saturation_adu
        self._settings = settings

    def setup(self, context: RunContext) -> None:
        """Nothing to prepare: the statistics need no state."""

    def apply_settings(self, settings: FrameStatsSettings) -> None:
        self._settings = settings

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        image = frame.image
        if image.ndim != 2 or image.size == 0:
            raise ValueError(f"frame {frame.seq}: expected a non-empty 2-D image, got shape {image.shape}")
        nonfinite = 0
        if image.dtype.kind == "f":
            finite_mask = np.isfinite(image)
            nonfinite = int(image.size - np.count_nonzero(finite_mask))
            values = image[finite_mask] if nonfinite else image
            if values.size == 0:
                raise ValueError(f"frame {frame.seq}: no finite pixel")
        else:
            values = image
        stride = self._settings.sample_stride_px
        sample = image[::stride, ::stride]
        if nonfinite:
            sample = sample[np.isfinite(sample)]
        background = float(np.percentile(sample, self._settings.background_percentile)) if sample.size else float(np.percentile(values, self._settings.background_percentile))
        rows = image[::stride].astype(np.float32)
        diff = rows[:, 2:] - rows[:, :-2]
        sharpness = float(np.nanmean(diff * diff)) if diff.size else 0.0
        stats = FrameStatistics(
            frame_seq=frame.seq,
            camera_image_number=frame.camera_image_number,
            height_px=image.shape[0],
            width_px=image.shape[1],
            mean_adu=float(values.mean(dtype=np.float64)),
            max_adu=float(values.max()),
            min_adu=float(values.min()),
            background_adu=background,
            saturated_fraction=float(np.count_nonzero(values >= self._saturation_adu)) / image.size,
            nonfinite_fraction=nonfinite / image.size,
            sharpness=sharpness,
        )
        products.put(stats)
        body = FrameStatsBody(**vars(stats))  # the same fields, by design
        return [Emission("frame_stats", body, frame_seq=frame.seq, t_acquired=frame.t_acquired)]


PLUGIN = StagePlugin(
    name="frame_stats",
    settings_model=FrameStatsSettings,
    build=FrameStatsStage,
    topics={"frame_stats": FrameStatsBody},
    produces=(FrameStatistics,),
    runtime_settable=frozenset({"background_percentile", "sample_stride_px"}),
    tables={"frame_stats": "frame_stats.csv"},
    description="Per-frame mean, max, background and saturated fraction.",
)
