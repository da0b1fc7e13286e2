"""frame_stats against the definitions of its fields, computed the plain numpy way."""

from __future__ import annotations

import numpy as np
import pytest

from scopestream.daemon import Frame, FrameStatistics, Products
from scopestream.daemon._config import build_config
from scopestream.plugins.frame_stats import (
    FrameStatsSettings,
    FrameStatsStage,
    _percentile_of_sorted,
)


def _reference(image: np.ndarray, saturation_adu: float, stride: int, percentile: float) -> dict[str, float]:
    finite = np.isfinite(image) if image.dtype.kind == "f" else np.ones(image.shape, bool)
    values = image[finite]
    sample = image[::stride, ::stride]
    sample = sample[np.isfinite(sample)] if image.dtype.kind == "f" else sample
    return {
        "mean_adu": float(values.mean(dtype=np.float64)),
        "max_adu": float(values.max()),
        "min_adu": float(values.min()),
        "background_adu": float(np.percentile(sample, percentile)),
        "saturated_fraction": float(np.count_nonzero(values >= saturation_adu)) / image.size,
        "nonfinite_fraction": float(image.size - values.size) / image.size,
    }


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int16, np.uint32, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("stride, percentile", [(4, 10.0), (1, 50.0), (3, 0.5), (7, 99.9)])
def test_fields_equal_their_definitions(dtype: type, stride: int, percentile: float) -> None:
    # Exact equality: the integer fast path sums exactly and interpolates the percentile with
    # the arithmetic of np.percentile's default ('linear') method.
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    top = min(info.max, 65535) if info is not None else 65535
    image = rng.integers(0, top, (301, 257)).astype(dtype)
    saturation = top
    image[5, 7] = top  # one saturated pixel
    if np.dtype(dtype).kind == "f":
        image[10, 10] = np.nan
        image[11, 11] = np.inf
    config = build_config({"camera": {"saturation_adu": saturation}})
    stage = FrameStatsStage(config, FrameStatsSettings(sample_stride_px=stride, background_percentile=percentile))
    products = Products()
    (emission,) = stage.process(Frame(0, image, 0.0), products)
    body = emission.body.model_dump()
    stats = products.get(FrameStatistics)
    assert stats is not None and vars(stats) == body  # the product and the event say the same
    expected = _reference(image, saturation, stride, percentile)
    if np.dtype(dtype).kind == "f":  # inf is not finite, so it is excluded from max
        assert body["nonfinite_fraction"] == 2 / image.size
    for key, value in expected.items():
        assert body[key] == value, key


def test_percentile_of_sorted_is_numpys_linear_percentile() -> None:
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 10, 101, 4096):
        values = np.sort(rng.integers(0, 1000, n).astype(np.uint16))
        for q in (0.0, 0.1, 10.0, 33.3, 50.0, 75.0, 99.99, 100.0):
            assert _percentile_of_sorted(values, q) == float(np.percentile(values, q)), (n, q)
