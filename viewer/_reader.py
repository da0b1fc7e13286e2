"""napari reader: an ``analyze`` result folder as layers.

- ``localizations.csv`` -> a Points layer ``(frame, y, x)`` with photons, uncertainty etc. as features;
- ``tracks.csv`` -> a Tracks layer whose data are napari's ``(track_id, t, y, x)`` taken from the
  table's ``particle, frame, y, x`` unchanged, with ``D_um2_per_s`` (one value per track, from
  ``diffusion.csv``) and the motion ``state`` at each point (from ``motion.csv``, index in
  :data:`~scopestream.viewer._live.STATES`, −1 where none) as properties; coloured by state when
  there are states, else by D;
- MUSICAL images under ``musical/`` -> Image layers placed and scaled at their region.

Qt-free: only numpy and the report's table reader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.daemon._report import load_results, per_track_diffusion
from scopestream.viewer._live import STATES, _fill_nan

LayerData = tuple[Any, dict[str, Any], str]


def is_result_folder(path: str | Path) -> bool:
    """A folder holding at least one of analyze's tables (or MUSICAL images)."""
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in ("tracks.csv", "localizations.csv", "run.json")) or (
        p.is_dir() and (p / "musical").is_dir())


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader hook: a reader for an analyze output folder, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_result_folder if is_result_folder(path) else None


def read_result_folder(path: str | list[str]) -> list[LayerData]:
    """The layers of one result folder (see the module docstring)."""
    folder = Path(path[0] if isinstance(path, list) else path)
    res = load_results(folder)
    layers: list[LayerData] = []
    for image in res.musical:
        s = max(image.subpixels, 1)
        layers.append((image.image, {
            "name": f"MUSICAL {image.name}", "colormap": "magma", "blending": "additive",
            "scale": (1.0 / s, 1.0 / s),
            # Sub-pixel (Y, X) is centred at camera (y0 + (Y + 0.5)/s − 0.5, x0 + (X + 0.5)/s − 0.5).
            "translate": (image.y0_px + 0.5 / s - 0.5, image.x0_px + 0.5 / s - 0.5),
            "metadata": {"particle": image.particle, "frame_start": image.frame_start, "frame_end": image.frame_end},
        }, "image"))
    locs = res.tables.get("localizations")
    if locs and res.rows("localizations") and {"frame", "x", "y"} <= set(locs):
        data = np.column_stack([locs["frame"], locs["y"], locs["x"]])
        features = {k: v for k, v in locs.items() if k not in ("frame", "x", "y") and v.dtype.kind == "f"}
        layers.append((data, {"name": f"{folder.name} localizations", "size": 2, "features": features,
                              "face_color": "transparent", "border_color": "yellow"}, "points"))
    tracks = res.tables.get("tracks")
    if tracks and res.rows("tracks") and {"particle", "frame", "x", "y"} <= set(tracks):
        data, props, color_by = tracks_layer_data(tracks, res.tables.get("diffusion"), res.tables.get("motion"))
        layers.append((data, {"name": f"{folder.name} tracks", "properties": props, "color_by": color_by,
                              "colormap": "hsv" if color_by == "state" else "turbo", "tail_length": 30}, "tracks"))
    return layers


def tracks_layer_data(tracks: dict[str, np.ndarray], diffusion: dict[str, np.ndarray] | None,
                      motion: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """napari Tracks data ``(track_id, t, y, x)`` = ``(particle, frame, y, x)`` of tracks.csv, its
    properties, and the property to colour by. Rows keep the table's order."""
    particle = tracks["particle"].astype(np.int64)
    data = np.column_stack([tracks["particle"], tracks["frame"], tracks["y"], tracks["x"]])
    D = np.full(len(particle), np.nan)
    if diffusion and len(diffusion.get("particle", ())) and "D_um2_per_s" in diffusion:
        per = per_track_diffusion(diffusion)
        by_id = dict(zip(per["particle"].astype(np.int64).tolist(), per["D_um2_per_s"].tolist(), strict=True))
        D = np.array([by_id.get(int(p), np.nan) for p in particle], dtype=np.float64)
    state = np.full(len(particle), -1.0)
    if motion and len(motion.get("particle", ())) and {"frame_start", "frame_end", "state"} <= set(motion):
        mp = motion["particle"].astype(np.int64)
        frame = tracks["frame"]
        for i in range(len(mp)):
            sel = (particle == mp[i]) & (frame >= motion["frame_start"][i]) & (frame <= motion["frame_end"][i])
            name = str(motion["state"][i])
            state[sel] = STATES.index(name) if name in STATES else len(STATES)
    props = {"D_um2_per_s": _fill_nan(D), "state": state}
    color_by = "state" if (state >= 0).any() else ("D_um2_per_s" if np.isfinite(D).any() else "track_id")
    if color_by == "track_id":
        props["track_id"] = particle.astype(np.float64)
    return data, props, color_by
