"""What the localization network reads and how its output becomes localizations (numpy only).

The same code prepares the training frames and the live frames, so the two cannot drift apart.

Normalization (:func:`normalize_photons`): a frame in photons ``p`` becomes
``asinh((p - m) / s)`` with ``m`` the frame's median (the background level for sparse spots) and
``s = sqrt(max(m, 0) + read_variance + 1)`` its Poisson standard deviation: a signal-to-noise image,
whatever the camera gain or background, with bright peaks compressed (asinh is linear near 0 and
logarithmic beyond).

Decoding (:func:`decode`): a cell is a detection where its heat is at least ``threshold`` and is
the largest in its neighbourhood (3 x 3 cells; the scanning model's card asks for 5 x 5) (the non-maximum
suppression of CenterNet); the position is the cell centre plus the predicted offset (or, where the card
asks for ``pool_decoding``, the heat-weighted mean of the positions the cells around the peak predict), the uncertainty ``sqrt((sx^2 + sy^2) / 2)`` from the
predicted log-sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter

__all__ = ["Decoded", "decode", "heat_targets", "normalize_photons", "pad_to_multiple"]


def normalize_photons(photons: np.ndarray, read_variance: float = 0.0) -> np.ndarray:
    """The network's input from a frame (or a stack ``(..., H, W)``) in photons, float32.

    Each frame is normalized by its own median; non-finite pixels must have been replaced before.
    """
    p = np.asarray(photons, dtype=np.float32)
    flat = p.reshape(-1, p.shape[-2] * p.shape[-1])
    m = np.median(flat, axis=1).astype(np.float32)
    s = np.sqrt(np.maximum(m, 0.0) + np.float32(read_variance) + np.float32(1.0))
    shape = (-1,) + (1,) * 2
    out = (p.reshape(-1, *p.shape[-2:]) - m.reshape(shape)) / s.reshape(shape)
    return np.arcsinh(out).reshape(p.shape).astype(np.float32, copy=False)


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """A normalized ``image`` (last two axes H, W) padded at the bottom and right to multiples of
    ``multiple`` with zeros -- the background level of a normalized frame, which is also what the
    network's own zero padding shows it beyond every edge in training (nothing is added at the top
    left, so pixel coordinates are unchanged)."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return image
    pad = [(0, 0)] * (image.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(image, pad, mode="constant")


def heat_targets(
    x_px: np.ndarray, y_px: np.ndarray, shape: tuple[int, int], stride: int, sigma_cells: float = 0.8,
    dense_offsets: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training targets of one frame of ``shape`` (H, W) for particles at (x, y), px.

    Returns
    -------
    heat : (H/stride, W/stride) float32
        A Gaussian of ``sigma_cells`` around each particle's cell, 1 at the cell (maximum over particles).
    offset : (2, H/stride, W/stride) float32
        (x, y) of the particle minus its cell's centre, px, at particle cells (0 elsewhere).
    mask : (H/stride, W/stride) float32
        1 at particle cells (the heat map's positives; offsets and log-sigmas are trained there), 0
        elsewhere. With ``dense_offsets`` the 8 cells around a particle's cell also carry that
        particle's offset (from their own centres) and, as mask, their heat target (0.21-0.46 < 1): the
        weight of their offset loss. A cell near several particles takes the nearest one; a particle's
        own cell always keeps its particle. Decoding with ``pool`` averages exactly these predictions.
    """
    hc, wc = shape[0] // stride, shape[1] // stride
    heat = np.zeros((hc, wc), np.float32)
    offset = np.zeros((2, hc, wc), np.float32)
    mask = np.zeros((hc, wc), np.float32)
    if len(x_px) == 0:
        return heat, offset, mask
    j = np.clip(np.floor((np.asarray(x_px) + 0.5) / stride).astype(int), 0, wc - 1)
    i = np.clip(np.floor((np.asarray(y_px) + 0.5) / stride).astype(int), 0, hc - 1)
    cx = j * stride + (stride - 1) / 2.0
    cy = i * stride + (stride - 1) / 2.0
    gy = np.arange(hc)[:, None]
    gx = np.arange(wc)[None, :]
    if dense_offsets:
        best = np.zeros((hc, wc), np.float32)  # heat target of the particle each neighbour cell is given
        for k in range(len(j)):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    ii, jj = i[k] + di, j[k] + dj
                    if (di == 0 and dj == 0) or not (0 <= ii < hc and 0 <= jj < wc):
                        continue
                    g = float(np.exp(-(di * di + dj * dj) / (2.0 * sigma_cells**2)))
                    if g > best[ii, jj]:
                        best[ii, jj] = g
                        offset[0, ii, jj] = x_px[k] - (jj * stride + (stride - 1) / 2.0)
                        offset[1, ii, jj] = y_px[k] - (ii * stride + (stride - 1) / 2.0)
                        mask[ii, jj] = g
    for k in range(len(j)):
        g = np.exp(-((gy - i[k]) ** 2 + (gx - j[k]) ** 2) / (2.0 * sigma_cells**2))
        np.maximum(heat, g, out=heat)
        offset[0, i[k], j[k]] = x_px[k] - cx[k]
        offset[1, i[k], j[k]] = y_px[k] - cy[k]
        mask[i[k], j[k]] = 1.0
        heat[i[k], j[k]] = 1.0
    return heat, offset, mask


@dataclass(frozen=True)
class Decoded:
    """Detections of one frame: positions (px), confidence and uncertainty (px)."""

    x_px: np.ndarray
    y_px: np.ndarray
    confidence: np.ndarray
    uncertainty_px: np.ndarray


def decode(
    heat: np.ndarray, offset: np.ndarray, log_sigma: np.ndarray, stride: int, threshold: float,
    height_px: int | None = None, width_px: int | None = None, nms_cells: int = 3, pool: bool = False,
    sigma_scale: float = 1.0,
) -> Decoded:
    """Detections from one frame's outputs: ``heat`` (hc, wc), ``offset`` and ``log_sigma`` (2, hc, wc).

    A detection is a cell at or above ``threshold`` that is the largest in its ``nms_cells`` square
    neighbourhood. Its position is the cell centre plus the predicted offset, or with ``pool`` the
    heat-weighted mean of that over the 3 x 3 cells around it with at least half its heat. Models
    trained with dense offsets (:func:`heat_targets`) learn those neighbour predictions and pool (their
    card's ``pool_decoding``); for models trained at particle cells only pooling is an empirical
    choice: on the scanning benchmark (D = 5 um^2/s) it raised the AUC at eps = 1 px
    from 0.72 to 0.79; on widefield frames it lowered the Jaccard index. Detections whose position falls outside ``height_px`` x ``width_px``
    (the frame before padding) are dropped. ``sigma_scale`` multiplies the predicted standard errors
    (the model card's ``uncertainty_scale``, measured on the validation set).
    """
    peaks = (heat >= threshold) & (heat >= maximum_filter(heat, size=nms_cells, mode="constant", cval=0.0))
    i, j = np.nonzero(peaks)
    centre = (stride - 1) / 2.0
    if pool:
        # Every cell predicts the particle's position (its centre + its offset); the 3 x 3 cells around
        # a peak whose heat is at least half the peak's are averaged, weighted by heat.
        di, dj = (a.ravel() for a in np.mgrid[-1:2, -1:2])
        hp = np.pad(heat, 1)
        op = np.pad(offset, ((0, 0), (1, 1), (1, 1)))
        ii, jj = i[:, None] + 1 + di, j[:, None] + 1 + dj
        w = hp[ii, jj].astype(np.float64)
        w[w < 0.5 * heat[i, j][:, None]] = 0.0
        wsum = w.sum(axis=1)
        x = ((w * ((j[:, None] + dj) * stride + centre + op[0, ii, jj])).sum(axis=1) / wsum).astype(np.float64)
        y = ((w * ((i[:, None] + di) * stride + centre + op[1, ii, jj])).sum(axis=1) / wsum).astype(np.float64)
    else:
        x = j * stride + centre + offset[0, i, j].astype(np.float64)
        y = i * stride + centre + offset[1, i, j].astype(np.float64)
    sig2 = np.exp(2.0 * log_sigma[:, i, j].astype(np.float64))
    unc = sigma_scale * np.sqrt(0.5 * (sig2[0] + sig2[1]))
    conf = heat[i, j].astype(np.float64)
    keep = np.ones(x.shape, bool)
    if height_px is not None:
        keep &= (y >= -0.5) & (y < height_px - 0.5)
    if width_px is not None:
        keep &= (x >= -0.5) & (x < width_px - 0.5)
    return Decoded(x[keep], y[keep], conf[keep], unc[keep])
