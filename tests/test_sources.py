"""File replay: every TIFF flavour gives back its frames exactly; odd frames never stop a run."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._errors import InputError
from scopestream.daemon._service import Daemon
from scopestream.daemon._sources import FileSource


class _Collect:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.numbers: list[int | None] = []

    def deliver(self, image: np.ndarray, t_acquired: float, camera_image_number: int | None = None, metadata: Any = None) -> None:
        self.frames.append(np.array(image))
        self.numbers.append(camera_image_number)

    def missed(self, count: int, reason: str, camera_image_number: int | None = None) -> None:
        raise AssertionError("a file loses no frames")


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p, a: tifffile.imwrite(p, a), id="plain-memmap"),
        pytest.param(lambda p, a: tifffile.imwrite(p, a, compression="zlib"), id="zlib-pages"),
        pytest.param(lambda p, a: tifffile.imwrite(p, a, ome=True, metadata={"axes": "TYX"}), id="ome"),
        pytest.param(lambda p, a: tifffile.imwrite(p, a.reshape(3, 4, *a.shape[1:]), ome=True, metadata={"axes": "TZYX"}), id="ome-tzyx"),
    ],
)
def test_file_source_replays_every_frame_exactly(tmp_path: Path, write: Callable[[Path, np.ndarray], None]) -> None:
    stack = np.random.default_rng(1).integers(0, 4000, size=(12, 17, 23), dtype=np.uint16)
    path = tmp_path / "s.ome.tif"
    write(path, stack)
    src = FileSource(path)
    desc = src.open()
    assert (desc.height_px, desc.width_px, desc.dtype) == (17, 23, "uint16")
    sink = _Collect()
    src.start(sink)
    assert src.finished.wait(10)
    src.stop()
    src.close()
    assert src.error is None
    np.testing.assert_array_equal(np.stack(sink.frames), stack)
    assert sink.numbers == list(range(12))


def test_rgb_and_missing_files_are_refused_by_name(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="single-channel"):
        FileSource(tmp_path / "rgb.tif").open()
    with pytest.raises(InputError, match="no such file"):
        FileSource(tmp_path / "nope.tif").open()


def test_odd_frames_are_counted_not_fatal(tmp_path: Path, make_config: Callable[..., ScopestreamConfig]) -> None:
    """float32 frames with NaN pixels, an all-NaN frame, a constant frame and a saturated one."""
    stack = np.full((6, 16, 16), 100.0, np.float32)
    stack[1, 2, 3] = np.nan
    stack[2] = np.nan
    stack[3] = 0.0
    stack[4] = 65535.0
    stack[5, :8] = np.inf
    tifffile.imwrite(tmp_path / "odd.tif", stack)
    config = make_config("source.kind=file", f"source.file_path={tmp_path / 'odd.tif'}", "stages=[frame_stats]")
    daemon = Daemon(config, serve_events=False, serve_control=False, results_dir=str(tmp_path / "res"))
    stop = daemon.run_until_stopped()
    assert stop is not None
    assert stop.frames_received == stop.frames_processed == 6 and stop.frames_dropped == 0
    assert stop.stage_errors == {"frame_stats": 1}  # the all-NaN frame: no finite pixel to summarise
    with open(tmp_path / "res" / "frame_stats.csv") as fh:
        rows = {int(r["frame"]): r for r in csv.DictReader(fh)}
    assert sorted(rows) == [0, 1, 3, 4, 5]
    assert float(rows[1]["nonfinite_fraction"]) == pytest.approx(1 / 256)
    assert float(rows[1]["mean_adu"]) == pytest.approx(100.0)
    assert float(rows[3]["max_adu"]) == 0.0
    assert float(rows[4]["saturated_fraction"]) == 1.0
    assert float(rows[5]["nonfinite_fraction"]) == pytest.approx(0.5)
