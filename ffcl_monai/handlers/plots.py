"""PNG plots that people would rather look at than read: ROC curves, confusion matrices, reliability diagrams,
training curves."""

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


def plot_reliability(
    bins: Sequence[Mapping[str, float | int | None]],
    path: str | os.PathLike,
    ece: float,
    kind: str = "top-label",
    bins_after: Sequence[Mapping[str, float | int | None]] | None = None,
    ece_after: float | None = None,
    temperature: float | None = None,
    positive_class: str | None = None,
) -> Path:
    """Reliability diagram (Guo et al. 2017, Fig. 1): observed frequency against mean confidence per bin, the
    diagonal of perfect calibration, ECE in the legend; below, how many images fall in each bin.

    Args:
        bins: :func:`ffcl_monai.evaluation.operating_point.expected_calibration_error` bins (lower, upper, count,
            confidence, accuracy; empty bins have ``None`` and are skipped).
        ece, kind: the ECE and what it measures (``positive-class``, ``top-label``, ``per-label pooled``).
        bins_after, ece_after, temperature: the same after temperature scaling, drawn on top when given.
        positive_class: axis labels of a binary diagram name it.
    """
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = [b["upper"] - b["lower"] for b in bins]
    centre = [(b["upper"] + b["lower"]) / 2 for b in bins]
    filled = [b for b in bins if b["count"]]
    ax.bar([(b["upper"] + b["lower"]) / 2 for b in filled], [b["accuracy"] for b in filled],
           width=[b["upper"] - b["lower"] for b in filled], color="tab:blue", alpha=0.35, edgecolor="tab:blue",
           label=f"uncalibrated (ECE {ece:.3f})")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o-", color="tab:blue", ms=4)
    if bins_after is not None:
        after = [b for b in bins_after if b["count"]]
        ax.plot([b["confidence"] for b in after], [b["accuracy"] for b in after], "s-", color="tab:orange", ms=4,
                label=f"temperature T={temperature:.3g} (ECE {ece_after:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if kind == "positive-class":
        name = positive_class or "positive class"
        ax.set_ylabel(f"observed frequency of {name}")
        hist.set_xlabel(f"predicted probability of {name}")
    else:
        ax.set_ylabel("accuracy" if kind == "top-label" else "observed frequency")
        hist.set_xlabel("confidence (top-label probability)" if kind == "top-label" else "predicted probability")
    ax.set_title(f"reliability ({kind}, {len(bins)} bins)")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(centre, [b["count"] for b in bins], width=width, color="grey", edgecolor="white")
    hist.set_ylabel("count")
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
