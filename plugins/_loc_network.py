"""``localize.method: network``: detection and localization by the learned network (``locnet``).

The frame (ADU) is converted to photons with the camera model, non-finite pixels are replaced by
the frame's median (their regions are then dropped), the frame is normalized
(:func:`scopestream.models.localize._inputs.normalize_photons`) and padded at the bottom and right
to a multiple of the network's input multiple (4 px; pixel coordinates do not change), and the
model folder's network runs through an inference backend (ONNX Runtime on one CPU thread by
default). Decoding: maxima of the heat map over the card's ``nms_cells`` square (3 or 5 cells) at or
above ``network_threshold``; position = cell
centre + predicted offset; ``uncertainty_px`` = the predicted standard error
``sqrt((sx^2 + sy^2) / 2)`` times the card's ``uncertainty_scale`` (std(error / predicted sigma) on the
validation set, so that the errors are calibrated). Photons and background come from the square region around each
position (border median, background-subtracted sum), as for radial symmetry; ``sigma`` is the
configured PSF width (the network does not estimate it).

``network_refine: mle`` (the hybrid; ``auto``, the default, picks it for widefield models): the network detects, the Poisson MLE of a still Gaussian spot
of the configured PSF width refines each position from the network's, and its estimates (position,
photons, background, Mortensen uncertainty) replace the network's where the fit converges inside
the region within 3 predicted standard errors of the network's position. It wins where the spot is still and bright (widefield,
N >= 500 photons: at the Cramér-Rao bound); on scan-blurred spots the network's own positions are
better (see benchmarks/bench_localize_network.py).

Model folders are loaded (and their hashes checked) once per process and reused by every stage
and run that names the same folder, backend, device and thread count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from scopestream.daemon._products import Localizations
from scopestream.models.localize._inputs import decode, normalize_photons, pad_to_multiple
from scopestream.plugins._gaussian_mle import (
    _border_background,
    fit_mle,
    mortensen_mle_variance_px2,
)

__all__ = ["MODEL_MAJOR_VERSION", "MODEL_NAME", "NetworkLocalizer", "shipped_model_dir"]

MODEL_NAME = "localize"
MODEL_MAJOR_VERSION = 1
SHIPPED = ("scanning", "widefield")
_PHOTOMETRY_ROI_PX = {"scanning": 11, "widefield": 7}


def shipped_model_dir(camera: str) -> Path:
    """The shipped model folder of ``camera`` ('scanning' or 'widefield')."""
    return Path(__file__).resolve().parent.parent / "models" / "weights" / f"localize_{camera}"


def _check_folder(model_dir: str) -> Any:
    from scopestream.models._card import load_model_folder

    return load_model_folder(model_dir, name=MODEL_NAME, major_version=MODEL_MAJOR_VERSION)


class NetworkLocalizer:
    """Detection and localization with a model folder of the ``localize`` family.

    Parameters
    ----------
    settings
        The ``localize`` settings (``network_*`` fields, ``roi_px``, ``min_photons``, ``max_spots``,
        ``exclude_saturated``).
    camera
        The configuration's ``camera`` section (ADU -> photons, saturation level).
    sigma_px
        The PSF width reported in the ``sigma`` column, px.
    model_dir
        The model folder.

    Raises
    ------
    scopestream.models.ModelLoadError
        When the folder is missing, is another model or version, or its files were altered.
    """

    def __init__(self, settings: Any, camera: Any, sigma_px: float, model_dir: str | Path) -> None:
        self.settings = settings
        self.model_dir = Path(model_dir)
        from scopestream.models._backends import ModelRef, load_once

        self.folder, self._backend = load_once(
            ModelRef(str(self.model_dir), settings.network_backend, settings.network_device, settings.network_threads),
            _check_folder,
        )
        spec = self.folder.card.input_spec
        self.stride_px = int(spec.get("stride_px", 2))
        self.multiple_px = int(spec.get("input_multiple_px", 4))
        self.nms_cells = int(spec.get("nms_cells", 3))
        self.pool_decoding = bool(spec.get("pool_decoding", False))
        self.uncertainty_scale = float(spec.get("uncertainty_scale", 1.0))
        self.camera_kind = str(spec.get("camera", "widefield"))
        self.sigma_px = float(sigma_px)
        #: 'mle' or 'none' (``network_refine``, 'auto' resolved by the model's camera).
        self.refine = settings.network_refine if settings.network_refine != "auto" else (
            "none" if self.camera_kind == "scanning" else "mle"
        )
        self.roi_px = settings.roi_px if settings.roi_px is not None else _PHOTOMETRY_ROI_PX.get(self.camera_kind, 7)
        self._offset_adu = float(camera.offset_adu)
        self._photons_per_adu = float(camera.gain_e_per_adu) / float(camera.em_gain)
        self._read_variance = (float(camera.read_noise_e) / float(camera.em_gain)) ** 2
        self._saturation_adu = float(camera.saturation_adu)
        self._excess_noise = 2.0 if camera.em_gain > 1.0 else 1.0
        self._warm: set[tuple[int, int]] = set()

    def _refine(
        self, rois: np.ndarray, ox: np.ndarray, oy: np.ndarray, x_px: np.ndarray, y_px: np.ndarray, n_ph: np.ndarray,
        bg: np.ndarray, unc: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """``network_refine: mle``: the MLE's estimates where its fit is accepted (see :func:`_refine_fit`)."""
        fx, fy, fn, fb, fu, good = _refine_fit(
            rois, ox, oy, x_px, y_px, self.sigma_px, self._read_variance, self._excess_noise, unc
        )
        return (np.where(good, fx, x_px), np.where(good, fy, y_px), np.where(good, fn, n_ph), np.where(good, fb, bg),
                np.where(good, fu, unc), int(good.sum()))

    @property
    def model_version(self) -> str:
        """The loaded model's version (from its card)."""
        return str(self.folder.card.version)

    def warm_up(self, shape: tuple[int, int]) -> None:
        """Run the network once on a frame of ``shape`` (ONNX Runtime plans per input shape)."""
        h, w = shape
        hp, wp = h + (-h) % self.multiple_px, w + (-w) % self.multiple_px
        if (hp, wp) not in self._warm:
            self._backend.run({"image": np.zeros((1, 1, hp, wp), np.float32)})
            self._warm.add((hp, wp))

    def run_network(self, normalized: np.ndarray) -> dict[str, np.ndarray]:
        """The backend's outputs for normalized frames ``(n, H, W)`` (multiples of the input multiple)."""
        return self._backend.run({"image": normalized[:, None]})

    def localize(self, image: np.ndarray, frame_seq: int = 0, network_out: Mapping[str, np.ndarray] | None = None) -> Localizations:
        """Detect and localize the spots of one frame (ADU, 2-D, already checked).

        ``network_out``: this frame's network outputs if already computed (a batch of
        :meth:`run_batch`), else the network runs on the frame here.

        Raises
        ------
        ValueError
            If the frame has no finite pixel or is smaller than the network's input multiple.
        """
        return self.localize_scored(image, frame_seq, network_out)[0]

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(photons, non-finite mask or None) of one frame; non-finite pixels set to the median."""
        h, w = image.shape
        if h < self.multiple_px or w < self.multiple_px:
            raise ValueError(f"image {image.shape} is smaller than the network's {self.multiple_px} px minimum")
        photons = image.astype(np.float32)
        bad = None
        if image.dtype.kind == "f":
            finite = np.isfinite(photons)
            if not finite.all():
                if not finite.any():
                    raise ValueError("no finite pixel in the frame")
                bad = ~finite
                photons[bad] = np.median(photons[finite])
        photons -= np.float32(self._offset_adu)
        photons *= np.float32(self._photons_per_adu)
        return photons, bad

    def _network_input(self, photons: np.ndarray) -> np.ndarray:
        """The network's normalized input of one frame, padded to the input multiple."""
        return pad_to_multiple(normalize_photons(photons, self._read_variance), self.multiple_px)

    def run_batch(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray] | None]:
        """The network's outputs for several frames in one call: per frame a dict for
        :meth:`localize`'s ``network_out``, or None for a frame that cannot be batched (its own
        error comes when it is localized). Frames of another shape than the first are not batched."""
        inputs: list[np.ndarray] = []
        where: list[int | None] = []
        for image in images:
            try:
                if image.ndim != 2 or image.shape != images[0].shape:
                    raise ValueError("not batchable")
                x = self._network_input(self._prepare(image)[0])
            except ValueError:
                where.append(None)
                continue
            where.append(len(inputs))
            inputs.append(x)
        if not inputs:
            return [None] * len(images)
        out = self.run_network(np.stack(inputs))
        return [None if i is None else {k: v[i:i + 1] for k, v in out.items()} for i in where]

    def localize_scored(
        self, image: np.ndarray, frame_seq: int = 0, network_out: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[Localizations, np.ndarray]:
        """As :meth:`localize`, with each localization's heat-map confidence (0-1).

        Raises
        ------
        ValueError
            If the frame has no finite pixel or is smaller than the network's input multiple.
        """
        s = self.settings
        h, w = image.shape
        photons, bad = self._prepare(image)
        out = network_out if network_out is not None else self.run_network(self._network_input(photons)[None])
        d = decode(out["heat"][0, 0], out["offset"][0], out["log_sigma"][0], self.stride_px, s.network_threshold, h, w,
                   self.nms_cells, self.pool_decoding, self.uncertainty_scale)
        n_cand = int(d.x_px.size)
        roi = min(self.roi_px, h, w)
        half = roi // 2
        oy = np.clip(np.rint(d.y_px).astype(np.intp) - half, 0, h - roi)
        ox = np.clip(np.rint(d.x_px).astype(np.intp) - half, 0, w - roi)
        keep = np.ones(n_cand, bool)
        rejected_saturated = 0
        if n_cand and s.exclude_saturated and not float(np.nanmax(image)) < self._saturation_adu:
            regions = sliding_window_view(image, (roi, roi))[oy, ox]
            sat = np.nan_to_num(regions.astype(np.float64), nan=-np.inf).max(axis=(1, 2)) >= self._saturation_adu
            rejected_saturated = int(sat.sum())
            keep &= ~sat
        if n_cand and bad is not None:
            keep &= ~sliding_window_view(bad, (roi, roi))[oy, ox].any(axis=(1, 2))
        rois = sliding_window_view(photons, (roi, roi))[oy, ox].astype(np.float64)
        bg, n_ph = _border_background(rois) if n_cand else (np.empty(0), np.empty(0))
        x_px, y_px, unc = d.x_px, d.y_px, d.uncertainty_px
        refined = 0
        if self.refine == "mle" and n_cand and roi >= 3:
            x_px, y_px, n_ph, bg, unc, refined = self._refine(rois, ox, oy, x_px, y_px, n_ph, bg, unc)
        ok = keep & (n_ph >= s.min_photons)
        rejected_fit = int(np.count_nonzero(keep & ~ok))
        idx = np.flatnonzero(ok)
        if idx.size > s.max_spots:
            idx = idx[np.argsort(-d.confidence[idx], kind="stable")[: s.max_spots]]
            idx.sort()
        locs = Localizations(
            frame_seq=frame_seq,
            x=x_px[idx],
            y=y_px[idx],
            photons=n_ph[idx],
            background=bg[idx],
            sigma=np.full(idx.size, self.sigma_px),
            uncertainty_px=unc[idx],
            diagnostics={
                "candidates": n_cand,
                "refined": refined,
                "rejected_saturated": rejected_saturated,
                "rejected_fit": rejected_fit,
                "noise_scale": _noise_scale(photons, self._read_variance),
            },
        )
        return locs, d.confidence[idx]


def _refine_fit(
    rois: np.ndarray, ox: np.ndarray, oy: np.ndarray, x_px: np.ndarray, y_px: np.ndarray, sigma_px: float,
    read_variance: float, excess_noise: float, network_sigma_px: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Poisson MLE of still Gaussian spots started at the network's positions: (x, y, photons,
    background, uncertainty, accepted). Accepted: converged, inside the region, with positive photons
    and within 3 of the network's predicted standard errors (at least 0.3 px) of its position -- a fit
    pulled further (by an overlapping neighbour, or a spot that is not a still Gaussian) is not
    trusted; there the caller keeps the network's values."""
    fit = fit_mle(rois, sigma_px, read_variance=read_variance, start_xy=(x_px - ox, y_px - oy))
    roi = rois.shape[-1]
    x, y = fit.x_px + ox, fit.y_px + oy
    good = (
        fit.converged & (fit.x_px > -0.5) & (fit.x_px < roi - 0.5) & (fit.y_px > -0.5) & (fit.y_px < roi - 0.5)
        & (fit.photons > 0) & (np.hypot(x - x_px, y - y_px) <= np.maximum(3.0 * network_sigma_px, 0.3))
    )
    var = mortensen_mle_variance_px2(
        np.maximum(fit.photons, 1e-9), np.maximum(fit.background, 0.0) + read_variance, fit.sigma_px, excess_noise=excess_noise
    )
    return x, y, fit.photons, fit.background, np.sqrt(var), good


def _noise_scale(photons: np.ndarray, read_variance: float) -> float:
    """Robust standard deviation of neighbouring-pixel differences over the Poisson prediction
    (1 for a well-calibrated camera), on a strided sample: the same meaning as the MLE's figure."""
    h, w = photons.shape
    st = max(1, int(math.sqrt(h * w / 4096.0)))
    sub = photons[::st, : w - 1 : st]
    nxt = photons[::st, 1::st][:, : sub.shape[1]]
    sub = sub[:, : nxt.shape[1]]
    if sub.size == 0:
        return 0.0
    diff = (sub - nxt).ravel()
    level = float(np.median(sub))
    mad = float(np.median(np.abs(diff - np.median(diff))))
    return float(1.4826 * mad / math.sqrt(2.0 * (max(level, 0.0) + read_variance) + 1e-12)) if level + read_variance > 0 else 0.0
