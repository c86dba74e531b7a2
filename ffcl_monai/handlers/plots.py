"""PNG plots that people would rather look at than read: ROC curves, confusion matrices, training curves."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def plot_roc(
    probs: np.ndarray, labels: np.ndarray, task: str, class_names: Sequence[str], path: str | os.PathLike,
    aucs: Mapping[str, float] | None = None,
) -> Path:
    """One ROC curve per class (the positive class only for binary tasks), AUC in the legend."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    c = probs.shape[1]
    classes = [1] if task == "binary" and c == 2 else range(c)
    for j in classes:
        if task == "multilabel":
            m = labels[:, j] >= 0
            y, s = labels[m, j], probs[m, j]
        else:
            y, s = (labels == j).astype(int), probs[:, j]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        auc = (aucs or {}).get(f"auc_{class_names[j]}")
        ax.plot(fpr, tpr, label=f"{class_names[j]}" + (f" (AUC {auc:.3f})" if auc is not None else ""))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Confusion matrix with counts and row-normalised colour (rows = truth)."""
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2.5, 1.2 * len(class_names) + 2), dpi=110)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    return _save(fig, path)


def plot_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str], path: str | os.PathLike, title: str = "") -> Path:
    """Per-epoch curves of the given keys from a list of per-epoch dicts (missing values are skipped)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for k in keys:
        pts = [(h["epoch"], h[k]) for h in history if k in h and h[k] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=k)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
