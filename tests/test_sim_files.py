"""Simulated movies and truth streamed to disk: the same frames and rows as in memory."""

from __future__ import annotations

import csv
import io

import numpy as np
import tifffile

from scopestream.daemon._config import build_config
from scopestream.sim_camera import TRUTH_CSV_FIELDS, simulate_stack, write_truth_csv
from scopestream.sim_camera._simulate import simulate_to_files
from scopestream.sim_camera._truth import truth_csv_rows


def _csv_module_rows(truth: np.ndarray) -> str:
    """The rows as the csv module writes them from per-value Python formatting (the former
    writer): the reference for the column-wise formatter."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    columns = []
    for name in TRUTH_CSV_FIELDS:
        column = truth[name]
        if column.dtype.kind == "f":
            columns.append([repr(float(v)) for v in column])
        elif column.dtype.kind == "b":
            columns.append(["True" if v else "False" for v in column])
        else:
            columns.append([str(v) for v in column.tolist()])
    writer.writerows(zip(*columns, strict=True))
    return out.getvalue()


def test_truth_rows_are_formatted_as_the_csv_module_would() -> None:
    config = build_config({})
    _, truth = simulate_stack(config, "widefield", 6, size_px=32, n_particles=5, seed=1)
    truth = np.concatenate([truth, truth[:4]])
    truth["x"][-4:] = [np.nan, -np.inf, 1e-7, 1e17]
    truth["visible"][-1] = True
    assert truth_csv_rows(truth) == _csv_module_rows(truth)
    assert truth_csv_rows(truth[:0]) == ""


def test_streamed_files_equal_the_stack_in_memory(tmp_path) -> None:
    config = build_config({"simulation": {"particle_kind": "point"}})
    movie, truth = simulate_stack(config, "widefield", 13, size_px=40, n_particles=6, seed=4)
    meta = {"axes": "TYX", "kind": "widefield"}
    # A few rows per write: the truth goes out in several pieces.
    simulate_to_files(config, "widefield", 13, tmp_path / "m.tif", tmp_path / "t.csv", size_px=40,
                      n_particles=6, seed=4, metadata=meta, truth_rows_per_write=15)
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        assert len(tif.pages) == 13
        assert tif.shaped_metadata[0]["axes"] == "TYX" and tif.shaped_metadata[0]["shape"] == [13, 40, 40]
        np.testing.assert_array_equal(tif.series[0].asarray(), movie)
    write_truth_csv(tmp_path / "expected.csv", truth)
    assert (tmp_path / "t.csv").read_bytes() == (tmp_path / "expected.csv").read_bytes()
    assert (tmp_path / "t.csv").read_text().count("\n") == truth.size + 1
