"""Training and test data for the motion-state networks, made as Sekh et al. made theirs.

One sample: one vesicle (diameter 150–400 nm, 10 fluorophores in its volume, blinking and
bleaching) in one motion state with the study's parameter ranges (SCIENCE.md), rendered by the
widefield simulator on a small frame the size of the live ``musical`` stage's capture box
(``region + 2 · margin`` = 49 px at the defaults) with the vesicle starting at its centre, as the
live stage places a box centred on a track's first detection. The frames go through our own
``localize`` and ``track`` batch functions (the live stages' code, default settings); the track
with the most detections in the window is the vesicle's; the region of ``region_px`` is cut
centred on the mean of its positions (the live rule); the network inputs come from
:func:`~scopestream.models.motion._inputs.window_inputs`, the function the ``motion`` stage calls.

Study ranges, mapped to the simulator at the configured frame interval (10 ms by default):

- RanW: step speed ``s`` uniform in (0, 1000] nm/frame -> Brownian with ``D = s² / (4 Δt)``
  (RMS 2-D step ``s``);
- RCir: radius 200–400 nm, the same step law inside the circle (large steps: uniform positions);
- Circ: radius 200–500 nm, speed 0–500 nm/frame;
- Flow: speed 0–1000 nm/frame along a smooth random curve (persistence 5 µm);
- Stat: none.

Switching is off in training samples (one state listed); the particle wraps around the frame when
it leaves it (a new track, same state and parameters).

Which samples the live pipeline can see: a live window exists only when one track stays alive
(gaps of at most ``track.max_gap_frames``) for K frames and its region never leaves the capture
box (``musical.capture_margin_px`` = 12 px around the region), i.e. the vesicle stays within
about ±12 px (1.2 µm) of where the box was placed. Flow faster than ~12 px / K frames
(6 nm/frame at K = 200, 24 nm/frame at K = 50) and fast RanW (D ≳ 0.2 µm²/s at K = 200) leave
the box: their windows are dropped live (``musical_track_reanchors``), and steps beyond
``track.max_displacement_px`` (5 px = 500 nm/frame) break their tracks. Each sample records
``live`` (whether the live stage would have cut this window); test figures are given for all
samples and for the live-visible ones.

Determinism: a sample is a pure function of ``(seed, state, index)`` through
``numpy.random.SeedSequence(seed, spawn_key=(state_index, index))``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.daemon._config import ScopestreamConfig, build_config, config_to_dict
from scopestream.daemon._products import MOTION_STATES
from scopestream.models.motion._inputs import FEATURE_NAMES, InputSpec, window_inputs

__all__ = [
    "BOX_PX",
    "DataSettings",
    "Dataset",
    "SampleParams",
    "draw_params",
    "concatenate",
    "generate_dataset",
    "load_or_generate",
    "make_movie_samples",
    "simulation_section",
]

BOX_PX = 49
"""Side of the simulated frame: the live ``musical`` stage's capture box (25 + 2 · 12 px)."""

MAX_STEP_NM_PER_FRAME = 1000.0
CIRC_SPEED_MAX_NM_PER_FRAME = 500.0
FLOW_SPEED_MAX_NM_PER_FRAME = 1000.0


@dataclass(frozen=True)
class SampleParams:
    """The drawn parameters of one sample (the truth behind its label).

    ``speed_nm_per_frame`` is the step RMS for RanW / RCir, the speed along the path for Circ and
    Flow, 0 for Stat. ``radius_nm`` is the RCir / Circ radius (0 otherwise).
    """

    state: str
    diameter_nm: float
    speed_nm_per_frame: float
    radius_nm: float
    D_um2_per_s: float
    photons_per_frame: float
    sim_seed: int


@dataclass(frozen=True)
class DataSettings:
    """What the data generator draws and renders (everything else: the default configuration).

    Attributes
    ----------
    photons_per_frame
        Expected photons of a vesicle with all fluorophores on, per frame.
    background_photons_per_px
        Background photons per pixel per frame.
    blink_on_mean_ms, blink_off_mean_ms, bleach_half_life_ms
        Photophysics of each fluorophore.
    fluorophores_per_vesicle
        Fluorophores placed uniformly in the vesicle's volume.
    diameter_nm
        Range of vesicle diameters, nm.
    psf_model
        'gaussian' (training) or 'airy' (a robustness test).
    em_gain
        1 (sCMOS, training) or > 1 (EMCCD, a robustness test).
    second_vesicle
        Put a second, stationary vesicle this far from the first, px (None: one vesicle).
    """

    photons_per_frame: float = 2000.0
    background_photons_per_px: float = 10.0
    blink_on_mean_ms: float = 200.0
    blink_off_mean_ms: float = 100.0
    bleach_half_life_ms: float = 20000.0
    fluorophores_per_vesicle: int = 10
    diameter_nm: tuple[float, float] = (150.0, 400.0)
    psf_model: str = "gaussian"
    em_gain: float = 1.0
    second_vesicle: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_params(state: str, rng: np.random.Generator, data: DataSettings, frame_interval_ms: float) -> SampleParams:
    """Draw one sample's parameters in the study's ranges (module docstring)."""
    if state not in MOTION_STATES:
        raise ValueError(f"unknown motion state {state!r}; states are {MOTION_STATES}")
    diameter = float(rng.uniform(*data.diameter_nm))
    speed = radius = D = 0.0
    if state in ("RanW", "RCir"):
        speed = float(rng.uniform(0.0, MAX_STEP_NM_PER_FRAME))
        D = speed**2 / (4.0 * frame_interval_ms) / 1000.0  # nm²/ms -> µm²/s
        if state == "RCir":
            radius = float(rng.uniform(200.0, 400.0))
    elif state == "Circ":
        speed = float(rng.uniform(0.0, CIRC_SPEED_MAX_NM_PER_FRAME))
        radius = float(rng.uniform(200.0, 500.0))
    elif state == "Flow":
        speed = float(rng.uniform(0.0, FLOW_SPEED_MAX_NM_PER_FRAME))
    sim_seed = int(rng.integers(0, 2**63 - 1))
    return SampleParams(state, diameter, speed, radius, D, data.photons_per_frame, sim_seed)


def simulation_section(params: SampleParams, data: DataSettings, frame_interval_ms: float,
                       box_px: int = BOX_PX, switching_dwell_ms: float | None = None) -> dict[str, Any]:
    """The ``simulation`` configuration section that renders one sample.

    With ``switching_dwell_ms`` every state is listed and the vesicle switches among them with
    that mean dwell (test movies); otherwise only ``params.state`` (training samples).
    """
    speed_um_per_s = params.speed_nm_per_frame / frame_interval_ms  # nm/ms == µm/s
    section: dict[str, Any] = {
        "frame_height_px": box_px, "frame_width_px": box_px,
        "n_particles": 1, "margin_nm": 0.0,
        "particle_kind": "vesicle",
        "vesicle_diameter_nm": params.diameter_nm,
        "fluorophores_per_vesicle": data.fluorophores_per_vesicle,
        "photons_per_frame": params.photons_per_frame,
        "background_photons_per_px": data.background_photons_per_px,
        "states": [params.state] if switching_dwell_ms is None else list(MOTION_STATES),
        "D_um2_per_s": max(params.D_um2_per_s, 0.0),
        "rcir_radius_nm": params.radius_nm if params.radius_nm > 0 else 300.0,
        "circ_radius_nm": params.radius_nm if params.radius_nm > 0 else 300.0,
        "circ_speed_um_per_s": speed_um_per_s,
        "flow_speed_um_per_s": speed_um_per_s,
        "blink_on_mean_ms": data.blink_on_mean_ms,
        "blink_off_mean_ms": data.blink_off_mean_ms,
        "bleach_half_life_ms": data.bleach_half_life_ms,
        "psf_model": data.psf_model,
    }
    if switching_dwell_ms is not None:
        section["dwell_ms"] = switching_dwell_ms
    return section


def camera_config(base: ScopestreamConfig, data: DataSettings) -> ScopestreamConfig:
    """``base`` with the camera of ``data`` (an EMCCD keeps the ADU scale of the base camera)."""
    if data.em_gain == 1.0:
        return base
    raw = config_to_dict(base)
    raw["camera"] = {**raw["camera"], "em_gain": data.em_gain,
                     "gain_e_per_adu": base.camera.gain_e_per_adu * data.em_gain}
    return build_config(raw)


def _render(params: SampleParams, data: DataSettings, base: ScopestreamConfig, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The movie ``(n, B, B)`` uint16 and the labelled vesicle's true position ``(n, 2)`` x, y px
    (at the end of each frame)."""
    from scopestream.sim_camera import make_simulator

    raw = config_to_dict(camera_config(base, data))
    raw["simulation"] = simulation_section(params, data, base.acquisition.frame_interval_ms)
    config = build_config(raw)
    sim = make_simulator(config, "widefield", seed=params.sim_seed)
    a = config.optics.pixel_size_nm
    # Put the vesicle at the centre of the frame (the live box is centred on a track's first detection).
    x_nm, y_nm = sim.scene.pos_nm[0, :2]
    centre_nm = (BOX_PX / 2.0) * a
    sim.set_stage_position_nm(x_nm - centre_nm, y_nm - centre_nm)
    movie = np.empty((n_frames, BOX_PX, BOX_PX), dtype=np.uint16)
    truth_xy = np.empty((n_frames, 2))
    for i in range(n_frames):
        sim.next_frame(movie[i])
        truth_xy[i] = sim.scene.to_px(sim.scene.pos_nm[0, 0], sim.scene.pos_nm[0, 1])
    if data.second_vesicle is not None:
        movie = _add_second_vesicle(movie, params, data, base, float(data.second_vesicle))
    return movie, truth_xy


def _add_second_vesicle(movie: np.ndarray, params: SampleParams, data: DataSettings,
                        base: ScopestreamConfig, distance_px: float) -> np.ndarray:
    """Add a stationary vesicle ``distance_px`` from the centre (its photons on top of the first)."""
    from scopestream.sim_camera import make_simulator

    raw = config_to_dict(camera_config(base, data))
    other = SampleParams("Stat", params.diameter_nm, 0.0, 0.0, 0.0, params.photons_per_frame, params.sim_seed ^ 0x5EED)
    raw["simulation"] = simulation_section(other, data, base.acquisition.frame_interval_ms)
    raw["simulation"]["background_photons_per_px"] = 0.0
    raw["camera"] = {**raw["camera"], "read_noise_e": 0.0, "em_gain": 1.0}
    config = build_config(raw)
    sim = make_simulator(config, "widefield", seed=other.sim_seed)
    a = config.optics.pixel_size_nm
    x_nm, y_nm = sim.scene.pos_nm[0, :2]
    centre_nm = (BOX_PX / 2.0) * a
    sim.set_stage_position_nm(x_nm - centre_nm + distance_px * a, y_nm - centre_nm)
    offset = base.camera.offset_adu
    out = movie.astype(np.float64)
    frame = np.empty((BOX_PX, BOX_PX), dtype=np.uint16)
    for i in range(movie.shape[0]):
        sim.next_frame(frame)
        out[i] += frame - offset
    return np.clip(out, 0, 65535).astype(np.uint16)


def track_positions(movie: np.ndarray, config: ScopestreamConfig) -> tuple[np.ndarray, np.ndarray]:
    """Localize and track a movie with the live stages' batch functions.

    Returns
    -------
    frame, particle, x, y
        As two arrays: ``ids`` (n,) int64 particle of each detection and ``table`` (n, 3)
        float64 rows of (frame, x, y).
    """
    from scopestream.plugins.localize import locate
    from scopestream.plugins.track import link

    loc = locate(movie, config)
    if len(loc["x"]) == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, 3))
    tracks = link(loc, **config.stage_settings("track").model_dump())
    ids = np.asarray(tracks["particle"], dtype=np.int64)
    table = np.column_stack([np.asarray(tracks["frame"], dtype=np.float64),
                             np.asarray(tracks["x"], dtype=np.float64),
                             np.asarray(tracks["y"], dtype=np.float64)])
    return ids, table


def region_origin(cx: float, cy: float, region_px: int, height: int, width: int) -> tuple[int, int]:
    """(y0, x0) of a region centred on (cx, cy), clipped to the frame (the live stage's rule)."""
    y0 = int(np.clip(round(cy) - region_px // 2, 0, height - region_px))
    x0 = int(np.clip(round(cx) - region_px // 2, 0, width - region_px))
    return y0, x0


def cut_window(movie: np.ndarray, ids: np.ndarray, table: np.ndarray, start: int, k: int,
               region_px: int, max_gap_frames: int,
               truth_xy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The window of frames ``[start, start + k)`` of the track with most detections in it
    (with ``truth_xy``, the labelled vesicle's true positions: of the track with most detections
    within 2 px of it, so that a second vesicle's track is never taken for the labelled one's).

    Returns ``(pixels (k, r, r) float32, positions (k, 2) px in region coordinates, live)`` or
    None when no track has a detection in the window. ``live``: the live stage would have cut
    this window (the track alive through all k frames and its region inside the capture box).
    """
    sel = (table[:, 0] >= start) & (table[:, 0] < start + k)
    if not sel.any():
        return None
    wid, wtab = ids[sel], table[sel]
    candidates = wid
    if truth_xy is not None:
        near = np.hypot(*(wtab[:, 1:3] - truth_xy[wtab[:, 0].astype(np.int64)]).T) <= 2.0
        if not near.any():
            return None
        candidates = wid[near]
    values, counts = np.unique(candidates, return_counts=True)
    best = values[np.argmax(counts)]
    rows = wtab[wid == best]
    pos = np.full((k, 2), np.nan)
    pos[rows[:, 0].astype(np.int64) - start] = rows[:, 1:3]
    all_rows = table[ids == best]
    first, last = int(all_rows[:, 0].min()), int(all_rows[:, 0].max())
    h, w = movie.shape[1:]
    finite = np.isfinite(pos[:, 0])
    cx, cy = float(pos[finite, 0].mean()), float(pos[finite, 1].mean())
    y0, x0 = region_origin(cx, cy, region_px, h, w)
    pixels = movie[start : start + k, y0 : y0 + region_px, x0 : x0 + region_px].astype(np.float32)
    half = region_px // 2
    centre = (BOX_PX - 1) / 2.0
    margin = (BOX_PX - region_px) // 2
    frames_seen = np.flatnonzero(finite)
    alive = first <= start + max_gap_frames and last >= start + k - 1 - max_gap_frames
    gaps_ok = frames_seen.size > 0 and (np.diff(frames_seen).max(initial=1) <= max_gap_frames + 1)
    inside = bool(np.all(np.abs(np.round(pos[finite]) - round(centre)) <= margin)) if half else True
    live = bool(alive and gaps_ok and inside)
    pos_region = pos - np.array([x0, y0], dtype=np.float64)
    return pixels, pos_region, live


def make_movie_samples(params: SampleParams, data: DataSettings, base: ScopestreamConfig, spec: InputSpec,
                       k_long: int, k_short: int) -> list[dict[str, Any]]:
    """Render one movie of ``k_long`` frames and return its samples: one window of ``k_long``
    frames and ``k_long // k_short`` windows of ``k_short`` (each a dict of arrays and flags)."""
    movie, truth_xy = _render(params, data, base, k_long)
    # One vesicle (training): its track is the one with most detections, as a user would pick it.
    # With a second vesicle (robustness test), match the labelled vesicle's true positions.
    match = truth_xy if data.second_vesicle is not None else None
    ids, table = track_positions(movie, camera_config(base, data))
    gap = int(base.stage_settings("track").model_dump()["max_gap_frames"])
    out: list[dict[str, Any]] = []
    for k, starts in ((k_long, [0]), (k_short, list(range(0, k_long - k_short + 1, k_short)))):
        for start in starts:
            cut = cut_window(movie, ids, table, start, k, spec.region_px, gap, match)
            if cut is None:
                out.append({"k": k, "start": start, "ok": False, "live": False})
                continue
            pixels, pos, live = cut
            try:
                inputs = window_inputs(pixels, pos, spec)
            except ValueError:
                out.append({"k": k, "start": start, "ok": False, "live": False})
                continue
            out.append({"k": k, "start": start, "ok": True, "live": live,
                        "image": inputs.image.astype(np.float16), "features": inputs.features})
    return out


@dataclass
class Dataset:
    """Samples as arrays (one row per window).

    Attributes
    ----------
    images
        float16 ``(n, S, S)``, the prepared MUSICAL images.
    features
        float32 ``(n, F)``.
    labels
        int64 ``(n,)`` index into :data:`MOTION_STATES`.
    k_frames, live
        Window length and whether the live stage would have cut the window.
    speed_nm_per_frame, radius_nm, D_um2_per_s, diameter_nm
        The truth parameters of each window's vesicle.
    meta
        How the set was made (seed, counts, time).
    """

    images: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    k_frames: np.ndarray
    live: np.ndarray
    speed_nm_per_frame: np.ndarray
    radius_nm: np.ndarray
    D_um2_per_s: np.ndarray
    diameter_nm: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: np.ndarray) -> Dataset:
        """The rows where ``mask`` is True."""
        names = ("images", "features", "labels", "k_frames", "live", "speed_nm_per_frame", "radius_nm",
                 "D_um2_per_s", "diameter_nm")
        return Dataset(**{n: getattr(self, n)[mask] for n in names}, meta=dict(self.meta))

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (cache)."""
        import json

        np.savez(path, images=self.images, features=self.features, labels=self.labels, k_frames=self.k_frames,
                 live=self.live, speed_nm_per_frame=self.speed_nm_per_frame, radius_nm=self.radius_nm,
                 D_um2_per_s=self.D_um2_per_s, diameter_nm=self.diameter_nm,
                 meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        """Read an ``.npz`` written by :meth:`save`."""
        import json

        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"]))
        return cls(**arrays, meta=meta)


def _one_movie(args: tuple[int, int, int, DataSettings, dict[str, Any], InputSpec, int, int]) -> tuple[SampleParams, list[dict[str, Any]]]:
    seed, state_index, index, data, base_raw, spec, k_long, k_short = args
    base = build_config(base_raw)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(state_index, index)))
    params = draw_params(MOTION_STATES[state_index], rng, data, base.acquisition.frame_interval_ms)
    return params, make_movie_samples(params, data, base, spec, k_long, k_short)


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def generate_dataset(
    *, seed: int, movies_per_state: int, spec: InputSpec, data: DataSettings | None = None,
    base: ScopestreamConfig | None = None, k_long: int = 200, k_short: int = 50,
    states: Sequence[str] = MOTION_STATES, workers: int = 1, first_index: int = 0,
    progress: Callable[[int], Any] | None = None,
) -> Dataset:
    """Simulate ``movies_per_state`` movies per state and cut their windows.

    Each movie gives one window of ``k_long`` frames and ``k_long // k_short`` of ``k_short``.
    Windows whose track cannot be found (no detection) are left out and counted in
    ``meta['windows_without_track']``.

    Parameters
    ----------
    seed
        Entropy of the set; training and test sets use different seeds.
    first_index
        Index of the first movie of each state (sets are built in chunks of indices).
    progress
        Called with the number of movies finished since the last call.
    """
    import time

    data = data or DataSettings()
    base = base or ScopestreamConfig()
    base_raw = config_to_dict(base)
    jobs = [(seed, MOTION_STATES.index(s), i, data, base_raw, spec, k_long, k_short)
            for i in range(first_index, first_index + movies_per_state) for s in states]
    t0, c0 = time.perf_counter(), time.process_time()
    results: list[tuple[SampleParams, list[dict[str, Any]]]]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            results = []
            for r in pool.map(_one_movie, jobs, chunksize=4):
                results.append(r)
                if progress:
                    progress(1)
    else:
        results = []
        for job in jobs:
            results.append(_one_movie(job))
            if progress:
                progress(1)
    rows: dict[str, list[Any]] = {k: [] for k in ("images", "features", "labels", "k_frames", "live", "speed",
                                                   "radius", "D", "diameter")}
    dropped = 0
    for params, samples in results:
        for s in samples:
            if not s["ok"]:
                dropped += 1
                continue
            rows["images"].append(s["image"])
            rows["features"].append(s["features"])
            rows["labels"].append(MOTION_STATES.index(params.state))
            rows["k_frames"].append(s["k"])
            rows["live"].append(s["live"])
            rows["speed"].append(params.speed_nm_per_frame)
            rows["radius"].append(params.radius_nm)
            rows["D"].append(params.D_um2_per_s)
            rows["diameter"].append(params.diameter_nm)
    side = spec.image_px
    meta = {"seed": seed, "movies_per_state": movies_per_state, "first_index": first_index, "k_long": k_long, "k_short": k_short,
            "states": list(states), "windows_without_track": dropped, "data": data.to_dict(),
            "spec": spec.to_dict(), "generate_wall_s": time.perf_counter() - t0,
            "generate_cpu_s_main": time.process_time() - c0, "workers": workers}
    return Dataset(
        images=np.array(rows["images"], dtype=np.float16).reshape(-1, side, side),
        features=np.array(rows["features"], dtype=np.float32).reshape(-1, len(FEATURE_NAMES)),
        labels=np.array(rows["labels"], dtype=np.int64),
        k_frames=np.array(rows["k_frames"], dtype=np.int64),
        live=np.array(rows["live"], dtype=bool),
        speed_nm_per_frame=np.array(rows["speed"]),
        radius_nm=np.array(rows["radius"]),
        D_um2_per_s=np.array(rows["D"]),
        diameter_nm=np.array(rows["diameter"]),
        meta=meta,
    )


def concatenate(parts: Sequence[Dataset]) -> Dataset:
    """One dataset of several (rows in order; meta of the first, with summed counts)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    names = ("images", "features", "labels", "k_frames", "live", "speed_nm_per_frame", "radius_nm",
             "D_um2_per_s", "diameter_nm")
    meta = dict(parts[0].meta)
    meta["movies_per_state"] = sum(int(p.meta.get("movies_per_state", 0)) for p in parts)
    meta["windows_without_track"] = sum(int(p.meta.get("windows_without_track", 0)) for p in parts)
    meta["generate_wall_s"] = sum(float(p.meta.get("generate_wall_s", 0.0)) for p in parts)
    return Dataset(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in names}, meta=meta)


def _config_key(config: ScopestreamConfig) -> dict[str, Any]:
    """The parts of a configuration that change the data (not the stage list, ports, ...)."""
    raw = config_to_dict(config)
    return {k: raw[k] for k in ("optics", "camera", "acquisition", "localize", "track")}


def load_or_generate(cache_dir: str | Path | None, name: str, **kwargs: Any) -> Dataset:
    """:func:`generate_dataset`, cached as ``cache_dir/name-<key>.npz`` when ``cache_dir`` is given.

    The key hashes every argument, so a changed setting never reads a stale cache.
    """
    import hashlib
    import json

    if cache_dir is None:
        return generate_dataset(**kwargs)
    key_src = {k: (v.to_dict() if hasattr(v, "to_dict") else (_config_key(v) if isinstance(v, ScopestreamConfig) else v))
               for k, v in kwargs.items() if k not in ("workers", "progress")}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{name}-{key}.npz"
    if path.exists():
        return Dataset.load(path)
    ds = generate_dataset(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save(path)
    return ds


