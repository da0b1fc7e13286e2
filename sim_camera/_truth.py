"""The ground-truth table: one row per frame and particle, and its CSV / JSON forms."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
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


def write_truth_csv(path: str | Path, truth: np.ndarray) -> None:
    """Write the truth table as CSV with a header row (``frame, particle, x, y, state, ...``)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TRUTH_CSV_FIELDS)
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
