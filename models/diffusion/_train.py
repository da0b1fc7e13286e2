"""Training, evaluation, report and export of the diffusion network (``scopestream train diffusion``).

Steps: render a training set (seed ``seed``) and a test set (seed ``10**9 + seed``: never the same
stacks) with :mod:`scopestream.models.diffusion._data`, hold out 10 % of the training set for
validation, train :class:`~scopestream.models.diffusion.stack_cnn.StackCNN` with AdamW, a one-cycle
schedule and the Gaussian NLL on log D (augmentation: the 8 symmetries of the square, drawn per
batch; inference averages the 4 rotations), keep the epoch with the best validation NLL
(checkpoints in ``OUT/checkpoints``), evaluate on the test set (RMSE of log D per blur and per D
bin, calibration of the predicted variance), write the report (``report.md``, ``metrics.json``,
PNG figures) and export the model folder ``OUT/model`` (``model.onnx``, ``model.pt``,
``card.json``, ``MODEL_CARD.md``).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.models._card import ModelCard, TensorSpec, sha256_file, source_commit
from scopestream.models.cli import progress_bar
from scopestream.models.diffusion._data import BLURS, DataSettings, StackSet, generate
from scopestream.models.diffusion._inputs import StackSpec, stack_input

__all__ = ["MODEL_NAME", "MODEL_VERSION", "TrainSettings", "evaluate", "predict", "train_diffusion"]

MODEL_NAME = "diffusion"
MODEL_VERSION = "1.0.0"
TEST_SEED_OFFSET = 10**9
D_BIN_EDGES = tuple(float(v) for v in np.log(np.logspace(-3, 0, 7)))


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``scopestream train diffusion`` takes."""

    out: Path
    seed: int = 0
    train_mosaics: int = 100
    test_mosaics: int = 32
    epochs: int = 18
    batch_size: int = 128
    lr: float = 3e-3
    channels: int = 16
    hidden: int = 64
    threads: int = 1
    progress: bool = True
    command: str = ""
    spec: StackSpec = field(default_factory=StackSpec)
    data: DataSettings = field(default_factory=DataSettings)



def predict(model: Any, stacks: np.ndarray, blur: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of log D (px²/frame) of a torch model (rotation-averaged when it does)."""
    import torch

    model.eval()
    mus, vs = [], []
    with torch.inference_mode():
        for i in range(0, len(stacks), batch_size):
            x = torch.from_numpy(stack_input(stacks[i : i + batch_size]))
            b = torch.from_numpy(np.asarray(blur[i : i + batch_size], dtype=np.float32)[:, None])
            mu, lv = model(x, b)
            mus.append(mu[:, 0].numpy())
            vs.append(np.exp(lv[:, 0].numpy()))
    if not mus:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(mus).astype(np.float64), np.concatenate(vs).astype(np.float64)


def evaluate(mu: np.ndarray, var: np.ndarray, ds: StackSet) -> dict[str, Any]:
    """RMSE of log D, bias, calibration (mean z², 95 % coverage) per blur, overall and per D bin."""
    out: dict[str, Any] = {}
    err = mu - ds.log_D
    z2 = err**2 / var
    for blur in BLURS:
        sel = np.isclose(ds.blur, blur)
        key = f"R={blur:.3f}"
        e, zz = err[sel], z2[sel]
        rows = []
        for lo, hi in zip(D_BIN_EDGES[:-1], D_BIN_EDGES[1:], strict=True):
            b = (ds.log_D[sel] >= lo) & (ds.log_D[sel] < hi)
            rows.append({"D_low": math.exp(lo), "D_high": math.exp(hi), "n": int(b.sum()),
                         "rmse_logD": float(np.sqrt(np.mean(e[b] ** 2))) if b.any() else float("nan"),
                         "bias_logD": float(np.mean(e[b])) if b.any() else float("nan"),
                         "mean_z2": float(np.mean(zz[b])) if b.any() else float("nan")})
        out[key] = {"n": int(sel.sum()), "rmse_logD": float(np.sqrt(np.mean(e**2))), "bias_logD": float(np.mean(e)),
                    "mean_z2": float(np.mean(zz)), "coverage95": float(np.mean(zz <= 1.96**2)), "bins": rows}
    out["all"] = {"n": int(len(ds)), "rmse_logD": float(np.sqrt(np.mean(err**2))), "mean_z2": float(np.mean(z2)),
                  "coverage95": float(np.mean(z2 <= 1.96**2))}
    return out


def _augment(x: Any, generator: Any) -> Any:
    import torch

    k = int(torch.randint(0, 4, (1,), generator=generator))
    out = torch.rot90(x, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=generator)):
        out = torch.flip(out, dims=(3,))
    return out


def train_model(train: StackSet, val: StackSet, settings: TrainSettings,
                log: Callable[[str], None] = print) -> tuple[Any, dict[str, list[float]]]:
    """Train the network; returns the best-validation model and its curves."""
    import torch

    from scopestream.models._registry import create_model
    from scopestream.models.diffusion.stack_cnn import gaussian_nll

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = create_model("stack_cnn", frames=settings.spec.frames, channels=settings.channels, hidden=settings.hidden)
    x_all = torch.from_numpy(stack_input(train.pixels))
    b_all = torch.from_numpy(train.blur.astype(np.float32)[:, None])
    y_all = torch.from_numpy(train.log_D.astype(np.float32)[:, None])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps = max(1, math.ceil(len(train) / settings.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps)
    curves: dict[str, list[float]] = {"train_nll": [], "val_nll": [], "val_rmse_logD": []}
    ckpt = settings.out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    best, best_state = math.inf, None
    with progress_bar(settings.progress, total=settings.epochs, desc="train stack_cnn", unit="epoch") as bar:
        for _epoch in range(settings.epochs):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            total = 0.0
            for i in range(0, len(train), settings.batch_size):
                idx = order[i : i + settings.batch_size]
                mu, lv = model.forward_single(_augment(x_all[idx], generator), b_all[idx])
                loss = gaussian_nll(mu, lv, y_all[idx])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(idx)
            mu_v, var_v = predict(model, val.pixels, val.blur)
            val_nll = float(np.mean(0.5 * (np.log(var_v) + (mu_v - val.log_D) ** 2 / var_v)))
            rmse = float(np.sqrt(np.mean((mu_v - val.log_D) ** 2)))
            curves["train_nll"].append(total / len(train))
            curves["val_nll"].append(val_nll)
            curves["val_rmse_logD"].append(rmse)
            torch.save(model.state_dict(), ckpt / "last.pt")
            if val_nll < best:
                best = val_nll
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
                torch.save(best_state, ckpt / "best.pt")
            bar.set_postfix(nll=f"{total / len(train):.3f}", val_nll=f"{val_nll:.3f}", val_rmse=f"{rmse:.3f}")
            bar.update(1)
    assert best_state is not None
    model.load_state_dict(best_state)
    log(f"stack_cnn: best validation NLL {best:.3f}")
    return model.eval(), curves


def _plot(curves: dict[str, list[float]], mu: np.ndarray, test: StackSet, figures: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(curves["train_nll"], label="train NLL")
    ax[0].plot(curves["val_nll"], "--", label="validation NLL")
    ax[0].set(xlabel="epoch", ylabel="Gaussian NLL", title="loss")
    ax[0].legend()
    ax[1].plot(curves["val_rmse_logD"])
    ax[1].set(xlabel="epoch", ylabel="RMSE of ln D", title="validation RMSE")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for a, blur in zip(axes[:2], BLURS, strict=True):
        sel = np.isclose(test.blur, blur)
        a.plot(test.log_D[sel] / np.log(10), mu[sel] / np.log(10), ",", alpha=0.5)
        a.plot([-3, 0], [-3, 0], "k--", lw=0.8)
        a.set(xlabel="true log10 D (px²/frame)", ylabel="predicted log10 D", title=f"test, R = {blur:.3f}")
    for blur in BLURS:
        rows = figures[f"R={blur:.3f}"]["bins"]
        centres = [math.sqrt(r["D_low"] * r["D_high"]) for r in rows]
        axes[2].semilogx(centres, [r["rmse_logD"] for r in rows], "o-", label=f"R = {blur:.3f}")
    axes[2].set(xlabel="D (px²/frame)", ylabel="RMSE of ln D", title="test RMSE per D bin")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "test.png", dpi=100)
    plt.close(fig)
    return ["curves.png", "test.png"]


def export_model_folder(model: Any, settings: TrainSettings, folder: Path, card_extra: dict[str, Any]) -> ModelCard:
    """Write ``model.onnx`` (rotation-averaged), ``model.pt``, ``card.json`` into ``folder``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    t, s = settings.spec.frames, settings.spec.region_px
    model = model.eval()
    torch.save(model.state_dict(), folder / "model.pt")
    dummy = (torch.zeros(2, t, s, s), torch.zeros(2, 1))
    torch.onnx.export(
        model, dummy, str(folder / "model.onnx"), input_names=["stack", "blur"], output_names=["log_D", "log_var"],
        dynamic_axes={"stack": {0: "batch"}, "blur": {0: "batch"}, "log_D": {0: "batch"}, "log_var": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    files = {"onnx": "model.onnx", "torch": "model.pt"}
    card = ModelCard(
        name=MODEL_NAME, version=MODEL_VERSION,
        task="natural log of the diffusion coefficient D (px²/frame) and its variance from a short image stack around a track",
        architecture="stack_cnn",
        architecture_config={"frames": t, "channels": settings.channels, "hidden": settings.hidden, "rotations": 4},
        inputs=[TensorSpec(name="stack", shape=[-1, t, s, s]), TensorSpec(name="blur", shape=[-1, 1])],
        outputs=[TensorSpec(name="log_D", shape=[-1, 1]), TensorSpec(name="log_var", shape=[-1, 1])],
        input_spec=settings.spec.to_dict(), files=files,
        sha256={f: sha256_file(folder / f) for f in files.values()}, **card_extra,
    )
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return card


def _table(figures: dict[str, Any]) -> str:
    lines = ["| R | D bin (px²/frame) | n | RMSE ln D | bias ln D | mean z² |", "|---|---|---|---|---|---|"]
    for blur in BLURS:
        f = figures[f"R={blur:.3f}"]
        for r in f["bins"]:
            lines.append(f"| {blur:.3f} | [{r['D_low']:.3g}, {r['D_high']:.3g}) | {r['n']} | {r['rmse_logD']:.3f} | "
                         f"{r['bias_logD']:+.3f} | {r['mean_z2']:.2f} |")
        lines.append(f"| {blur:.3f} | all | {f['n']} | {f['rmse_logD']:.3f} | {f['bias_logD']:+.3f} | {f['mean_z2']:.2f} "
                     f"(95 % coverage {f['coverage95']:.3f}) |")
    return "\n".join(lines)


def _model_card_md(card: ModelCard, table: str, pngs: list[str]) -> str:
    t = card.training
    return f"""# Model card: {card.name} {card.version}

**Task.** {card.task}.

**Architecture.** `{card.architecture}` ({card.architecture_config}); registry name for
`scopestream.models._registry.create_model`. Inputs: {', '.join(f'`{i.name}` {i.shape}' for i in card.inputs)};
outputs `log_D` (mean of ln D, D in px²/frame) and `log_var` (ln of its variance), both averaged over the
four 90° rotations of the stack inside the exported network.

**Inputs as computed.** `scopestream.models.diffusion._inputs.stack_input` (background = window median
subtracted, divided by the mean per-frame peak) of the {card.input_spec.get('frames')}-frame,
{card.input_spec.get('region_px')} px window centred on the mean of the track's positions; `blur` = R
(exposure / (6 frame interval) for continuous exposure, 0 stroboscopic). Spec: {card.input_spec}.

**Training.** `{t.get('command')}`; seed {t.get('seed')}; commit {t.get('commit')}; {t.get('train_stacks')}
training, {t.get('val_stacks')} validation stacks; test {t.get('test_stacks')} stacks from seed
{t.get('test_seed')} (never used in training); {t.get('epochs')} epochs; time {t.get('time_s', 0):.0f} s wall
(data {t.get('data_s', 0):.0f} s, training {t.get('train_s', 0):.0f} s; {t.get('machine')}, {t.get('threads')} torch thread(s)).

**Data.** The widefield simulator (`scopestream.sim_camera`, point emitters, Gaussian PSF, sCMOS noise),
mosaics of 8 × 8 particles in 32 px cells, D log-uniform, R = 1/6 (16 instants per exposure) and R = 0
(one instant) alternating; settings {t.get('data')}. See `scopestream.models.diffusion._data`.

**Test figures** (RMSE and bias of ln D; mean z² = mean of (error² / predicted variance), 1 when calibrated).

{table}

Figures: {', '.join(pngs)} (beside this card: training curves; predicted against true ln D and RMSE per D bin on the test set).

**Limits.** One PSF width (σ = {card.input_spec.get('psf_sigma_px')} px), 100 nm pixels, 10 ms frames,
300–3000 photons, D from 1e-3 to 1 px²/frame; outside those (brighter, larger D, other optics) it
extrapolates. Near the ends of the trained D range the prediction is pulled inward (it has learned the
range: bias of ln D about +0.2 in the lowest bin, -0.07 in the highest). Pure Brownian motion only; a
neighbour inside the window is not in the training data.
"""


def train_diffusion(settings: TrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole training (module docstring); returns the metrics written to ``metrics.json``."""
    import torch

    torch.set_num_threads(settings.threads)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sets = []
    for name, seed, n in (("train", settings.seed, settings.train_mosaics),
                          ("test", TEST_SEED_OFFSET + settings.seed, settings.test_mosaics)):
        with progress_bar(settings.progress, total=n, desc=f"simulate {name}", unit="mosaic") as bar:
            sets.append(generate(seed, n, settings.spec, settings.data, progress=bar.update))
        log(f"{name}: {len(sets[-1])} stacks from {n} mosaics (seed {seed})")
    train_all, test = sets
    t_data = time.perf_counter() - t0
    rng = np.random.default_rng(settings.seed)
    is_val = rng.random(len(train_all)) < 0.1
    pick = lambda ds, m: StackSet(ds.pixels[m], ds.blur[m], ds.log_D[m], ds.photons[m], ds.xy[m])  # noqa: E731
    train, val = pick(train_all, ~is_val), pick(train_all, is_val)
    del train_all
    t1 = time.perf_counter()
    model, curves = train_model(train, val, settings, log)
    train_s = time.perf_counter() - t1
    mu, var = predict(model, test.pixels, test.blur)
    figures = evaluate(mu, var, test)
    log("test: " + ", ".join(f"{k} RMSE ln D {v['rmse_logD']:.3f}" for k, v in figures.items()))
    pngs = _plot(curves, mu, test, figures, out)
    total_s = time.perf_counter() - t0
    table = _table(figures)
    metrics = {"figures": figures, "curves": curves, "train_s": train_s, "data_s": t_data, "total_s": total_s,
               "train_stacks": len(train), "val_stacks": len(val), "test_stacks": len(test)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    report = [
        "# Diffusion network training report", "", f"Command: `{settings.command}`",
        f"Seed {settings.seed}; commit {source_commit()}; {platform.node()} ({platform.machine()}), torch threads {settings.threads}.",
        f"Data: {len(train)} training, {len(val)} validation, {len(test)} test stacks (test seed "
        f"{TEST_SEED_OFFSET + settings.seed}); simulation {t_data:.0f} s; training {train_s:.0f} s; total {total_s:.0f} s.", "",
        "## Test figures", "", table, "",
        f"Curves (final epoch): train NLL {curves['train_nll'][-1]:.3f}, validation NLL {curves['val_nll'][-1]:.3f}, "
        f"validation RMSE ln D {curves['val_rmse_logD'][-1]:.3f}.", "", "Figures: " + ", ".join(pngs), "",
    ]
    (out / "report.md").write_text("\n".join(report))
    card_extra = {
        "training": {
            "command": settings.command, "seed": settings.seed, "commit": source_commit(), "train_stacks": len(train),
            "val_stacks": len(val), "test_stacks": len(test), "test_seed": TEST_SEED_OFFSET + settings.seed,
            "epochs": settings.epochs, "time_s": total_s, "train_s": train_s, "data_s": t_data,
            "threads": settings.threads, "machine": f"{platform.node()} {sys.platform}", "data": settings.data.to_dict(),
            "figures": pngs,
        },
        "test": {k: {kk: vv for kk, vv in v.items() if kk != "bins"} for k, v in figures.items()},
    }
    card = export_model_folder(model, settings, out / "model", card_extra)
    for png in pngs:
        shutil.copyfile(out / png, out / "model" / png)
    (out / "model" / "MODEL_CARD.md").write_text(_model_card_md(card, table, pngs))
    log(f"model folder: {out / 'model'}")
    log(f"report: {out / 'report.md'}")
    return metrics
