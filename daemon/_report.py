"""``scopestream report``: one self-contained HTML page of plots from ``analyze``'s result tables.

Reads what ``analyze`` wrote in a result folder (``localizations.csv``, ``tracks.csv``,
``diffusion.csv``, ``frame_stats.csv``, ``motion.csv`` and ``segments.csv`` when they exist,
MUSICAL images under ``musical/`` and ``run.json``) and draws, with matplotlib (Agg):

- the distribution of D with each track's estimate and its standard error;
- time-averaged MSD curves of the longest tracks;
- per-track state timelines and the state-transition matrix (``motion.csv``), and the diffusion
  regimes over time (``segments.csv``);
- a gallery of MUSICAL images;
- frame statistics over the run (intensity and background for bleaching, PSF width and photons per
  spot for focus);
- the run's counts and configuration.

Every image is embedded as a base64 PNG, so the file can be mailed or archived on its own. A
section whose table is missing says so; a folder with nothing to report gives a page that says
that. matplotlib is imported only when a report is drawn (the ``report`` extra).

MUSICAL images are read from ``musical/*.tif`` (and ``musical*.tif`` beside the tables): 2-D float
TIFFs, or stacks of them, whose ImageDescription may hold JSON with ``subpixels``, ``x0_px``,
``y0_px``, ``particle``, ``frame_start`` / ``frame_end`` or ``frame_ranges`` (as ``scopestream
musical`` writes).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scopestream.daemon._errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = ["ResultFolder", "add_report_command", "load_results", "render_report", "write_report"]

Table = dict[str, np.ndarray]

#: Table files the report reads, by the name it gives them.
TABLE_FILES = {
    "localizations": "localizations.csv",
    "tracks": "tracks.csv",
    "diffusion": "diffusion.csv",
    "frame_stats": "frame_stats.csv",
    "motion": "motion.csv",
    "segments": "segments.csv",
}

#: Section headings, in page order (the test checks them in the rendered page).
SECTIONS = (
    "Run",
    "Diffusion coefficients",
    "MSD curves",
    "Motion states",
    "MUSICAL images",
    "Frame statistics",
    "Configuration",
)

MAX_MSD_TRACKS = 10
MAX_TIMELINE_TRACKS = 40
MAX_GALLERY_IMAGES = 24
STATE_ORDER = ("Stat", "RanW", "RCir", "Circ", "Flow", "immobile", "confined", "free", "directed")


# -- reading -----------------------------------------------------------------------------------


@dataclass
class MusicalImage:
    """One MUSICAL image found in a result folder, with where it sits in the camera frame."""

    name: str
    image: np.ndarray
    subpixels: int = 1
    x0_px: float = 0.0
    y0_px: float = 0.0
    particle: int | None = None
    frame_start: int | None = None
    frame_end: int | None = None


@dataclass
class ResultFolder:
    """What ``analyze`` left in a folder: tables (dicts of 1-D arrays), images, run summary.

    Attributes
    ----------
    path
        The folder.
    tables
        Table name (``tracks``, ``diffusion``, ...) -> column name -> 1-D array (numbers where a
        column holds only numbers, else strings). Absent tables are absent keys.
    musical
        MUSICAL images found under ``musical/``.
    run
        ``run.json`` as a mapping (empty when absent).
    problems
        Files that exist but could not be read, with why.
    """

    path: Path
    tables: dict[str, Table] = field(default_factory=dict)
    musical: list[MusicalImage] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def rows(self, name: str) -> int:
        """Rows of table ``name`` (0 when absent)."""
        table = self.tables.get(name)
        if not table:
            return 0
        return len(next(iter(table.values())))

    @property
    def empty(self) -> bool:
        """Nothing to draw: no table with a row, no MUSICAL image."""
        return not self.musical and not any(self.rows(n) for n in self.tables)


def read_table(path: Path) -> Table:
    """A CSV with a header row as column name -> 1-D array (float where every value parses, else str).

    Empty cells in a numeric column become NaN. Raises ``ValueError`` on a ragged file.
    """
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return {}
        rows = [r for r in reader if r]
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise ValueError(f"{path.name}: row {i + 2} has {len(r)} fields, the header {len(header)}")
    table: Table = {}
    for j, name in enumerate(header):
        raw = [r[j] for r in rows]
        try:
            table[name] = np.array([float(v) if v != "" else math.nan for v in raw], dtype=np.float64)
        except ValueError:
            table[name] = np.array(raw, dtype=str)
    return table


def _read_musical(path: Path) -> list[MusicalImage]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        data = tif.asarray()
        description = tif.pages[0].description if tif.pages else ""  # type: ignore[union-attr]
    try:
        meta = json.loads(description) if description else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    stack = np.asarray(data, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"{path.name}: expected a 2-D image or a stack of them, got shape {data.shape}")
    ranges = meta.get("frame_ranges") or [[meta.get("frame_start"), meta.get("frame_end")]] * len(stack)
    images = []
    for k, image in enumerate(stack):
        start, end = (ranges[k] if k < len(ranges) else (None, None))
        particle = meta.get("particle")
        images.append(MusicalImage(
            name=f"{path.stem}[{k}]" if len(stack) > 1 else path.stem,
            image=image,
            subpixels=int(meta.get("subpixels") or 1),
            x0_px=float(meta.get("x0_px") or 0.0),
            y0_px=float(meta.get("y0_px") or 0.0),
            particle=int(particle) if particle is not None else None,
            frame_start=int(start) if start is not None else None,
            frame_end=int(end) if end is not None else None,
        ))
    return images


def musical_files(folder: Path) -> list[Path]:
    """The MUSICAL image files of a result folder, in name order."""
    found = {*folder.glob("musical/*.tif"), *folder.glob("musical/*.tiff"), *folder.glob("musical*.tif")}
    return sorted(p for p in found if p.is_file())


def load_results(folder: str | Path) -> ResultFolder:
    """Read a result folder; unreadable files are listed in ``problems``, never raised.

    Raises
    ------
    InputError
        If ``folder`` does not exist or is not a folder.
    """
    path = Path(folder)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise InputError(
            f"result folder {str(path)!r} {what}; give the folder that `scopestream analyze ... --out DIR` wrote"
        )
    results = ResultFolder(path)
    for name, file_name in TABLE_FILES.items():
        file = path / file_name
        if not file.is_file():
            continue
        try:
            results.tables[name] = read_table(file)
        except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
            results.problems.append(f"{file_name}: {exc}")
    for file in musical_files(path):
        try:
            results.musical.extend(_read_musical(file))
        except Exception as exc:  # noqa: BLE001 - any unreadable TIFF is reported, not raised
            results.problems.append(f"{file.relative_to(path)}: {type(exc).__name__}: {exc}")
    run_file = path / "run.json"
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text())
            results.run = run if isinstance(run, dict) else {}
        except (OSError, ValueError) as exc:
            results.problems.append(f"run.json: {exc}")
    return results


# -- analysis for the plots --------------------------------------------------------------------


def _config_value(config: Mapping[str, Any], section: str, key: str) -> float | None:
    value = (config.get(section) or {}).get(key) if isinstance(config.get(section), Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def track_lengths(tracks: Table) -> dict[int, int]:
    """Particle id -> number of rows (detections)."""
    ids, counts = np.unique(tracks["particle"].astype(np.int64), return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def time_averaged_msd(frames: np.ndarray, x: np.ndarray, y: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Time-averaged MSD of one track over lags 1..max_lag frames, px².

    Gaps (missing frames) are respected: a lag pairs detections that are that many frames apart.
    Returns (lags, msd); lags without a pair are left out.
    """
    order = np.argsort(frames)
    f, xs, ys = frames[order].astype(np.int64), x[order], y[order]
    position = {int(k): i for i, k in enumerate(f)}
    lags, values = [], []
    for lag in range(1, max_lag + 1):
        pairs = [(i, position[k + lag]) for i, k in enumerate(f.tolist()) if k + lag in position]
        if not pairs:
            continue
        a, b = np.array(pairs).T
        lags.append(lag)
        values.append(float(np.mean((xs[b] - xs[a]) ** 2 + (ys[b] - ys[a]) ** 2)))
    return np.array(lags, dtype=np.int64), np.array(values)


def per_track_diffusion(diffusion: Table) -> Table:
    """One D estimate per particle: its whole-track row where there is one, else its latest window."""
    particle = diffusion["particle"].astype(np.int64)
    window = diffusion.get("window", np.full(len(particle), "track"))
    frame_end = diffusion.get("frame_end", np.arange(len(particle), dtype=np.float64))
    chosen: dict[int, int] = {}
    for i, p in enumerate(particle.tolist()):
        j = chosen.get(p)
        if j is None:
            chosen[p] = i
            continue
        better = (window[i] == "track", frame_end[i]) > (window[j] == "track", frame_end[j])
        if better:
            chosen[p] = i
    rows = np.array(sorted(chosen.values()), dtype=np.int64)
    return {k: v[rows] for k, v in diffusion.items()}


def transition_counts(table: Table, column: str = "state") -> tuple[list[str], np.ndarray]:
    """States and the matrix of transitions between consecutive segments of each particle.

    ``counts[i, j]``: how often a particle's segment in state ``i`` was followed by one in state
    ``j`` (``i != j``; a state that goes on in the next row is not a transition).
    """
    states = _ordered_states(table[column])
    index = {s: k for k, s in enumerate(states)}
    counts = np.zeros((len(states), len(states)), dtype=np.int64)
    particle = table["particle"].astype(np.int64)
    start = table["frame_start"]
    for p in np.unique(particle):
        rows = np.flatnonzero(particle == p)
        rows = rows[np.argsort(start[rows], kind="stable")]
        seq = [str(s) for s in table[column][rows]]
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            if a != b:
                counts[index[a], index[b]] += 1
    return states, counts


def _ordered_states(values: np.ndarray) -> list[str]:
    present = {str(v) for v in values}
    known = [s for s in STATE_ORDER if s in present]
    return known + sorted(present - set(known))


# -- drawing -----------------------------------------------------------------------------------


def _figure(width_in: float = 7.0, height_in: float = 3.6) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _state_colors(states: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(k % 10) for k, s in enumerate(states)}


def section_run(res: ResultFolder) -> str:
    run = res.run
    rows: list[tuple[str, Any]] = []
    for key in ("run_id", "exit_status", "reason", "frames_received", "frames_processed", "frames_dropped", "duration_s"):
        if key in run:
            rows.append((key, run[key]))
    for key, value in sorted((run.get("frames_dropped_by_reason") or {}).items()):
        rows.append((f"dropped: {key}", value))
    for key, value in sorted((run.get("stage_errors") or {}).items()):
        rows.append((f"stage errors: {key}", value))
    for name, file_name in TABLE_FILES.items():
        if name in res.tables:
            rows.append((f"rows in {file_name}", res.rows(name)))
    if res.musical:
        rows.append(("MUSICAL images", len(res.musical)))
    if "tracks" in res.tables and res.rows("tracks"):
        lengths = track_lengths(res.tables["tracks"])
        rows.append(("tracks", len(lengths)))
        rows.append(("median track length, frames", float(np.median(list(lengths.values())))))
    out = []
    if not run:
        out.append(_note("run.json is missing: counts of the run are unknown."))
    if rows:
        body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
        out.append(f'<table class="counts">{body}</table>')
    for problem in res.problems:
        out.append(_note(f"could not read {problem}"))
    return "".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def section_diffusion(res: ResultFolder) -> str:
    table = res.tables.get("diffusion")
    if not table or not res.rows("diffusion") or "D_um2_per_s" not in table:
        return _note("No diffusion estimates (diffusion.csv is missing or empty).")
    per = per_track_diffusion(table)
    d = per["D_um2_per_s"].astype(np.float64)
    err = per.get("D_err_um2_per_s", np.full(len(d), np.nan)).astype(np.float64)
    ok = np.isfinite(d)
    if not ok.any():
        return _note("diffusion.csv holds no defined D (every track too short).")
    d, err = d[ok], err[ok]
    fig = _figure(9, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    bins = min(40, max(5, int(np.sqrt(len(d))) * 2))
    ax1.hist(d, bins=bins, color="#4c72b0", edgecolor="white")
    median_err = float(np.nanmedian(err)) if np.isfinite(err).any() else math.nan
    if math.isfinite(median_err):
        ax1.axvspan(float(np.median(d)) - median_err, float(np.median(d)) + median_err, color="orange", alpha=0.25,
                    label=f"median ± median SE ({median_err:.3g})")
        ax1.legend(fontsize=8)
    ax1.set_xlabel("D (µm²/s)")
    ax1.set_ylabel("tracks")
    ax1.set_title(f"D per track (n = {len(d)})")
    order = np.argsort(d)
    ax2.errorbar(np.arange(len(d)), d[order], yerr=np.where(np.isfinite(err[order]), err[order], 0), fmt="o", ms=3,
                 color="#4c72b0", ecolor="#999999", elinewidth=1)
    ax2.set_xlabel("track (sorted by D)")
    ax2.set_ylabel("D ± SE (µm²/s)")
    ax2.set_title("each track's estimate and standard error")
    text = (f"{len(d)} tracks with a defined D; median {np.median(d):.4g} µm²/s, "
            f"interquartile range {np.percentile(d, 25):.4g} – {np.percentile(d, 75):.4g} µm²/s.")
    return _img(fig, "Histogram of D per track; D with its standard error per track") + f"<p>{html.escape(text)}</p>"


def section_msd(res: ResultFolder, config: Mapping[str, Any]) -> str:
    tracks = res.tables.get("tracks")
    if not tracks or not res.rows("tracks") or not {"particle", "frame", "x", "y"} <= set(tracks):
        return _note("No tracks (tracks.csv is missing or empty).")
    lengths = track_lengths(tracks)
    longest = sorted(lengths, key=lambda p: (-lengths[p], p))[:MAX_MSD_TRACKS]
    pixel_nm = _config_value(config, "optics", "pixel_size_nm")
    interval_ms = _config_value(config, "acquisition", "frame_interval_ms")
    px2_to = (pixel_nm / 1000.0) ** 2 if pixel_nm else 1.0
    lag_to = interval_ms / 1000.0 if interval_ms else 1.0
    fig = _figure(7, 4)
    ax = fig.subplots()
    particle = tracks["particle"].astype(np.int64)
    drawn = 0
    for p in longest:
        sel = particle == p
        if sel.sum() < 3:
            continue
        lags, msd = time_averaged_msd(tracks["frame"][sel], tracks["x"][sel], tracks["y"][sel],
                                      max_lag=max(1, min(50, int(sel.sum()) // 4)))
        positive = msd > 0
        if not positive.any():
            continue
        ax.plot(lags[positive] * lag_to, msd[positive] * px2_to, "o-", ms=3, lw=1, label=f"track {p} ({lengths[p]} frames)")
        drawn += 1
    if not drawn:
        return _note("No track is long enough for an MSD curve (3 detections at least).")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("lag (s)" if interval_ms else "lag (frames)")
    ax.set_ylabel("MSD (µm²)" if pixel_nm else "MSD (px²)")
    ax.set_title(f"time-averaged MSD, the {drawn} longest tracks")
    ax.legend(fontsize=7, ncol=2)
    return _img(fig, "MSD curves of the longest tracks")


def _timeline(table: Table, column: str, title: str) -> str:
    states = _ordered_states(table[column])
    colors = _state_colors(states)
    particle = table["particle"].astype(np.int64)
    lengths = {int(p): float(np.sum(table["frame_end"][particle == p] - table["frame_start"][particle == p] + 1))
               for p in np.unique(particle)}
    shown = sorted(lengths, key=lambda p: (-lengths[p], p))[:MAX_TIMELINE_TRACKS]
    fig = _figure(9, max(2.5, 0.22 * len(shown) + 1.2))
    ax = fig.subplots()
    for row, p in enumerate(sorted(shown)):
        sel = np.flatnonzero(particle == p)
        for i in sel:
            start, end = float(table["frame_start"][i]), float(table["frame_end"][i])
            ax.broken_barh([(start, end - start + 1)], (row - 0.4, 0.8), color=colors[str(table[column][i])])
    ax.set_yticks(range(len(shown)), [str(p) for p in sorted(shown)], fontsize=7)
    ax.set_xlabel("frame")
    ax.set_ylabel("particle")
    ax.set_title(title + (f" ({len(shown)} longest of {len(lengths)})" if len(lengths) > len(shown) else ""))
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors[s], label=s) for s in states], fontsize=8, loc="upper right", ncol=len(states))
    return _img(fig, title)


def _matrix(states: list[str], counts: np.ndarray, title: str) -> str:
    fig = _figure(1.2 + 0.9 * len(states), 1.0 + 0.8 * len(states))
    ax = fig.subplots()
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    im = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(states)):
        for j in range(len(states)):
            ax.text(j, i, f"{counts[i, j]}", ha="center", va="center",
                    color="white" if fraction[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(states)), states)
    ax.set_yticks(range(len(states)), states)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of transitions from the row's state")
    return _img(fig, title)


def section_motion(res: ResultFolder) -> str:
    out = []
    motion = res.tables.get("motion")
    if motion and res.rows("motion") and {"particle", "frame_start", "frame_end", "state"} <= set(motion):
        out.append(_timeline(motion, "state", "Motion state of each track over time"))
        states, counts = transition_counts(motion, "state")
        out.append(_matrix(states, counts, "State-transition matrix (counts; colour: row fraction)"))
        out.append(f"<p>{int(counts.sum())} transitions between {len(states)} states in "
                   f"{len(np.unique(motion['particle']))} tracks.</p>")
    else:
        out.append(_note("No motion states (motion.csv is missing or empty: the run had no motion stage)."))
    segments = res.tables.get("segments")
    if segments and res.rows("segments") and {"particle", "frame_start", "frame_end", "regime"} <= set(segments):
        out.append(_timeline(segments, "regime", "Diffusion regime of each track over time"))
        states, counts = transition_counts(segments, "regime")
        out.append(_matrix(states, counts, "Regime-transition matrix (counts; colour: row fraction)"))
    return "".join(out)


def section_musical(res: ResultFolder) -> str:
    if not res.musical:
        return _note("No MUSICAL images (nothing under musical/ in the result folder).")
    shown = res.musical[:MAX_GALLERY_IMAGES]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(2.6 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, item in zip(axes, shown, strict=False):
        image = item.image
        finite = image[np.isfinite(image)]
        vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        s = max(item.subpixels, 1)
        h, w = image.shape
        # Extent in camera pixels: sub-pixel Y is centred at y0 + (Y + 0.5) / s - 0.5.
        extent = (item.x0_px - 0.5, item.x0_px - 0.5 + w / s, item.y0_px - 0.5 + h / s, item.y0_px - 0.5)
        ax.imshow(image, cmap="magma", vmin=0, vmax=vmax if vmax > 0 else None, extent=extent)
        label = item.name if item.particle is None else f"track {item.particle}"
        if item.frame_start is not None:
            label += f"\nframes {item.frame_start}–{item.frame_end}"
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    more = f" (first {len(shown)} of {len(res.musical)})" if len(res.musical) > len(shown) else ""
    return _img(fig, f"MUSICAL images{more}; axes in camera pixels")


def section_frame_stats(res: ResultFolder) -> str:
    out = []
    stats = res.tables.get("frame_stats")
    locs = res.tables.get("localizations")
    have_stats = bool(stats) and res.rows("frame_stats") > 0 and {"frame", "mean_adu"} <= set(stats or {})
    have_locs = bool(locs) and res.rows("localizations") > 0 and {"frame", "photons"} <= set(locs or {})
    if not have_stats and not have_locs:
        return _note("No frame statistics (frame_stats.csv and localizations.csv are missing or empty).")
    panels: list[tuple[str, Callable[[Any], None]]] = []
    if have_stats and stats is not None:
        frame = stats["frame"]

        def intensity(ax: Any) -> None:
            ax.plot(frame, stats["mean_adu"], lw=1, label="mean")
            if "background_adu" in stats:
                ax.plot(frame, stats["background_adu"], lw=1, label="background")
            ax.set_ylabel("ADU")
            ax.set_title("intensity over the run (bleaching)")
            ax.legend(fontsize=8)

        panels.append(("intensity", intensity))
        focus_columns = [c for c in stats if c.startswith("focus")]
        if focus_columns:
            def focus(ax: Any) -> None:
                for c in focus_columns:
                    ax.plot(frame, stats[c], lw=1, label=c)
                ax.set_title("focus metric")
                ax.legend(fontsize=8)

            panels.append(("focus", focus))
        if "saturated_fraction" in stats and np.nanmax(stats["saturated_fraction"]) > 0:
            def saturation(ax: Any) -> None:
                ax.plot(frame, stats["saturated_fraction"] * 100, lw=1, color="red")
                ax.set_ylabel("%")
                ax.set_title("saturated pixels")

            panels.append(("saturation", saturation))
    if have_locs and locs is not None:
        frames = locs["frame"].astype(np.int64)
        uniq, inverse, count = np.unique(frames, return_inverse=True, return_counts=True)
        photons = np.array([np.median(locs["photons"][inverse == k]) for k in range(len(uniq))])

        def spots(ax: Any) -> None:
            ax.plot(uniq, count, lw=1, label="localizations")
            ax.set_ylabel("spots per frame")
            ax2 = ax.twinx()
            ax2.plot(uniq, photons, lw=1, color="C2", label="median photons")
            ax2.set_ylabel("median photons per spot", color="C2")
            ax.set_title("detections and brightness per frame")

        panels.append(("spots", spots))
        if "sigma" in locs and np.nanstd(locs["sigma"]) > 1e-6 * abs(float(np.nanmean(locs["sigma"]))):
            sigma = np.array([np.median(locs["sigma"][inverse == k]) for k in range(len(uniq))])

            def width(ax: Any) -> None:
                ax.plot(uniq, sigma, lw=1, color="C3")
                ax.set_ylabel("px")
                ax.set_title("median PSF width (focus)")

            panels.append(("width", width))
    fig = _figure(9, 2.2 * len(panels) + 0.6)
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True)).ravel()
    for ax, (_, draw) in zip(axes, panels, strict=True):
        draw(ax)
    axes[-1].set_xlabel("frame")
    out.append(_img(fig, "Frame statistics over time"))
    if have_stats and stats is not None and len(stats["mean_adu"]) > 1:
        first, last = float(stats["mean_adu"][0]), float(stats["mean_adu"][-1])
        out.append(f"<p>Mean intensity {first:.1f} ADU in the first frame, {last:.1f} ADU in the last "
                   f"({(last / first - 1) * 100 if first else math.nan:+.1f} %).</p>")
    return "".join(out)


def section_config(res: ResultFolder, config: Mapping[str, Any]) -> str:
    if not config:
        return _note("The configuration of the run is not recorded (run.json has no 'config').")
    import yaml

    return f"<pre>{html.escape(yaml.safe_dump(dict(config), sort_keys=False))}</pre>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; background: #fff; }
h1 { border-bottom: 2px solid #4c72b0; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table.counts th { text-align: left; padding-right: 2em; font-weight: normal; color: #555; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
p.note { color: #8a6d3b; background: #fcf8e3; padding: 0.5em; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.85em; overflow-x: auto; }
"""


def render_report(folder: str | Path, config: Mapping[str, Any] | None = None) -> str:
    """The HTML of the report of one result folder.

    Parameters
    ----------
    folder
        A folder ``scopestream analyze`` wrote.
    config
        The run's configuration (plain data); default: ``run.json``'s ``config`` if it has one.
        Pixel size and frame interval put MSD curves in µm² and seconds.

    Raises
    ------
    InputError
        If the folder does not exist.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    res = load_results(folder)
    cfg: Mapping[str, Any] = config if config is not None else (res.run.get("config") or {})
    title = f"scopestream report: {res.path.resolve().name}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if res.empty:
        parts.append(f"<p class='note' id='nothing'>Nothing to report: {html.escape(str(res.path))} holds no "
                     "result table with a row and no MUSICAL image (expected "
                     f"{', '.join(TABLE_FILES.values())} from scopestream analyze).</p>")
        parts.append(f"<h2>Run</h2>{section_run(res)}</body></html>")
        return "".join(parts)
    drawers: dict[str, Callable[[], str]] = {
        "Run": lambda: section_run(res),
        "Diffusion coefficients": lambda: section_diffusion(res),
        "MSD curves": lambda: section_msd(res, cfg),
        "Motion states": lambda: section_motion(res),
        "MUSICAL images": lambda: section_musical(res),
        "Frame statistics": lambda: section_frame_stats(res),
        "Configuration": lambda: section_config(res, cfg),
    }
    for heading in SECTIONS:
        try:
            content = drawers[heading]()
        except Exception as exc:  # noqa: BLE001 - one odd table must not cost the whole report
            log.warning("report section %r failed: %s", heading, exc, exc_info=True)
            content = _note(f"This section could not be drawn: {type(exc).__name__}: {exc}")
        parts.append(f"<h2>{html.escape(heading)}</h2>{content}")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(folder: str | Path, out: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """Render the report of ``folder`` and write it to ``out``; returns the path written."""
    text = render_report(folder, config)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- command line ------------------------------------------------------------------------------


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError('the report needs matplotlib: pip install "scopestream[report]"') from None


def _cmd_report(args: argparse.Namespace) -> int:
    require_matplotlib()
    out = write_report(args.result_dir, args.out)
    print(f"wrote {out}")
    return 0


def add_report_command(sub: Any) -> None:
    """Register ``scopestream report`` (``analyze --report`` calls :func:`write_report` itself)."""
    p = sub.add_parser("report", help="an HTML report with plots from analyze's result tables")
    p.add_argument("result_dir", type=Path, help="the folder `scopestream analyze --out DIR` wrote")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write (default report.html)")
    p.set_defaults(func=_cmd_report)
