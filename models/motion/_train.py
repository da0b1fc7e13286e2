"""Training, evaluation, report and export of the motion-state networks (``scopestream train motion``).

Steps: simulate (or read from the cache) a training set and a test set from disjoint seeds
(training ``seed``, test ``10**9 + seed``: never the same movies), hold out 10 % of the training
set for validation, train each asked model with Adam and a cosine schedule (image augmentation: the
8 symmetries of the square; the features are rotation-invariant), keep the epoch with the best
validation accuracy (checkpoints in ``OUT/checkpoints``), evaluate on the test set at K = 200 and
K = 50, write the report (``report.md``, ``metrics.json``, PNG curves and confusion matrices) and
export the shipped model as a model folder (``model.onnx``, ``model.pt``, ``card.json``,
``MODEL_CARD.md``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scopestream.daemon._products import MOTION_STATES
from scopestream.models._card import ModelCard, TensorSpec, sha256_file, source_commit
from scopestream.models.cli import progress_bar
from scopestream.models.motion._data import Dataset, DataSettings, concatenate, load_or_generate
from scopestream.models.motion._evaluate import (
    binned_accuracy,
    classification_figures,
    format_confusion,
    format_figures,
)
from scopestream.models.motion._inputs import FEATURE_NAMES, InputSpec

__all__ = ["MODEL_NAME", "MODEL_VERSION", "TrainSettings", "evaluate", "predict", "train_motion"]

MODEL_NAME = "motion"
MODEL_VERSION = "1.0.0"
TEST_SEED_OFFSET = 10**9
CHUNK_MOVIES = 20


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``scopestream train motion`` takes."""

    out: Path
    seed: int = 0
    movies_per_state: int = 200
    test_movies_per_state: int = 100
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    k_frames: tuple[int, int] = (200, 50)
    models: tuple[str, ...] = ("sran", "track_mlp", "fused")
    ship: str = "fused"
    channels: int = 16
    hidden: int = 64
    cache_dir: Path | None = None
    workers: int = 1
    threads: int = 2
    progress: bool = True
    command: str = ""
    spec: InputSpec = field(default_factory=InputSpec)
    data: DataSettings = field(default_factory=DataSettings)



def build_sets(settings: TrainSettings, log: Callable[[str], None] = print) -> tuple[Dataset, Dataset]:
    """The training and test sets (from the cache where they exist), in chunks of movies."""
    k_long, k_short = max(settings.k_frames), min(settings.k_frames)
    sets = []
    for name, seed, n in (("train", settings.seed, settings.movies_per_state),
                          ("test", TEST_SEED_OFFSET + settings.seed, settings.test_movies_per_state)):
        parts = []
        with progress_bar(settings.progress, total=n * len(MOTION_STATES), desc=f"simulate {name}", unit="movie") as bar:
            for first in range(0, n, CHUNK_MOVIES):
                count = min(CHUNK_MOVIES, n - first)
                parts.append(load_or_generate(
                    settings.cache_dir, name, seed=seed, movies_per_state=count, first_index=first,
                    spec=settings.spec, data=settings.data, k_long=k_long, k_short=k_short,
                    workers=settings.workers, progress=bar.update,
                ))
                bar.n = (first + count) * len(MOTION_STATES)
                bar.refresh()
        sets.append(concatenate(parts))
        log(f"{name}: {len(sets[-1])} windows from {n} movies per state (seed {seed})")
    return sets[0], sets[1]


def _to_tensors(ds: Dataset) -> tuple[Any, Any, Any]:
    import torch

    images = torch.from_numpy(ds.images.astype(np.float32)).unsqueeze(1)
    return images, torch.from_numpy(ds.features), torch.from_numpy(ds.labels)


def _augment(images: Any, generator: Any) -> Any:
    import torch

    k = int(torch.randint(0, 4, (1,), generator=generator))
    out = torch.rot90(images, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=generator)):
        out = torch.flip(out, dims=(3,))
    return out


def predict(model: Any, ds: Dataset, batch_size: int = 256) -> np.ndarray:
    """Class probabilities ``(n, 5)`` of a torch model on a dataset."""
    import torch

    images, features, _ = _to_tensors(ds)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(ds), batch_size):
            out.append(torch.softmax(model(images[i : i + batch_size], features[i : i + batch_size]), dim=1))
    return torch.cat(out).numpy() if out else np.zeros((0, len(MOTION_STATES)))


def train_one(name: str, train: Dataset, val: Dataset, settings: TrainSettings,
              log: Callable[[str], None] = print) -> tuple[Any, dict[str, list[float]]]:
    """Train model ``name``; returns the best-validation model and its curves."""
    import torch
    from torch.nn import functional as F

    from scopestream.models._registry import create_model

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = create_model(name, n_features=len(FEATURE_NAMES), channels=settings.channels, hidden=settings.hidden,
                         subpixels=settings.spec.subpixels)
    encoder = getattr(model, "encoder", None)
    if encoder is not None:
        feats = torch.from_numpy(train.features)
        encoder.set_statistics(feats.mean(dim=0), feats.std(dim=0))
    images, features, labels = _to_tensors(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(train) / settings.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch)
    curves: dict[str, list[float]] = {"train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": []}
    ckpt_dir = settings.out / "checkpoints" / name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    best_acc, best_state = -1.0, None
    uses_image = name != "track_mlp"
    with progress_bar(settings.progress, total=settings.epochs, desc=f"train {name}", unit="epoch") as bar:
        for _epoch in range(settings.epochs):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            total_loss, correct = 0.0, 0
            for i in range(0, len(train), settings.batch_size):
                idx = order[i : i + settings.batch_size]
                x = _augment(images[idx], generator) if uses_image else images[idx]
                logits = model(x, features[idx])
                loss = F.cross_entropy(logits, labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == labels[idx]).sum())
            probs = predict(model, val)
            val_loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(val)), val.labels], 1e-12, 1.0))))
            val_acc = float(np.mean(probs.argmax(1) == val.labels))
            curves["train_loss"].append(total_loss / len(train))
            curves["train_accuracy"].append(correct / len(train))
            curves["val_loss"].append(val_loss)
            curves["val_accuracy"].append(val_acc)
            torch.save(model.state_dict(), ckpt_dir / "last.pt")
            if val_acc > best_acc:
                best_acc = val_acc
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
                torch.save(best_state, ckpt_dir / "best.pt")
            bar.set_postfix(loss=f"{total_loss / len(train):.3f}", val_acc=f"{val_acc:.3f}")
            bar.update(1)
    assert best_state is not None
    model.load_state_dict(best_state)
    log(f"{name}: best validation accuracy {best_acc:.3f}")
    return model.eval(), curves


SPEED_EDGES = (0.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 500.0, 1001.0)
RADIUS_EDGES = (200.0, 300.0, 400.0, 501.0)
D_EDGES = (0.0, 0.01, 0.1, 1.0, 5.0, 26.0)


def evaluate(probs: np.ndarray, test: Dataset) -> dict[str, Any]:
    """Figures per K (all windows and live-visible ones) and accuracy per parameter bin."""
    pred = probs.argmax(1)
    out: dict[str, Any] = {}
    for k in sorted(set(test.k_frames.tolist()), reverse=True):
        sel = test.k_frames == k
        out[f"K{k}"] = classification_figures(test.labels[sel], pred[sel])
        live = sel & test.live
        out[f"K{k}_live"] = classification_figures(test.labels[live], pred[live])
        correct = pred[sel] == test.labels[sel]
        bins: dict[str, Any] = {}
        for state in MOTION_STATES:
            s = test.labels[sel] == MOTION_STATES.index(state)
            if state in ("RanW", "RCir", "Circ", "Flow"):
                bins[f"{state}_speed_nm_per_frame"] = binned_accuracy(test.speed_nm_per_frame[sel][s], correct[s], SPEED_EDGES)
            if state in ("RCir", "Circ"):
                bins[f"{state}_radius_nm"] = binned_accuracy(test.radius_nm[sel][s], correct[s], RADIUS_EDGES)
            if state in ("RanW", "RCir"):
                bins[f"{state}_D_um2_per_s"] = binned_accuracy(test.D_um2_per_s[sel][s], correct[s], D_EDGES)
        out[f"K{k}_bins"] = bins
        # "Motion exceeds the localization precision": the vesicle moves more than ~3 sigma_loc
        # (20 nm at these photon counts) per frame or circles a radius larger than it: every
        # moving sample with speed >= 20 nm/frame, plus all Stat.
        moving = (test.labels[sel] == 0) | (test.speed_nm_per_frame[sel] >= 20.0)
        out[f"K{k}_resolvable"] = classification_figures(test.labels[sel][moving], pred[sel][moving])
    return out



def _plot(curves: dict[str, dict[str, list[float]]], figures: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        axes[0].plot(c["train_loss"], label=f"{name} train")
        axes[0].plot(c["val_loss"], "--", label=f"{name} val")
        axes[1].plot(c["train_accuracy"], label=f"{name} train")
        axes[1].plot(c["val_accuracy"], "--", label=f"{name} val")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    files.append("curves.png")
    for name, fig_data in figures.items():
        for key in [k for k in fig_data if k[1:].isdigit()]:
            cm = np.array(fig_data[key]["confusion"])
            fig, ax = plt.subplots(figsize=(4.2, 4))
            ax.imshow(cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
            ax.set_xticks(range(5), MOTION_STATES)
            ax.set_yticks(range(5), MOTION_STATES)
            ax.set(xlabel="predicted", ylabel="truth", title=f"{name} {key} acc {fig_data[key]['accuracy']:.3f}")
            fig.tight_layout()
            fname = f"confusion_{name}_{key}.png"
            fig.savefig(out / fname, dpi=100)
            plt.close(fig)
            files.append(fname)
    return files


def export_model_folder(model: Any, name: str, settings: TrainSettings, folder: Path, card_extra: dict[str, Any]) -> ModelCard:
    """Write ``model.onnx``, ``model.pt``, ``card.json`` and ``MODEL_CARD.md`` into ``folder``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    side = settings.spec.image_px
    n_feat = len(FEATURE_NAMES)
    model = model.eval()
    torch.save(model.state_dict(), folder / "model.pt")

    class _WithSoftmax(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: Any, features: Any) -> Any:
            return torch.softmax(self.inner(image, features), dim=1)

    dummy = (torch.zeros(2, 1, side, side), torch.zeros(2, n_feat))
    torch.onnx.export(
        _WithSoftmax(model), dummy, str(folder / "model.onnx"), input_names=["image", "features"],
        output_names=["probabilities"], dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"},
                                                      "probabilities": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    files = {"onnx": "model.onnx", "torch": "model.pt"}
    card = ModelCard(
        name=MODEL_NAME, version=MODEL_VERSION,
        task="motion state of a vesicle track window: Stat / RanW / RCir / Circ / Flow (Sekh et al.)",
        architecture=name,
        architecture_config={"n_features": n_feat, "channels": settings.channels, "hidden": settings.hidden,
                             "subpixels": settings.spec.subpixels},
        inputs=[TensorSpec(name="image", shape=[-1, 1, side, side]), TensorSpec(name="features", shape=[-1, n_feat])],
        outputs=[TensorSpec(name="probabilities", shape=[-1, len(MOTION_STATES)])],
        classes=list(MOTION_STATES), input_spec=settings.spec.to_dict(), feature_names=list(FEATURE_NAMES),
        files=files, sha256={f: sha256_file(folder / f) for f in files.values()}, **card_extra,
    )
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return card


def _model_card_md(card: ModelCard, report_tables: str) -> str:
    t = card.training
    return f"""# Model card: {card.name} {card.version}

**Task.** {card.task}.

**Architecture.** `{card.architecture}` ({card.architecture_config}); registry name for
`scopestream.models._registry.create_model`. Inputs: {', '.join(f'`{i.name}` {i.shape}' for i in card.inputs)};
output `probabilities` over {card.classes}.

**Inputs as computed.** `scopestream.models.motion._inputs.window_inputs` with {card.input_spec}: the MUSICAL
image of the 25 px region (the live `musical` stage's code) and {len(card.feature_names)} track features
({', '.join(card.feature_names)}).

**Training.** `{t.get('command')}`; seed {t.get('seed')}; commit {t.get('commit')}; training windows
{t.get('train_windows')} (from {t.get('train_movies_per_state')} movies per state), validation
{t.get('val_windows')}, test windows {t.get('test_windows')} (seed {t.get('test_seed')}, never used in
training); time {t.get('time_s', 0):.0f} s wall ({t.get('machine')}).

**Data.** Simulated widefield movies (one vesicle, study ranges, see `scopestream.models.motion._data`),
settings {t.get('data')}.

**Test figures.**

{report_tables}

**Limits.** Trained on the default optics (100 nm pixels, NA 1.4, 510 nm), a Gaussian PSF and an
sCMOS-like camera at ~2000 photons per vesicle per frame; see the benchmark `benchmarks/bench_motion.py`
for dimmer light, other diameters, a second vesicle, the Airy PSF and EMCCD noise. Windows whose vesicle
leaves the 49 px capture box are never cut live (fast Flow / RanW).
"""


def train_motion(settings: TrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole training (see the module docstring); returns the metrics written to ``metrics.json``."""
    import torch

    torch.set_num_threads(settings.threads)
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_all, test = build_sets(settings, log)
    t_data = time.perf_counter() - t0
    rng = np.random.default_rng(settings.seed)
    is_val = rng.random(len(train_all)) < 0.1
    train, val = train_all.subset(~is_val), train_all.subset(is_val)
    curves: dict[str, dict[str, list[float]]] = {}
    figures: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    train_s: dict[str, float] = {}
    for name in settings.models:
        t1 = time.perf_counter()
        model, curves[name] = train_one(name, train, val, settings, log)
        train_s[name] = time.perf_counter() - t1
        models[name] = model
        figures[name] = evaluate(predict(model, test), test)
        log(f"{name}: test " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in figures[name].items() if k[1:].isdigit()))
    pngs = _plot(curves, figures, out)
    rows = {}
    keys = [f"K{k}{suffix}" for k in sorted(settings.k_frames, reverse=True) for suffix in ("", "_live", "_resolvable")]
    for key in keys:
        for name in settings.models:
            if key in figures[name]:
                rows[f"{name} {key}"] = figures[name][key]
    tables = format_figures(rows)
    confusions = "\n\n".join(f"**{n} {k}**\n\n{format_confusion(figures[n][k])}"
                             for n in settings.models for k in figures[n] if k[1:].isdigit())
    total_s = time.perf_counter() - t0
    metrics = {
        "figures": figures, "curves": curves, "train_s": train_s, "data_s": t_data, "total_s": total_s,
        "train_windows": len(train), "val_windows": len(val), "test_windows": len(test),
        "train_meta": train_all.meta, "test_meta": test.meta,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    bins_md = []
    for name in settings.models:
        k_long = max(settings.k_frames)
        for key, entries in figures[name][f"K{k_long}_bins"].items():
            cells = ", ".join(f"[{e['low']:g}, {e['high']:g}): {e['accuracy']:.2f} (n={e['n']})" for e in entries if e["n"])
            bins_md.append(f"- {name} K{k_long} {key}: {cells}")
    report = [
        "# Motion-state training report", "",
        f"Command: `{settings.command}`", f"Seed {settings.seed}; commit {source_commit()}; "
        f"{platform.node()} ({platform.processor() or platform.machine()}), torch threads {settings.threads}.",
        f"Data: {len(train)} training, {len(val)} validation, {len(test)} test windows; simulation+tracking "
        f"{t_data:.0f} s (cache: {settings.cache_dir}); training " + ", ".join(f"{n} {s:.0f} s" for n, s in train_s.items())
        + f"; total {total_s:.0f} s.", "",
        "## Test figures (accuracy ± binomial SE; `live`: windows the live stage would cut; `resolvable`: "
        "Stat plus motion ≥ 20 nm/frame)", "", tables, "", "## Confusion matrices (rows truth)", "", confusions, "",
        f"## Accuracy per parameter bin (K = {max(settings.k_frames)})", "", *bins_md, "",
        "## Curves (final epoch)", "",
        *[f"- {n}: train loss {c['train_loss'][-1]:.3f}, val loss {c['val_loss'][-1]:.3f}, "
          f"val accuracy {c['val_accuracy'][-1]:.3f} (best {max(c['val_accuracy']):.3f})" for n, c in curves.items()],
        "", "Figures: " + ", ".join(pngs), "",
    ]
    (out / "report.md").write_text("\n".join(report))
    if settings.ship in models:
        ship = figures[settings.ship]
        card_extra = {
            "training": {
                "command": settings.command, "seed": settings.seed, "commit": source_commit(),
                "train_movies_per_state": settings.movies_per_state, "train_windows": len(train),
                "val_windows": len(val), "test_windows": len(test), "test_seed": TEST_SEED_OFFSET + settings.seed,
                "epochs": settings.epochs, "time_s": total_s, "train_s": train_s.get(settings.ship),
                "data_s": t_data, "machine": f"{platform.node()} {sys.platform}", "data": settings.data.to_dict(),
            },
            "test": {k: {"n": v["n"], "accuracy": v["accuracy"], "f1": v["f1"]}
                     for k, v in ship.items() if not k.endswith("_bins")},
        }
        card = export_model_folder(models[settings.ship], settings.ship, settings, out / "model", card_extra)
        ship_rows = {k: v for k, v in rows.items() if k.startswith(settings.ship + " ")}
        (out / "model" / "MODEL_CARD.md").write_text(_model_card_md(card, format_figures(ship_rows)))
        log(f"model folder: {out / 'model'}")
    log(f"report: {out / 'report.md'}")
    return metrics
