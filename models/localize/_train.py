"""``scopestream train localize``: simulate, train, evaluate on held-out seeds, export a model folder.

Steps: simulate the training set (seed ``seed``), a validation set (``5 * 10**8 + seed``, for the
curves only) and a test set (``10**9 + seed``; never seen in training) with
:func:`scopestream.models.localize._data.simulate_set`; train :class:`LocNet` with the CenterNet
focal loss on the heat map and a Gaussian negative log-likelihood (plus a small squared error) on
the sub-pixel offsets at particle cells; evaluate detection (recall, precision, Jaccard at a match
radius) and localization (RMSE, and the calibration of the predicted uncertainty:
``std(error / sigma)``, 1 when calibrated) on the test set; write ``report.md``, ``metrics.json`` and
figures; export ``DIR/model`` (``model.onnx``, ``model.pt``, ``card.json``, ``MODEL_CARD.md``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from scopestream.models._card import ModelCard, TensorSpec, sha256_file, source_commit
from scopestream.models.cli import progress_bar
from scopestream.models.localize._data import (
    SCENE_RANGES,
    SNR_IGNORE,
    SNR_TARGET,
    FrameSet,
    simulate_set,
)
from scopestream.models.localize._inputs import decode
from scopestream.models.localize.locnet import INPUT_MULTIPLE_PX, STRIDE_PX

__all__ = ["MODEL_NAME", "MODEL_VERSION", "TrainSettings", "evaluate", "match", "predict", "train_localize"]

MODEL_NAME = "localize"
MODEL_VERSION = "1.0.0"
VAL_SEED_OFFSET = 5 * 10**8
TEST_SEED_OFFSET = 10**9
EXPORT_SIDE_PX = 64


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``scopestream train localize`` was asked for."""

    camera: str
    out: Path
    seed: int = 0
    train_frames: int = 16000
    val_frames: int = 500
    test_frames: int = 2000
    size_px: int = 32
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    channels: int = 10
    full_skip: bool = True
    nms_cells: int = 3
    threshold: float = 0.5
    match_radius_px: float = 1.5
    threads: int = 1
    progress: bool = True
    command: str = ""
    dense_offsets: bool = False
    pool_decoding: bool = False
    heavy_blur_fraction: float = 0.0

    @property
    def offset_scale_px(self) -> float:
        """The head's offset range: 2 strides with dense offsets (neighbour cells), else 1."""
        return float(2 * STRIDE_PX if self.dense_offsets else STRIDE_PX)




def _simulate(settings: TrainSettings, n: int, seed: int, name: str) -> FrameSet:
    # The heavy-blur weighting is for the training set only: validation and test keep the card's
    # scene ranges, so their figures compare across models.
    blur = settings.heavy_blur_fraction if name == "train" else 0.0
    with progress_bar(settings.progress, total=n, desc=f"simulate {name}", unit="frame") as bar:
        return simulate_set(settings.camera, n, seed, size_px=settings.size_px, progress=bar.update,
                            heavy_blur_fraction=blur, dense_offsets=settings.dense_offsets)


def _augment(batch: list[Any], generator: Any) -> list[Any]:
    """Widefield only: a random flip of x, of y, and a transpose (the 8 symmetries of the square).
    Offsets change sign with a flip and swap with a transpose (x' - c' = -(x - c) under x -> W-1-x)."""
    import torch

    img, heat, off, mask, weight = batch
    if torch.rand(1, generator=generator).item() < 0.5:
        img, heat, off, mask, weight = (t.flip(-1) for t in (img, heat, off, mask, weight))
        off = torch.stack([-off[:, 0], off[:, 1]], dim=1)
    if torch.rand(1, generator=generator).item() < 0.5:
        img, heat, off, mask, weight = (t.flip(-2) for t in (img, heat, off, mask, weight))
        off = torch.stack([off[:, 0], -off[:, 1]], dim=1)
    if torch.rand(1, generator=generator).item() < 0.5:
        img, heat, off, mask, weight = (t.transpose(-1, -2) for t in (img, heat, off, mask, weight))
        off = torch.stack([off[:, 1], off[:, 0]], dim=1)
    return [img.contiguous(), heat.contiguous(), off.contiguous(), mask.contiguous(), weight.contiguous()]


def losses(model: Any, img: Any, heat: Any, off: Any, mask: Any, weight: Any) -> tuple[Any, Any, Any]:
    """(total, heat loss, localization loss) of one batch."""
    import torch
    import torch.nn.functional as F

    raw = model.logits(img)
    logit = raw[:, 0]
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    # mask: 1 at particle cells (the heat map's positives), in (0, 1) at the cells around them where
    # dense offsets are trained (their offset-loss weight), 0 elsewhere.
    pos = mask >= 1
    n_pos = pos.sum().clamp(min=1)
    # CenterNet focal loss (alpha 2, beta 4), cells around ambiguous particles ignored.
    log_p = F.logsigmoid(logit)
    log_1p = F.logsigmoid(-logit)
    l_pos = -((1 - p) ** 2) * log_p * pos
    l_neg = -((1 - heat) ** 4) * (p**2) * log_1p * (~pos) * weight
    l_heat = (l_pos.sum() + l_neg.sum()) / n_pos
    pred_off = torch.tanh(raw[:, 1:3]) * float(model.offset_scale_px)
    log_sigma = torch.clamp(raw[:, 3:5], -6.0, 3.0)
    d = pred_off - off
    nll = 0.5 * (d / torch.exp(log_sigma)) ** 2 + log_sigma
    l_loc = ((nll + 0.5 * d**2).sum(dim=1) * mask).sum() / n_pos
    return l_heat + l_loc, l_heat, l_loc


def predict(model: Any, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heat, offset and log-sigma maps of normalized frames (n, H, W)."""
    import torch

    outs: list[list[np.ndarray]] = [[], [], []]
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            h, o, s = model(torch.from_numpy(images[i : i + batch_size, None]))
            for k, t in enumerate((h[:, 0], o, s)):
                outs[k].append(t.numpy())
    return np.concatenate(outs[0]), np.concatenate(outs[1]), np.concatenate(outs[2])


def match(x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of detections to truths within ``radius_px`` (Hungarian on distance);
    returns index arrays (detection, truth) of the matched pairs."""
    if len(x) == 0 or len(tx) == 0:
        return np.empty(0, int), np.empty(0, int)
    dist = np.hypot(x[:, None] - tx[None, :], y[:, None] - ty[None, :])
    cost = np.where(dist <= radius_px, dist, 1e6)
    r, c = linear_sum_assignment(cost)
    ok = dist[r, c] <= radius_px
    return r[ok], c[ok]


def evaluate(maps: tuple[np.ndarray, np.ndarray, np.ndarray], test: FrameSet, threshold: float,
             radius_px: float, nms_cells: int = 3, sigma_scale: float = 1.0, pool: bool = False) -> dict[str, Any]:
    """Detection and localization figures on a test set (see the module docstring)."""
    heat, off, logs = maps
    tp = fp = fn = 0
    errs: list[np.ndarray] = []
    sig: list[np.ndarray] = []
    snr: list[np.ndarray] = []
    found_snr: list[np.ndarray] = []
    size = test.images.shape[-1]
    for k in range(len(heat)):
        d = decode(heat[k], off[k], logs[k], STRIDE_PX, threshold, size, size, nms_cells, pool, sigma_scale=sigma_scale)
        t = test.truth[k]
        i, j = match(d.x_px, d.y_px, t[:, 0], t[:, 1], radius_px)
        tp += len(i)
        # Detections of ambiguous (faint, SNR 1.5-3) particles are neither right nor wrong: the
        # truth holds targets only, so unmatched detections count as false positives (conservative).
        fp += len(d.x_px) - len(i)
        fn += len(t) - len(j)
        errs.append(np.column_stack([d.x_px[i] - t[j, 0], d.y_px[i] - t[j, 1]]))
        sig.append(d.uncertainty_px[i])
        snr.append(t[j, 4])
        found = np.zeros(len(t), bool)
        found[j] = True
        found_snr.append(np.column_stack([t[:, 4], found]))
    e = np.concatenate(errs) if errs else np.empty((0, 2))
    s = np.concatenate(sig) if sig else np.empty(0)
    sn = np.concatenate(snr) if snr else np.empty(0)
    fs = np.concatenate(found_snr) if found_snr else np.empty((0, 2))
    n_true = tp + fn
    out: dict[str, Any] = {
        "frames": len(heat), "truths": n_true, "detections": tp + fp, "tp": tp, "fp": fp, "fn": fn,
        "recall": tp / max(n_true, 1), "precision": tp / max(tp + fp, 1), "jaccard": tp / max(tp + fp + fn, 1),
        "rmse_px": float(np.sqrt(np.mean(e**2))) if e.size else float("nan"),
        "bias_px": [float(v) for v in e.mean(axis=0)] if e.size else [float("nan")] * 2,
        "calibration_std_z": float(np.std(e / s[:, None])) if e.size else float("nan"),
        "threshold": threshold, "match_radius_px": radius_px,
    }
    bins = []
    for lo, hi in ((3, 5), (5, 10), (10, 20), (20, 40), (40, 1e9)):
        sel = (sn >= lo) & (sn < hi)
        fsel = (fs[:, 0] >= lo) & (fs[:, 0] < hi)
        bins.append({
            "snr_low": lo, "snr_high": hi, "n": int(fsel.sum()),
            "recall": float(fs[fsel, 1].mean()) if fsel.any() else float("nan"),
            "rmse_px": float(np.sqrt(np.mean(e[sel] ** 2))) if sel.any() else float("nan"),
            "mean_sigma_px": float(np.sqrt(np.mean(s[sel] ** 2))) if sel.any() else float("nan"),
        })
    out["by_snr"] = bins
    out["_errors"] = e
    out["_sigma"] = s
    return out


def _plot(curves: dict[str, list[float]], fig: dict[str, Any], test: FrameSet, maps: Any, settings: TrainSettings,
          out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    f, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for key in ("train_loss", "val_loss"):
        ax[0].plot(curves[key], label=key)
    ax[0].set(xlabel="epoch", ylabel="loss", title="loss (focal + localization NLL)")
    ax[0].legend()
    ax[1].plot(curves["val_recall"], label="recall")
    ax[1].plot(curves["val_precision"], label="precision")
    ax[1].set(xlabel="epoch", ylim=(0, 1.02), title=f"validation (threshold {settings.threshold})")
    ax[1].legend()
    ax[2].plot(curves["val_rmse_px"])
    ax[2].set(xlabel="epoch", ylabel="px", title="validation RMSE per axis")
    f.tight_layout()
    f.savefig(out / "curves.png", dpi=90)
    plt.close(f)
    files.append("curves.png")
    e, s = fig["_errors"], fig["_sigma"]
    if e.size:
        f, ax = plt.subplots(1, 2, figsize=(9, 3.8))
        edges = np.quantile(s, np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, 9)
        pred = [np.sqrt(np.mean(s[idx == b] ** 2)) for b in range(10) if (idx == b).any()]
        meas = [np.sqrt(np.mean(e[idx == b] ** 2)) for b in range(10) if (idx == b).any()]
        ax[0].loglog(pred, meas, "o-")
        lim = [min(pred + meas), max(pred + meas)]
        ax[0].loglog(lim, lim, "k--", lw=0.8)
        ax[0].set(xlabel="predicted sigma, px", ylabel="measured RMSE per axis, px", title="uncertainty calibration (test)")
        bins = [b for b in fig["by_snr"] if b["n"]]
        ax[1].plot([f"{b['snr_low']:g}-{b['snr_high']:g}" for b in bins], [b["recall"] for b in bins], "o-")
        ax[1].set(xlabel="aperture SNR", ylabel="recall", ylim=(0, 1.02), title="recall by SNR (test)")
        f.tight_layout()
        f.savefig(out / "calibration.png", dpi=90)
        plt.close(f)
        files.append("calibration.png")
    f, axes = plt.subplots(2, 4, figsize=(12, 6.4), squeeze=False)
    heat, off, logs = maps
    size = test.images.shape[-1]
    for a, k in zip(axes.ravel(), range(8), strict=False):
        a.imshow(test.images[k], cmap="gray")
        t = test.truth[k]
        d = decode(heat[k], off[k], logs[k], STRIDE_PX, settings.threshold, size, size, settings.nms_cells,
                   settings.pool_decoding)
        a.plot(t[:, 0], t[:, 1], "o", mfc="none", mec="lime", ms=9)
        a.plot(d.x_px, d.y_px, "r+", ms=9)
        a.set_axis_off()
    f.suptitle(f"{settings.camera}: test frames (normalized); green o truth, red + network")
    f.tight_layout()
    f.savefig(out / "examples.png", dpi=90)
    plt.close(f)
    files.append("examples.png")
    return files


def export_model_folder(model: Any, settings: TrainSettings, folder: Path, card_extra: dict[str, Any]) -> ModelCard:
    """Write ``model.onnx`` (dynamic batch, height and width), ``model.pt`` and ``card.json``
    (``card_extra``: the card's ``training`` and ``test`` entries and the ``uncertainty_scale``)."""
    import torch

    card_extra = dict(card_extra)
    sigma_scale = float(card_extra.pop("uncertainty_scale", 1.0))
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    torch.save(model.state_dict(), folder / "model.pt")
    side = EXPORT_SIDE_PX
    torch.onnx.export(
        model, (torch.zeros(1, 1, side, side),), str(folder / "model.onnx"), input_names=["image"],
        output_names=["heat", "offset", "log_sigma"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "heat": {0: "batch", 2: "hc", 3: "wc"},
                      "offset": {0: "batch", 2: "hc", 3: "wc"}, "log_sigma": {0: "batch", 2: "hc", 3: "wc"}},
        opset_version=17, dynamo=False,
    )
    files = {"onnx": "model.onnx", "torch": "model.pt"}
    c = side // STRIDE_PX
    card = ModelCard(
        name=MODEL_NAME, version=MODEL_VERSION,
        task=f"detection and sub-pixel localization of particles in {settings.camera} frames, with a confidence and an uncertainty",
        architecture="locnet", architecture_config={"channels": settings.channels, "full_skip": settings.full_skip,
                             **({"offset_scale_px": settings.offset_scale_px} if settings.dense_offsets else {})},
        inputs=[TensorSpec(name="image", shape=[-1, 1, side, side])],
        outputs=[TensorSpec(name="heat", shape=[-1, 1, c, c]), TensorSpec(name="offset", shape=[-1, 2, c, c]),
                 TensorSpec(name="log_sigma", shape=[-1, 2, c, c])],
        input_spec={
            "camera": settings.camera, "normalization": "asinh((photons - median) / sqrt(max(median, 0) + read_variance + 1))",
            "stride_px": STRIDE_PX, "input_multiple_px": INPUT_MULTIPLE_PX, "dynamic_height_width": True,
            "threshold": settings.threshold, "nms_cells": settings.nms_cells, "uncertainty_scale": sigma_scale,
            "pool_decoding": settings.pool_decoding, "dense_offsets": settings.dense_offsets,
            "heavy_blur_fraction_train": settings.heavy_blur_fraction,
            "pixel_size_nm": 100.0, "scene_ranges": SCENE_RANGES[settings.camera],
            "snr_target": SNR_TARGET, "snr_ignore": SNR_IGNORE,
        },
        files=files, sha256={f: sha256_file(folder / f) for f in files.values()}, **card_extra,
    )
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return card


def _figures_md(fig: dict[str, Any]) -> str:
    lines = [
        f"- frames {fig['frames']}, particles {fig['truths']}; recall {fig['recall']:.3f}, precision "
        f"{fig['precision']:.3f}, Jaccard {fig['jaccard']:.3f} (threshold {fig['threshold']}, match within "
        f"{fig['match_radius_px']} px)",
        f"- RMSE per axis {fig['rmse_px']:.3f} px, bias x {fig['bias_px'][0]:+.3f} y {fig['bias_px'][1]:+.3f} px; "
        f"std(error / predicted sigma) {fig['calibration_std_z']:.2f} (1 = calibrated; sigma scaled by the validation "
        "set's figure, the card's uncertainty_scale)",
        "", "| aperture SNR | particles | recall | RMSE px | predicted sigma px |", "|---|---|---|---|---|",
    ]
    for b in fig["by_snr"]:
        if b["n"]:
            lines.append(f"| {b['snr_low']:g}-{b['snr_high']:g} | {b['n']} | {b['recall']:.3f} | {b['rmse_px']:.3f} | "
                         f"{b['mean_sigma_px']:.3f} |")
    return "\n".join(lines)


def _training_mix_md(spec: dict[str, Any]) -> str:
    parts = []
    f = float(spec.get("heavy_blur_fraction_train", 0.0))
    if f > 0:
        parts.append(f" Training set only (validation and test keep the ranges above): {f:.0%} of the scenes draw Dc "
                     "log-uniform from [1.5, 10] um^2/s (heavy scan blur) instead.")
    if spec.get("dense_offsets"):
        parts.append(" Offsets (and log-sigmas) are trained at each particle's cell and the 8 cells around it (weighted by "
                     "their heat target), so the decoder pools them.")
    return "".join(parts)


def _model_card_md(card: ModelCard, figures_md: str, figure_files: list[str]) -> str:
    t = card.training
    return f"""# Model card: {card.name} {card.version} ({card.input_spec.get('camera')} camera)

**Task.** {card.task}.

**Architecture.** `{card.architecture}` ({card.architecture_config}; {t.get('parameters')} parameters), fully
convolutional: any frame whose height and width are multiples of {card.input_spec['input_multiple_px']} (the stage
pads other frames at the bottom and right). Input `image` (exported at {card.inputs[0].shape}, dynamic batch, height,
width); outputs `heat` (confidence per 2 x 2 px cell), `offset` (x, y from the cell centre, px) and `log_sigma`
(log standard error of x and y, px). Decoding: maxima of `heat` over {card.input_spec['nms_cells']} x {card.input_spec['nms_cells']}
cells at or above {card.input_spec['threshold']}{'; position pooled over the 3 x 3 cells around the peak (offsets trained densely there)' if card.input_spec.get('pool_decoding') else ''}.

**Input.** {card.input_spec['normalization']} (`scopestream.models.localize._inputs.normalize_photons`).

**Training.** `{t.get('command')}`; seed {t.get('seed')}; commit {t.get('commit')}; {t.get('train_frames')} training
frames of {t.get('size_px')} x {t.get('size_px')} px, {t.get('epochs')} epochs; validation seed {t.get('val_seed')}; test
seed {t.get('test_seed')} ({t.get('test_frames')} frames, never used in training); time {t.get('time_s', 0):.0f} s wall
({t.get('train_s', 0):.0f} s training, {t.get('data_s', 0):.0f} s simulation; {t.get('machine')}, torch threads {t.get('threads')}).

**Data.** `scopestream.sim_camera` {card.input_spec['camera']} simulator, exact truth (scanning: the photon-weighted
trajectory centroid over the beam's time on the particle). Scenes: {card.input_spec['scene_ranges']}.{_training_mix_md(card.input_spec)} Targets: particles
with aperture SNR >= {card.input_spec['snr_target']}; cells around particles with SNR in [{card.input_spec['snr_ignore']},
{card.input_spec['snr_target']}) are ignored by the loss.

**Test figures (held-out seeds).**

{figures_md}

Figures: {', '.join(figure_files)} (in the training output folder).

**Limits.** Trained at 100 nm pixels on the default camera model (sCMOS-like, offset 100 ADU, 0.5 e-/ADU, read
noise 1.5 e-) over the scene ranges above; other PSF widths or EMCCD noise are outside its training. TensorRT serving
is implemented (`models/_backends.py`) but has not been run: no GPU was available.
"""


def train_localize(settings: TrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole training (see the module docstring); returns the metrics written to ``metrics.json``."""
    import torch

    from scopestream.models._registry import create_model

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    commit = source_commit()  # before training: the code that trains, not later edits
    t0 = time.perf_counter()
    train = _simulate(settings, settings.train_frames, settings.seed, "train")
    val = _simulate(settings, settings.val_frames, VAL_SEED_OFFSET + settings.seed, "validation")
    test = _simulate(settings, settings.test_frames, TEST_SEED_OFFSET + settings.seed, "test")
    t_data = time.perf_counter() - t0
    model = create_model("locnet", channels=settings.channels, full_skip=settings.full_skip,
                         offset_scale_px=settings.offset_scale_px)
    n_params = sum(p.numel() for p in model.parameters())
    tensors = [torch.from_numpy(a) for a in (train.images[:, None], train.heat, train.offset, train.mask, train.weight)]
    vt = [torch.from_numpy(a) for a in (val.images[:, None], val.heat, val.offset, val.mask, val.weight)]
    steps_per_epoch = math.ceil(len(train.images) / settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(settings.seed)
    curves: dict[str, list[float]] = {k: [] for k in ("train_loss", "val_loss", "val_recall", "val_precision", "val_rmse_px")}
    t1 = time.perf_counter()
    with progress_bar(settings.progress, total=settings.epochs, desc=f"train localize {settings.camera}", unit="epoch") as bar:
        for _epoch in range(settings.epochs):
            model.train()
            perm = torch.randperm(len(train.images), generator=gen)
            total = 0.0
            for b in range(steps_per_epoch):
                idx = perm[b * settings.batch_size : (b + 1) * settings.batch_size]
                batch = [t[idx] for t in tensors]
                if settings.camera == "widefield":
                    batch = _augment(batch, gen)
                loss, _, _ = losses(model, *batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            model.eval()
            with torch.inference_mode():
                vloss = float(losses(model, *vt)[0])
            vfig = evaluate(predict(model, val.images), val, settings.threshold, settings.match_radius_px, settings.nms_cells,
                            pool=settings.pool_decoding)
            curves["train_loss"].append(total / len(train.images))
            curves["val_loss"].append(vloss)
            curves["val_recall"].append(vfig["recall"])
            curves["val_precision"].append(vfig["precision"])
            curves["val_rmse_px"].append(vfig["rmse_px"])
            bar.set_postfix(loss=f"{curves['train_loss'][-1]:.3f}", val=f"{vloss:.3f}", rec=f"{vfig['recall']:.3f}",
                            prec=f"{vfig['precision']:.3f}", rmse=f"{vfig['rmse_px']:.3f}")
            bar.update(1)
    train_s = time.perf_counter() - t1
    # Calibration of the predicted uncertainty on the validation set (not the test set, which checks it).
    vfig = evaluate(predict(model, val.images), val, settings.threshold, settings.match_radius_px, settings.nms_cells,
                            pool=settings.pool_decoding)
    sigma_scale = float(vfig["calibration_std_z"]) if np.isfinite(vfig["calibration_std_z"]) else 1.0
    maps = predict(model, test.images)
    fig = evaluate(maps, test, settings.threshold, settings.match_radius_px, settings.nms_cells, sigma_scale,
                   settings.pool_decoding)
    pngs = _plot(curves, fig, test, maps, settings, out)
    total_s = time.perf_counter() - t0
    public = {k: v for k, v in fig.items() if not k.startswith("_")}
    metrics = {"test": public, "curves": curves, "train_s": train_s, "data_s": t_data, "total_s": total_s,
               "parameters": n_params, "commit": commit}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    figures_md = _figures_md(fig)
    report = [
        f"# Localization network training report ({settings.camera} camera)", "",
        f"Command: `{settings.command}`", "",
        f"Seed {settings.seed}; commit {commit}; {platform.node()} ({platform.machine()}), torch threads {settings.threads}; "
        f"{n_params} parameters.",
        f"Data: {settings.train_frames} training frames (seed {settings.seed}), {settings.val_frames} validation "
        f"(seed {VAL_SEED_OFFSET + settings.seed}), {settings.test_frames} test frames (seed {TEST_SEED_OFFSET + settings.seed}, "
        f"never used in training), {settings.size_px} x {settings.size_px} px; simulation {t_data:.0f} s, training "
        f"{train_s:.0f} s, total {total_s:.0f} s.", "",
        "## Test figures", "", figures_md, "",
        "## Curves", "", *[f"- {k}: " + ", ".join(f"{v:.3f}" for v in vals) for k, vals in curves.items()], "",
        "Figures: " + ", ".join(pngs), "",
    ]
    (out / "report.md").write_text("\n".join(report))
    card_extra = {
        "training": {
            "command": settings.command, "seed": settings.seed, "commit": commit, "train_frames": settings.train_frames,
            "size_px": settings.size_px, "epochs": settings.epochs, "val_seed": VAL_SEED_OFFSET + settings.seed,
            "test_seed": TEST_SEED_OFFSET + settings.seed, "test_frames": settings.test_frames, "time_s": total_s,
            "train_s": train_s, "data_s": t_data, "threads": settings.threads, "parameters": n_params,
            "machine": f"{platform.node()} {sys.platform}", "batch_size": settings.batch_size, "lr": settings.lr,
            "dense_offsets": settings.dense_offsets, "heavy_blur_fraction": settings.heavy_blur_fraction,
        },
        "test": public,
    }
    card = export_model_folder(model, settings, out / "model", {**card_extra, "uncertainty_scale": sigma_scale})
    (out / "model" / "MODEL_CARD.md").write_text(_model_card_md(card, figures_md, pngs))
    log(f"model folder: {out / 'model'}")
    log(f"report: {out / 'report.md'}")
    return metrics
