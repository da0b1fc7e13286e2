"""The image-stack diffusion network inside the ``diffusion`` stage (``diffusion.method: network``).

The stage cuts windows of ``frames`` frames (the model's, 16 by default) and ``region_px`` pixels
around each track with the ``motion`` stage's cutter (a box of ``region + 2 · margin`` placed on
the track's first detection, the region centred on the mean of the window's positions; a new
window every ``network_step_frames`` frames) and sends each window to the engine's off-thread
service; the job normalizes it (:func:`scopestream.models.diffusion._inputs.stack_input`) and runs
the shipped network (ONNX Runtime, one thread, by default), which returns the mean and variance of
ln D (D in px²/frame) averaged over the four 90° rotations. The estimate is published beside the
track-based ones as a ``diffusion`` row with method ``network`` and window ``stack``:
``D_um2_per_s = exp(mean)`` (the median of the log-normal), ``D_err_um2_per_s = D · sqrt(var)``
(delta method), ``D_crlb_um2_per_s`` and ``sigma_loc_nm`` NaN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.models._backends import ModelRef, load_once

__all__ = ["MODEL_MAJOR_VERSION", "MODEL_NAME", "StackResult", "default_model_dir", "estimate_stacks", "load_network"]

MODEL_NAME = "diffusion"
MODEL_MAJOR_VERSION = 1


def default_model_dir() -> Path:
    """The shipped model folder (``scopestream/models/weights/diffusion``)."""
    return Path(__file__).resolve().parent.parent / "models" / "weights" / "diffusion"


def load_network(ref: ModelRef) -> tuple[Any, Any]:
    """(model folder, loaded and warmed-up backend), once per process.

    Raises
    ------
    ModelLoadError
        Naming the folder and the problem (missing weights, other version, no onnxruntime, ...).
    """
    return load_once(ref, _check_folder)


def _check_folder(model_dir: str) -> Any:
    from scopestream.models._card import load_model_folder

    folder = load_model_folder(model_dir, name=MODEL_NAME, major_version=MODEL_MAJOR_VERSION)
    spec = folder.card.input_spec
    t, s = int(spec.get("frames", 16)), int(spec.get("region_px", 16))
    return load_model_folder(model_dir, name=MODEL_NAME, major_version=MODEL_MAJOR_VERSION,
                             inputs={"stack": [-1, t, s, s], "blur": [-1, 1]})


@dataclass(frozen=True)
class StackResult:
    """Mean and variance of ln D (px²/frame) per window, and timings."""

    log_D: np.ndarray
    var_log_D: np.ndarray
    inference_ms: float
    job_ms: float


def estimate_stacks(ref: ModelRef, pixels: list[np.ndarray], blur: float) -> StackResult:
    """Off-thread job: the network's ln D and its variance for each window of ``pixels`` (ADU).

    Raises
    ------
    ValueError
        When a window cannot be used (NaN pixels, wrong shape); the message names the problem.
    """
    from scopestream.models.diffusion._inputs import stack_input

    t0 = time.perf_counter()
    folder, backend = load_network(ref)
    spec = folder.card.input_spec
    shape = (int(spec.get("frames", 16)), int(spec.get("region_px", 16)), int(spec.get("region_px", 16)))
    for p in pixels:
        if tuple(p.shape) != shape:
            raise ValueError(f"window of shape {tuple(p.shape)}, the model reads {shape}")
    x = stack_input(np.stack(pixels))
    b = np.full((len(pixels), 1), blur, dtype=np.float32)
    t1 = time.perf_counter()
    out = backend.run({"stack": x, "blur": b})
    t2 = time.perf_counter()
    mu = np.asarray(out["log_D"], dtype=np.float64).reshape(-1)
    var = np.exp(np.asarray(out["log_var"], dtype=np.float64).reshape(-1))
    return StackResult(mu, var, (t2 - t1) * 1e3, (t2 - t0) * 1e3)
