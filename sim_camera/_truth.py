"""The ground-truth table: one row per frame and particle, and its CSV / JSON forms."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

TRUTH_DTYPE = np.dtype(
    [
        ("frame", np.int64),
        ("particle", np.int64),
        ("x", np.float64),
        ("y", np.float64),
        ("state", "U4"),
        ("D_um2_per_s", np.float64),
        ("photons", np.float64),
        ("z", np.float64),
        ("visible", np.bool_),
        ("t_ms", np.float64),
        ("speed_um_per_s", np.float64),
    ]
)
"""Fields of the truth table.

frame
    Frame index from 0.
particle
    Particle id (a particle that leaves the simulated area and is replaced gets a new id).
x, y
    Position in pixels (x column, y row; centre of pixel (0, 0) at 0.0): the centroid of the
    particle centre's trajectory during the frame, weighted by the photons it sent to the camera
    (widefield: over the exposure sub-steps; scanning: over the dwell times the beam spent near
    it). That is what an unbiased localizer should report.
state
    Motion state during the frame: Stat, RanW, RCir, Circ, Flow.
D_um2_per_s
    Diffusion coefficient for RanW and RCir, 0 for the other states.
photons
    Expected signal photons detected from the particle in this frame (before noise).
z
    Axial position, nm (0 in focus), weighted like x and y.
visible
    The (x, y) centroid lies inside the image.
t_ms
    Time the position refers to (photon-weighted), ms since the start of the simulation; for
    the scanning camera this says when the beam saw the particle.
speed_um_per_s
    Speed of Circ and Flow particles, 0 for the other states.
"""

TRUTH_CSV_FIELDS: tuple[str, ...] = tuple(TRUTH_DTYPE.names or ())


def empty_truth(n: int = 0) -> np.ndarray:
    """A truth table of ``n`` zeroed rows."""
    return np.zeros(n, dtype=TRUTH_DTYPE)


def concatenate_truth(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-frame truth tables."""
    return np.concatenate(list(parts)) if parts else empty_truth()


def truth_to_json(truth: np.ndarray) -> str:
    """Compact column-wise JSON of a truth table: ``{"field": [values...], ...}``.

    Positions are rounded to 1e-4 px, photons to 0.01, times to 1 µs: far below any
    measurement precision, and it keeps per-frame metadata small.
    """
    cols: dict[str, list[object]] = {}
    for name in TRUTH_CSV_FIELDS:
        column = truth[name]
        if name in ("x", "y"):
            cols[name] = np.round(column, 4).tolist()
        elif name in ("photons", "z"):
            cols[name] = np.round(column, 2).tolist()
        elif name == "t_ms":
            cols[name] = np.round(column, 3).tolist()
        else:
            cols[name] = column.tolist()
    return json.dumps(cols, separators=(",", ":"))


def truth_from_json(text: str) -> np.ndarray:
    """Inverse of :func:`truth_to_json`."""
    cols = json.loads(text)
    n = len(cols["frame"])
    out = empty_truth(n)
    for name in TRUTH_CSV_FIELDS:
        out[name] = cols[name]
    return out


def truth_csv_rows(truth: np.ndarray) -> str:
    """The CSV rows of a truth table, without the header, as :func:`write_truth_csv` writes
    them (floats as ``repr``: the shortest text that reads back as the same number; booleans
    ``True``/``False``; lines end in CR LF, like the ``csv`` module's default dialect).

    Formatting runs column by column in C (``map`` over each column, one ``join`` per table),
    with no Python code per row.
    """
    columns: list[Iterable[str]] = []
    for name in TRUTH_CSV_FIELDS:
        column = truth[name]
        if column.dtype.kind == "f":
            columns.append(map(repr, column.tolist()))
        elif column.dtype.kind == "b":
            columns.append(np.where(column, "True", "False").tolist())
        else:
            columns.append(map(str, column.tolist()))
    if truth.size == 0:
        return ""
    return "\r\n".join(map(",".join, zip(*columns, strict=True))) + "\r\n"


class TruthCsvWriter:
    """Writes a truth table to CSV in pieces, as the frames are simulated.

    Parameters
    ----------
    path
        The CSV file (created or truncated; the header row is written at once).
    """

    def __init__(self, path: str | Path) -> None:
        self._fh = open(path, "w", newline="")  # noqa: SIM115 - closed by close()
        self._fh.write(",".join(TRUTH_CSV_FIELDS) + "\r\n")

    def write(self, truth: np.ndarray) -> None:
        """Append the rows of ``truth``."""
        self._fh.write(truth_csv_rows(truth))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TruthCsvWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_truth_csv(path: str | Path, truth: np.ndarray) -> None:
    """Write the truth table as CSV with a header row (``frame, particle, x, y, state, ...``)."""
    with TruthCsvWriter(path) as writer:
        writer.write(truth)
