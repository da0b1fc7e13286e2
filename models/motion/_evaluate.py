"""Figures of a motion-state classifier on a labelled set: accuracy, per-class F1, confusion
matrix, accuracy per parameter bin. numpy only (the benchmark and the tests use it too)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from scopestream.daemon._products import MOTION_STATES

__all__ = ["binned_accuracy", "classification_figures", "format_confusion", "format_figures"]


def classification_figures(labels: np.ndarray, predicted: np.ndarray, states: Sequence[str] = MOTION_STATES) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix (rows: truth)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    n = len(states)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(axis=0), out=np.zeros(n), where=confusion.sum(axis=0) > 0)
    recall = np.divide(tp, confusion.sum(axis=1), out=np.zeros(n), where=confusion.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
    total = int(labels.size)
    acc = float(tp.sum() / total) if total else float("nan")
    return {
        "n": total,
        "accuracy": acc,
        "accuracy_se": float(np.sqrt(acc * (1 - acc) / total)) if total else float("nan"),
        "f1": {s: float(v) for s, v in zip(states, f1, strict=True)},
        "precision": {s: float(v) for s, v in zip(states, precision, strict=True)},
        "recall": {s: float(v) for s, v in zip(states, recall, strict=True)},
        "confusion": confusion.tolist(),
        "states": list(states),
    }


def binned_accuracy(values: np.ndarray, correct: np.ndarray, edges: Sequence[float]) -> list[dict[str, float]]:
    """Accuracy of the samples whose ``values`` fall in each ``[edges[i], edges[i+1])``."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (values >= lo) & (values < hi)
        n = int(sel.sum())
        out.append({"low": float(lo), "high": float(hi), "n": n,
                    "accuracy": float(correct[sel].mean()) if n else float("nan")})
    return out


def format_confusion(fig: dict[str, Any]) -> str:
    """The confusion matrix as a Markdown table (rows: truth, columns: predicted)."""
    states = fig["states"]
    lines = ["| truth \\ predicted | " + " | ".join(states) + " |", "|---|" + "---|" * len(states)]
    for s, row in zip(states, fig["confusion"], strict=True):
        lines.append(f"| {s} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def format_figures(rows: dict[str, dict[str, Any]]) -> str:
    """One Markdown table: a row per (model, K, subset) with accuracy ± SE and per-class F1."""
    states = list(MOTION_STATES)
    lines = ["| model | n | accuracy | " + " | ".join(f"F1 {s}" for s in states) + " |",
             "|---|---|---|" + "---|" * len(states)]
    for name, fig in rows.items():
        f1 = " | ".join(f"{fig['f1'][s]:.3f}" for s in states)
        lines.append(f"| {name} | {fig['n']} | {fig['accuracy']:.3f} ± {fig['accuracy_se']:.3f} | {f1} |")
    return "\n".join(lines)
