"""Result tables (CSV) written from the event stream, as ``analyze`` produces them.

One file per mapped topic (``localizations.csv``, ``tracks.csv``, ``diffusion.csv``, ...). A message
with 1-D arrays of one length gives one row per element (columns: ``frame``, then the arrays); a
message without arrays gives one row of its scalar body fields. ``frame_seq`` is written as
``frame``. An integer array named in the body's ``labels`` mapping is categorical: value i is
written as ``labels[name][i]``. Rows are written as they come, so memory does not grow with the run.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from scopestream.daemon._publish import Envelope


class TableSink:
    """Writes the mapped topics of a run to CSV files in ``out_dir``."""

    def __init__(self, out_dir: str | Path, tables: Mapping[str, str]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tables = dict(tables)
        self._files: dict[str, IO[str]] = {}
        self._writers: dict[str, csv.DictWriter[str]] = {}
        self.rows_written: dict[str, int] = dict.fromkeys(self._tables.values(), 0)

    def handle(self, envelope: Envelope) -> None:
        name = self._tables.get(envelope.topic)
        if name is None:
            return
        rows = list(_rows(envelope))
        if not rows:
            return
        writer = self._writers.get(name)
        if writer is None:
            fh = open(self.out_dir / name, "w", newline="")  # noqa: SIM115 - closed in close()
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), extrasaction="ignore", restval="")
            writer.writeheader()
            self._files[name], self._writers[name] = fh, writer
        writer.writerows(rows)
        self.rows_written[name] += len(rows)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        for name in self._tables.values():
            path = self.out_dir / name
            if not path.exists():  # a table with no rows still exists, so readers find it
                path.write_text("frame\n")


def _rows(env: Envelope) -> list[dict[str, Any]]:
    arrays = {k: np.asarray(v) for k, v in env.arrays.items()}
    if arrays:
        columns = {k: a for k, a in arrays.items() if a.ndim == 1}
        if not columns:
            return []
        lengths = {len(a) for a in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"topic {env.topic!r}: table arrays differ in length {sorted(lengths)}")
        n = lengths.pop()
        if n == 0:
            return []
        labels = getattr(env.body, "labels", None)
        if isinstance(labels, Mapping):
            for name, names_of in labels.items():
                a = columns.get(name)
                if a is not None and a.dtype.kind in "iu":
                    table = np.asarray(list(names_of) + [""], dtype=object)
                    columns[name] = table[np.where((a >= 0) & (a < len(names_of)), a, len(names_of))]
        frame = env.frame_seq if env.frame_seq is not None else ""
        names = ["frame", *columns]
        return [dict(zip(names, values, strict=True))
                for values in zip([frame] * n, *(a.tolist() for a in columns.values()), strict=True)]
    body = env.body.model_dump(mode="json")
    row: dict[str, Any] = {}
    if "frame_seq" in body:
        row["frame"] = body.pop("frame_seq")
    row.update({k: ("" if v is None else v) for k, v in body.items() if v is None or isinstance(v, int | float | str | bool)})
    return [row]
