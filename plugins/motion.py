"""The live ``motion`` stage: a motion state (Stat / RanW / RCir / Circ / Flow) for every track window.

For each completed track window (the :class:`~scopestream.daemon._products.TrackWindows` product,
the windows the ``musical`` stage cuts: a ``region_px`` square around the track over K frames, with
the track's positions), the stage sends one job to the engine's off-thread service
(``context.offload``): the job computes the network inputs with
:func:`scopestream.models.motion._inputs.window_inputs` (the MUSICAL image of the region, the same
code as the live ``musical`` stage, at the model's sub-pixel factor; and the track features) and runs
the shipped network through an inference backend (ONNX Runtime on one CPU thread by default). When
the service is busy the window is skipped and counted. Results are published from the engine's
housekeeping tick:

- ``motion_state``: particle, frame range, most probable state, its probability, the five
  probabilities, model name and version, inference and total job times;
- ``motion_change``: when a track's state differs from its previous window's;
- ``motion_skipped``: a window not classified, and why (busy, invalid input, failed).

Windows: when an earlier stage produces ``TrackWindows`` the stage uses them; otherwise
(``windows: auto``) it cuts its own from the ``TrackUpdate`` and the frame with the ``musical``
stage's geometry (``musical.window_frames``, ``slide_frames``, ``region_px``,
``capture_margin_px``, ``max_tracks``): a box of ``region + 2 · margin`` placed on the track's first
detection, re-placed (partial window dropped) when the track's region would leave it, the region
centred on the mean of the window's positions.

The network and its inputs are described by the model folder's card (``models/weights/motion``
unless ``motion.model_dir`` names another); :meth:`MotionStage.setup` loads and checks it (name,
major version, input shapes, feature names, file hashes) and warms the backend up; a missing folder
or one of another version is a configuration error that names the folder and the problem.
Inference latencies are counted in cumulative buckets (``motion_inference_le_<ms>ms``) exported with
the stage's counters.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scopestream.daemon._config import ScopestreamConfig
from scopestream.daemon._frames import Frame
from scopestream.daemon._products import (
    MOTION_STATES,
    Products,
    TrackUpdate,
    TrackWindow,
    TrackWindows,
)
from scopestream.daemon._stage import Emission, RunContext, StagePlugin
from scopestream.models._backends import ModelRef, load_once

__all__ = [
    "INFERENCE_BUCKETS_MS",
    "MODEL_MAJOR_VERSION",
    "MotionChangeBody",
    "MotionSettings",
    "MotionSkippedBody",
    "MotionStage",
    "MotionStateBody",
    "PLUGIN",
    "classify_windows",
    "default_model_dir",
]

MODEL_NAME = "motion"
MODEL_MAJOR_VERSION = 1
INFERENCE_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0)


def default_model_dir() -> Path:
    """The shipped model folder (``scopestream/models/weights/motion``)."""
    return Path(__file__).resolve().parent.parent / "models" / "weights" / "motion"


class MotionSettings(BaseModel):
    """Settings of the ``motion`` stage (section ``motion.*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_dir: str | None = Field(None, description="Model folder (card.json + weights); None: the shipped models/weights/motion.")
    backend: Literal["onnxruntime", "torch", "tensorrt"] = Field("onnxruntime", description="Inference backend.")
    device: str = Field("cpu", description="Device of the torch / TensorRT backend ('cpu', 'cuda', 'cuda:1').")
    threads: int = Field(1, ge=1, le=64, description="Threads of one inference (ONNX Runtime intra-op, torch CPU).")
    max_pending_windows: int = Field(4, ge=1, le=1024, description="This stage's windows in the off-thread service and not yet published, at most; beyond it (or offload.max_in_flight_jobs) windows are skipped (or waited for).")
    skip_when_busy: bool = Field(True, description="True: skip and count a window when the off-thread service is busy (live). False: wait (analyze; nothing lost).")
    windows: Literal["auto", "product", "own"] = Field(
        "auto", description="Where windows come from: 'product' (TrackWindows of an earlier stage), 'own' (cut here from TrackUpdate with the musical stage's geometry), 'auto' (the product when an earlier stage makes it, else own).",
    )
    min_detected_fraction: float = Field(
        0.2, ge=0, le=1, description="Skip (reason 'invalid') windows in which the track was detected in fewer than this fraction of frames.",
    )


class MotionStateBody(BaseModel):
    """The motion state of one track window."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    particle: int = Field(description="Track id.")
    frame_start: int = Field(description="First frame (Frame.seq) of the window.")
    frame_end: int = Field(description="Last frame of the window, inclusive.")
    state: Literal["Stat", "RanW", "RCir", "Circ", "Flow"] = Field(description="Most probable state.")
    probability: float = Field(description="Its probability.")
    p_Stat: float = Field(description="Probability of Stat (stationary).")
    p_RanW: float = Field(description="Probability of RanW (random walk).")
    p_RCir: float = Field(description="Probability of RCir (random walk confined to a circle).")
    p_Circ: float = Field(description="Probability of Circ (motion along a circle).")
    p_Flow: float = Field(description="Probability of Flow (directed motion along a curve).")
    model_name: str = Field(description="Model name from its card.")
    model_version: str = Field(description="Model version from its card.")
    inference_ms: float = Field(description="Time the network took on this window, ms.")
    job_ms: float = Field(description="Time of the whole off-thread job (MUSICAL image, features, network), ms.")


class MotionChangeBody(BaseModel):
    """A track's state differs from its previous window's."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True, protected_namespaces=())

    particle: int = Field(description="Track id.")
    from_state: Literal["Stat", "RanW", "RCir", "Circ", "Flow"] = Field(alias="from", description="State of the previous window.")
    to_state: Literal["Stat", "RanW", "RCir", "Circ", "Flow"] = Field(alias="to", description="State of this window.")
    frame_change: int = Field(description="First frame of the window in the new state (the change happened after previous_frame_start and by frame_end).")
    previous_frame_start: int = Field(description="First frame of the previous window.")
    previous_frame_end: int = Field(description="Last frame of the previous window.")
    frame_end: int = Field(description="Last frame of the window in the new state.")
    probability: float = Field(description="Probability of the new state.")
    previous_probability: float = Field(description="Probability the previous window gave its state.")
    p_Stat: float = Field(description="Probabilities of this window, per state.")
    p_RanW: float
    p_RCir: float
    p_Circ: float
    p_Flow: float


class MotionSkippedBody(BaseModel):
    """A window that was not classified, and why."""

    model_config = ConfigDict(frozen=True)

    particle: int = Field(description="Track id.")
    frame_start: int = Field(description="First frame of the window.")
    frame_end: int = Field(description="Last frame of the window, inclusive.")
    reason: Literal["busy", "invalid", "failed", "lost", "teardown"] = Field(
        description="busy: the off-thread service was full; invalid: unusable input (NaN or constant pixels, no detections, wrong size); failed: the job raised; lost: its worker died; teardown: still in flight when the run ended.",
    )
    detail: str = Field("", description="Human-readable detail.")
    windows_skipped_total: int = Field(description="Windows not classified so far in this run (all reasons).")


# -- worker side ---------------------------------------------------------------------------------


def _model(ref: ModelRef) -> tuple[Any, Any]:
    """(model folder, loaded backend) for ``ref``, loaded once per process."""
    return load_once(ref, _check_folder)


def _check_folder(model_dir: str) -> Any:
    from scopestream.models._card import load_model_folder
    from scopestream.models.motion._inputs import FEATURE_NAMES, InputSpec

    folder = load_model_folder(model_dir, name=MODEL_NAME, major_version=MODEL_MAJOR_VERSION, feature_names=FEATURE_NAMES)
    spec = InputSpec(**folder.card.input_spec)
    return load_model_folder(model_dir, name=MODEL_NAME, major_version=MODEL_MAJOR_VERSION,
                             inputs={"image": [-1, 1, spec.image_px, spec.image_px], "features": [-1, len(FEATURE_NAMES)]})


@dataclass(frozen=True)
class _Result:
    probabilities: np.ndarray  # (n, 5)
    inference_ms: float
    job_ms: float
    model_version: str


def classify_windows(ref: ModelRef, pixels: Sequence[np.ndarray], positions: Sequence[np.ndarray]) -> _Result:
    """Off-thread job: network inputs of each window and the model's probabilities ``(n, 5)``.

    Raises
    ------
    ValueError
        When a window's input cannot be computed (the message names the problem).
    """
    from scopestream.models.motion._inputs import InputSpec, window_inputs

    t0 = time.perf_counter()
    folder, backend = _model(ref)
    spec = InputSpec(**folder.card.input_spec)
    inputs = [window_inputs(p, q, spec) for p, q in zip(pixels, positions, strict=True)]
    image = np.stack([i.image for i in inputs])[:, None]
    features = np.stack([i.features for i in inputs])
    t1 = time.perf_counter()
    probs = backend.run({"image": image, "features": features})["probabilities"]
    t2 = time.perf_counter()
    return _Result(np.asarray(probs, dtype=np.float64), (t2 - t1) * 1e3, (t2 - t0) * 1e3, folder.card.version)


# -- own windows (until the musical stage's TrackWindows product is wired in) ----------------------


class _WindowCutter:
    """Cuts track windows from TrackUpdate + frame with the ``musical`` stage's geometry."""

    def __init__(self, window_frames: int, slide_frames: int, region_px: int, margin_px: int, max_tracks: int) -> None:
        self.k, self.slide, self.region, self.margin, self.max_tracks = window_frames, slide_frames, region_px, margin_px, max_tracks
        self._tracks: dict[int, dict[str, Any]] = {}
        self.reanchors = 0
        self.not_buffered = 0

    def _place(self, t: dict[str, Any], x: float, y: float, shape: tuple[int, int]) -> None:
        h, w = shape
        bh, bw = min(self.region + 2 * self.margin, h), min(self.region + 2 * self.margin, w)
        t["box"] = (int(np.clip(round(y) - bh // 2, 0, h - bh)), int(np.clip(round(x) - bw // 2, 0, w - bw)), bh, bw)
        t["frames"], t["pos"], t["seq"] = [], [], []
        t["next"] = self.k

    def _region_origin(self, x: float, y: float, shape: tuple[int, int]) -> tuple[int, int]:
        h, w = shape
        rh, rw = min(self.region, h), min(self.region, w)
        return int(np.clip(round(y) - rh // 2, 0, h - rh)), int(np.clip(round(x) - rw // 2, 0, w - rw))

    def update(self, frame: Frame, track: TrackUpdate) -> TrackWindows:
        image = frame.image
        shape = (int(image.shape[0]), int(image.shape[1]))
        rh, rw = min(self.region, shape[0]), min(self.region, shape[1])
        for pid in track.ended:
            self._tracks.pop(int(pid), None)
        seen: dict[int, tuple[float, float]] = {}
        for pid, x, y in zip(track.particle.tolist(), track.x.tolist(), track.y.tolist(), strict=True):
            if math.isfinite(x) and math.isfinite(y):
                seen[int(pid)] = (x, y)
        for pid, (x, y) in seen.items():
            t = self._tracks.get(pid)
            if t is None:
                if len(self._tracks) >= self.max_tracks:
                    self.not_buffered += 1
                    continue
                t = self._tracks[pid] = {"last_seen": frame.seq}
                self._place(t, x, y, shape)
            by0, bx0, bh, bw = t["box"]
            ry0, rx0 = self._region_origin(x, y, shape)
            if ry0 < by0 or ry0 + rh > by0 + bh or rx0 < bx0 or rx0 + rw > bx0 + bw:
                self.reanchors += 1
                self._place(t, x, y, shape)
            t["last_seen"] = frame.seq
        windows = []
        for pid in list(self._tracks):
            t = self._tracks[pid]
            if frame.seq - t["last_seen"] > self.k:
                del self._tracks[pid]
                continue
            by0, bx0, bh, bw = t["box"]
            t["frames"].append(np.asarray(image[by0 : by0 + bh, bx0 : bx0 + bw], dtype=np.float32))
            xy = seen.get(pid, (math.nan, math.nan))
            t["pos"].append(xy)
            t["seq"].append(frame.seq)
            if len(t["frames"]) > self.k:
                del t["frames"][0], t["pos"][0], t["seq"][0]
                t["next"] -= 1
            if len(t["frames"]) >= t["next"]:
                t["next"] += self.slide
                windows.append(self._cut(pid, t, shape))
        return TrackWindows(frame.seq, tuple(windows))

    def _cut(self, pid: int, t: dict[str, Any], shape: tuple[int, int]) -> TrackWindow:
        by0, bx0, bh, bw = t["box"]
        rh, rw = min(self.region, shape[0]), min(self.region, shape[1])
        pos = np.array(t["pos"], dtype=np.float64)
        finite = np.isfinite(pos[:, 0])
        if finite.any():
            cx, cy = float(pos[finite, 0].mean()), float(pos[finite, 1].mean())
        else:
            cx, cy = bx0 + (bw - 1) / 2, by0 + (bh - 1) / 2
        ry0, rx0 = self._region_origin(cx, cy, shape)
        y0 = int(np.clip(ry0, by0, by0 + bh - rh))
        x0 = int(np.clip(rx0, bx0, bx0 + bw - rw))
        stack = np.stack(t["frames"])[:, y0 - by0 : y0 - by0 + rh, x0 - bx0 : x0 - bx0 + rw]
        return TrackWindow(pid, int(t["seq"][0]), int(t["seq"][-1]), y0, x0, np.ascontiguousarray(stack), pos)


# -- the stage -------------------------------------------------------------------------------------


class MotionStage:
    """Classifies track windows off the camera path; see the module docstring."""

    name = "motion"

    def __init__(self, config: ScopestreamConfig, settings: MotionSettings) -> None:
        self._config = config
        self._settings = settings
        self._lock = threading.Lock()  # on_done / on_fail run on the housekeeping thread
        self._counts: dict[str, int] = {
            "motion_windows_submitted": 0,
            "motion_windows_done": 0,
            "motion_windows_skipped": 0,
            "motion_windows_invalid": 0,
            "motion_windows_busy": 0,
            "motion_windows_failed": 0,
            "motion_changes": 0,
        }
        self._latency_counts = [0] * (len(INFERENCE_BUCKETS_MS) + 1)
        self._latency_sum_us = 0
        self._last: dict[int, tuple[int, int, str, float]] = {}  # particle -> (start, end, state, p)
        self._context: RunContext | None = None
        self._ref: ModelRef | None = None
        self._model_version = ""
        self._region_px = 0
        self._cutter: _WindowCutter | None = None

    # life cycle ---------------------------------------------------------------------------

    def setup(self, context: RunContext) -> None:
        """Load and check the model folder, warm the backend up (errors name the folder)."""
        from scopestream.models._card import ModelLoadError

        s = self._settings
        model_dir = Path(s.model_dir) if s.model_dir else default_model_dir()
        ref = ModelRef(str(model_dir), s.backend, s.device, s.threads)
        try:
            folder, _ = _model(ref)
        except ModelLoadError as exc:
            raise ValueError(f"motion stage: {exc}") from None
        spec = folder.card.input_spec
        trained_nm = float(spec.get("pixel_size_nm", context.pixel_size_nm))
        if abs(trained_nm - context.pixel_size_nm) > 0.2 * trained_nm:
            raise ValueError(
                f"motion stage: the model in {model_dir} was trained at {trained_nm:g} nm pixels; this run has "
                f"optics.pixel_size_nm {context.pixel_size_nm:g} (more than 20 % off: its MUSICAL images would not compare)"
            )
        self._ref = ref
        self._context = context
        self._model_version = folder.card.version
        self._region_px = int(spec.get("region_px", 25))
        m = self._config.stage_settings("musical") if "musical" in (self._config.model_extra or {}) else None
        geometry = m.model_dump() if m is not None else {}
        region = int(geometry.get("region_px", self._region_px))
        if region != self._region_px:
            raise ValueError(
                f"motion stage: musical.region_px is {region} but the model reads {self._region_px} px regions"
            )
        if self._settings.windows == "auto" and "musical" in self._config.stages:
            return  # the musical stage's TrackWindows product: no second frame buffer here
        self._cutter = _WindowCutter(
            int(geometry.get("window_frames", 200)), int(geometry.get("slide_frames", 200)), region,
            int(geometry.get("capture_margin_px", 12)), int(geometry.get("max_tracks", 32)),
        )

    def process(self, frame: Frame, products: Products) -> Sequence[Emission]:
        """Submit this frame's completed windows; returns skip events (states come later)."""
        if self._context is None or self._ref is None:
            raise RuntimeError("motion stage: process() before setup()")
        mode = self._settings.windows
        windows = products.get(TrackWindows) if mode != "own" else None
        if windows is None and mode != "product" and self._cutter is not None:
            track = products.get(TrackUpdate)
            if track is not None:
                windows = self._cutter.update(frame, track)
        if windows is None or not len(windows):
            return []
        emissions: list[Emission] = []
        for w in windows.windows:
            problem = self._window_problem(w)
            if problem:
                with self._lock:
                    self._counts["motion_windows_invalid"] += 1
                emissions.append(self._skipped(w.particle, w.frame_start, w.frame_end, "invalid", problem))
                continue
            key = (w.particle, w.frame_start, w.frame_end)
            accepted = self._context.offload.submit(
                self.name, classify_windows, self._ref, [w.pixels], [w.positions_px],
                on_done=partial(self._on_done, key, frame.t_acquired),
                on_fail=partial(self._on_fail, key),
                max_in_flight=self._settings.max_pending_windows, block=not self._settings.skip_when_busy,
            )
            with self._lock:
                if accepted:
                    self._counts["motion_windows_submitted"] += 1
                else:
                    self._counts["motion_windows_busy"] += 1
            if not accepted:
                emissions.append(self._skipped(w.particle, w.frame_start, w.frame_end, "busy", "the off-thread service is full"))
        return emissions

    def counters(self) -> Mapping[str, int]:
        """Running totals and the inference-latency histogram as cumulative bucket counts
        (``motion_inference_le_<ms>ms``, ``motion_inference_count``, ``motion_inference_sum_us``)."""
        with self._lock:
            out = dict(self._counts)
            cumulative = np.cumsum(self._latency_counts).tolist()
            for edge, value in zip(INFERENCE_BUCKETS_MS, cumulative, strict=False):
                out[f"motion_inference_le_{edge:g}ms"] = int(value)
            out["motion_inference_count"] = int(cumulative[-1])
            out["motion_inference_sum_us"] = int(self._latency_sum_us)
            if self._cutter is not None:
                out["motion_track_reanchors"] = self._cutter.reanchors
                out["motion_tracks_not_buffered"] = self._cutter.not_buffered
            return out

    def teardown(self) -> Sequence[Emission]:
        """Nothing buffered to flush (jobs in flight finish through the engine's service)."""
        return []

    # internals ----------------------------------------------------------------------------

    def _window_problem(self, w: TrackWindow) -> str:
        px = w.pixels
        if px.shape[1:] != (self._region_px, self._region_px):
            return f"region {px.shape[1]}×{px.shape[2]} px, the model reads {self._region_px}×{self._region_px}"
        if px.dtype.kind == "f" and not np.isfinite(px).all():
            return f"{int(np.count_nonzero(~np.isfinite(px)))} NaN or infinite pixel value(s)"
        if float(np.ptp(px)) == 0.0:
            return "the region is constant over the window (no fluctuations)"
        detected = float(np.isfinite(w.positions_px).all(axis=1).mean())
        if detected < self._settings.min_detected_fraction:
            return f"the track was detected in {detected:.0%} of the window's frames (< min_detected_fraction {self._settings.min_detected_fraction:.0%})"
        return ""

    def _skipped(self, particle: int, start: int, end: int, reason: str, detail: str) -> Emission:
        with self._lock:
            self._counts["motion_windows_skipped"] += 1
            total = self._counts["motion_windows_skipped"]
        body = MotionSkippedBody(particle=particle, frame_start=start, frame_end=end, reason=reason,  # type: ignore[arg-type]
                                 detail=detail, windows_skipped_total=total)
        return Emission("motion_skipped", body, frame_seq=end)

    def _on_fail(self, key: tuple[int, int, int], reason: str, detail: str) -> Sequence[Emission]:
        """The off-thread service's report of a job that did not finish (``failed``: it raised,
        ``detail`` names the exception; ``lost``: its worker died; ``teardown``: the run ended)."""
        particle, start, end = key
        if reason == "failed" and detail.startswith("ValueError"):  # the window itself was unusable
            reason = "invalid"
        with self._lock:
            self._counts["motion_windows_invalid" if reason == "invalid" else "motion_windows_failed"] += 1
        return [self._skipped(particle, start, end, reason, detail)]

    def _on_done(self, key: tuple[int, int, int], t_acquired: float, result: _Result) -> Sequence[Emission]:
        particle, start, end = key
        p = np.asarray(result.probabilities[0], dtype=np.float64)
        idx = int(np.argmax(p))
        state = MOTION_STATES[idx]
        probs = {f"p_{s}": float(v) for s, v in zip(MOTION_STATES, p, strict=True)}
        body = MotionStateBody(
            particle=particle, frame_start=start, frame_end=end, state=state, probability=float(p[idx]),  # type: ignore[arg-type]
            model_name=MODEL_NAME, model_version=result.model_version, inference_ms=result.inference_ms,
            job_ms=result.job_ms, **probs,
        )
        emissions = [Emission("motion_state", body, frame_seq=end, t_acquired=t_acquired)]
        with self._lock:
            self._counts["motion_windows_done"] += 1
            bucket = int(np.searchsorted(INFERENCE_BUCKETS_MS, result.inference_ms))
            self._latency_counts[bucket] += 1
            self._latency_sum_us += int(round(result.inference_ms * 1e3))
            previous = self._last.get(particle)
            if previous is None or previous[0] < start:
                self._last[particle] = (start, end, state, float(p[idx]))
                if len(self._last) > 100_000:
                    self._last.clear()
            if previous is not None and previous[0] < start and previous[2] != state:
                self._counts["motion_changes"] += 1
                change = MotionChangeBody.model_validate({
                    "particle": particle, "from": previous[2], "to": state, "frame_change": start,
                    "previous_frame_start": previous[0], "previous_frame_end": previous[1], "frame_end": end,
                    "probability": float(p[idx]), "previous_probability": previous[3], **probs,
                })
                emissions.append(Emission("motion_change", change, frame_seq=end, t_acquired=t_acquired))
        return emissions


PLUGIN = StagePlugin(
    name="motion",
    settings_model=MotionSettings,
    build=MotionStage,
    topics={"motion_state": MotionStateBody, "motion_change": MotionChangeBody, "motion_skipped": MotionSkippedBody},
    # TrackWindows (the musical stage's product) when present; else own windows from TrackUpdate.
    consumes_if_present=(TrackWindows, TrackUpdate),
    tables={"motion_state": "motion.csv"},
    description="Motion state (Stat/RanW/RCir/Circ/Flow) of every track window, off the camera path.",
)
