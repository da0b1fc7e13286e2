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
    """Writes the mapped topics of a run to CSV files in ``out_dir`` (a :class:`Sink`).

    A file that cannot be written raises an OSError naming it; the sink's feed then reports the
    failure, closes the sink, and ``analyze`` fails with that message.
    """

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
        path = self.out_dir / name
        try:
            # Opened at the topic's first message, rows or not, so that a path that cannot be
            # written fails the run while it runs.
            fh = self._files.get(name)
            if fh is None:
                fh = self._files[name] = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
            rows = _rows(envelope)
            if not rows:
                return
            writer = self._writers.get(name)
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]), extrasaction="ignore", restval="")
                writer.writeheader()
                self._writers[name] = writer
            writer.writerows(rows)
        except OSError as exc:
            raise OSError(f"cannot write the result table {str(path)!r}: {exc.strerror or exc}") from None
        self.rows_written[name] += len(rows)

    def close(self) -> None:
        files, self._files = self._files, {}
        for name, fh in files.items():
            if name not in self._writers:  # a table with no rows still has a header
                fh.write("frame\n")
            fh.close()
        for name in self._tables.values():
            path = self.out_dir / name
            if not path.exists():  # a table with no rows still exists, so readers find it
                try:
                    path.write_text("frame\n")
                except OSError as exc:
                    raise OSError(f"cannot write the result table {str(path)!r}: {exc.strerror or exc}") from None


def as_table(columns: Mapping[str, np.ndarray]) -> Any:
    """A pandas DataFrame of the columns if pandas is importable, else the dict itself
    (the batch APIs' tables: pandas is not a dependency)."""
    try:
        import pandas as pd
    except ImportError:
        return dict(columns)
    return pd.DataFrame(dict(columns))


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


class ImageSink:
    """Writes the 2-D image array of each message on the mapped topics to its own TIFF file (a
    :class:`Sink`), as ``analyze`` does for ``musical`` under ``<out>/musical/``.

    The file's description is the message body as JSON (for ``musical``: ``particle``, ``kind``,
    ``frame_start``, ``frame_end``, ``x0_px``, ``y0_px``, ``subpixels``, ...), so that readers
    (``scopestream report``, the napari reader) place and scale the image without our code.
    Files are named ``<kind>_<particle>_<frame_start>-<frame_end>.tif``.
    """

    def __init__(self, out_dir: str | Path, folders: Mapping[str, str], array: str = "image") -> None:
        self.out_dir = Path(out_dir)
        self._folders = dict(folders)
        self._array = array
        self.images_written: dict[str, int] = dict.fromkeys(self._folders.values(), 0)

    def handle(self, envelope: Envelope) -> None:
        folder = self._folders.get(envelope.topic)
        image = envelope.arrays.get(self._array)
        if folder is None or image is None:
            return
        import json

        import tifffile

        body = envelope.body.model_dump(mode="json")
        who = "field" if body.get("particle") is None else str(body["particle"])
        name = f"{body.get('kind', envelope.topic)}_{who}_{body.get('frame_start', envelope.seq)}-{body.get('frame_end', '')}.tif"
        path = self.out_dir / folder / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, np.asarray(image, dtype=np.float32), description=json.dumps(body), metadata=None)
        except OSError as exc:
            raise OSError(f"cannot write the image {str(path)!r}: {exc.strerror or exc}") from None
        self.images_written[folder] += 1

    def close(self) -> None:
        """Nothing held open: every image is written whole when it arrives."""
