"""Simulated movies and truth streamed to disk: the same frames and rows as in memory."""

from __future__ import annotations

import csv
import io

import numpy as np

from scopestream.daemon._config import build_config
from scopestream.sim_camera import TRUTH_CSV_FIELDS, simulate_stack
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
