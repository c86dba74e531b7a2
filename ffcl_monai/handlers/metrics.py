"""Classification metrics (MONAI implementations) with bootstrap confidence intervals, and an ignite Metric.

One function, :func:`classification_metrics`, defines every number the project reports, so validation curves,
test reports and ablation tables agree:

- ``accuracy``; macro ``f1``, ``precision``, ``recall`` (MONAI ``get_confusion_matrix`` +
  ``compute_confusion_matrix_metric`` per class, then the unweighted mean over classes);
- ``auc``: ROC-AUC (MONAI ``compute_roc_auc``). Binary tasks report the AUC of the positive class (equal to the
  macro AUC of a softmax pair); multi-class and multi-label report the macro mean; ``auc_<class>`` per class;
- the confusion matrix (counts) for plots.

Single-label decisions are the argmax (for a binary softmax pair: P(positive) > 0.5) unless ``pred`` gives them, e.g.
the decisions at a threshold chosen on the validation split (:mod:`ffcl_monai.evaluation.operating_point`); the AUCs
never depend on a decision.

Multi-label targets use -1 for "ignore" (CheXpert's uncertain labels under ``--uncertain ignore``): those entries
are left out of every per-label number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix

HEADLINE = ("accuracy", "f1", "precision", "recall", "auc")


def _per_class_counts(pred_onehot: np.ndarray, y_onehot: np.ndarray) -> torch.Tensor:
    """(C, 4) tp, fp, tn, fn per class, summed over samples (MONAI's get_confusion_matrix)."""
    cm = get_confusion_matrix(torch.as_tensor(pred_onehot, dtype=torch.float32), torch.as_tensor(y_onehot, dtype=torch.float32))
    return cm.sum(dim=0)


def _macro(metric: str, counts: torch.Tensor) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = compute_confusion_matrix_metric(metric, counts)
    values = values[~torch.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(y)))


def confusion_matrix(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class (single-label tasks)."""
    c = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (labels.astype(int), pred), 1)
    return cm


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    task: str,
    class_names: Sequence[str] | None = None,
    scores: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    with_auc: bool = True,
) -> dict[str, float]:
    """All reported metrics for one set of predictions.

    Args:
        probs: (N, C) probabilities (softmax for single-label, sigmoid for multi-label).
        labels: (N,) class indices, or (N, C) 0/1/-1 for multi-label.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: names for the per-class AUC keys (default: indices).
        scores: (N, C) ranking scores for the AUCs, default ``probs``. Pass log-odds
            (:func:`log_odds`): a confident float32 softmax saturates at exactly 1.0, which turns every
            confident prediction into a tie and drags the AUC towards 0.5.
        pred: (N,) predicted class per image for accuracy, F1, precision and recall (single-label tasks), default
            the argmax of ``probs``. Pass the decisions at a chosen operating point to score that point.
        with_auc: False leaves out the AUC keys (threshold-free, and three quarters of a bootstrap's time).
    """
    probs = np.asarray(probs, dtype=np.float64)
    scores = probs if scores is None else np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    n, c = probs.shape
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    out: dict[str, float] = {}
    if task == "multilabel":
        mask = labels >= 0
        pred = (probs >= 0.5).astype(np.float64)
        per_auc, per_acc, tp_fp_tn_fn = [], [], []
        for j in range(c):
            m = mask[:, j]
            y, p, s = labels[m, j].astype(np.float64), pred[m, j], scores[m, j]
            per_auc.append(_auc(s, y) if with_auc else float("nan"))
            per_acc.append(float((p == y).mean()) if m.any() else float("nan"))
            tp_fp_tn_fn.append(
                [((p == 1) & (y == 1)).sum(), ((p == 1) & (y == 0)).sum(), ((p == 0) & (y == 0)).sum(), ((p == 0) & (y == 1)).sum()]
            )
        counts = torch.as_tensor(np.array(tp_fp_tn_fn, dtype=np.float64))
        out["accuracy"] = float(np.nanmean(per_acc))
        if with_auc:
            for j, name in enumerate(names):
                out[f"auc_{name}"] = per_auc[j]
            out["auc"] = float(np.nanmean(per_auc)) if not all(math.isnan(a) for a in per_auc) else float("nan")
    else:
        y = labels.astype(int)
        if pred is None:
            pred = probs.argmax(axis=1)
        else:
            pred = np.asarray(pred).astype(int).reshape(-1)
            if pred.shape != y.shape or ((pred < 0) | (pred >= c)).any():
                raise ValueError(f"`pred` must hold one class index in [0, {c}) per image ({len(y)}), "
                                 f"got shape {pred.shape}.")
        y_onehot = np.eye(c)[y]
        counts = _per_class_counts(np.eye(c)[pred], y_onehot)
        out["accuracy"] = float((pred == y).mean())
        if with_auc:
            per_auc = [_auc(scores[:, j], y_onehot[:, j]) for j in range(c)]
            for j, name in enumerate(names):
                out[f"auc_{name}"] = per_auc[j]
            if task == "binary" and c == 2:
                out["auc"] = per_auc[1]
            elif c == 1:
                out["auc"] = per_auc[0]
            else:
                valid = [a for a in per_auc if not math.isnan(a)]
                out["auc"] = float(np.mean(valid)) if valid else float("nan")
    out["f1"] = _macro("f1 score", counts)
    out["precision"] = _macro("precision", counts)
    out["recall"] = _macro("sensitivity", counts)
    return out


def bootstrap_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    task: str,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    scores: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    with_auc: bool = True,
) -> dict[str, dict[str, float]]:
    """Point estimates with percentile bootstrap (1 - alpha) confidence intervals, resampling images.

    ``pred``: fixed decisions per image (see :func:`classification_metrics`), resampled with the images; with the
    same ``seed`` two calls draw the same resamples, so intervals at two operating points are paired. ``with_auc``:
    as in :func:`classification_metrics`.

    Returns:
        ``{metric: {"value": v, "ci_low": lo, "ci_high": hi}}`` for every metric of :func:`classification_metrics`.
    """
    point = classification_metrics(probs, labels, task, class_names, scores, pred, with_auc)
    rng = np.random.default_rng(seed)
    n = len(labels)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_bootstrap):
        idx = rng.integers(0, n, size=n)
        m = classification_metrics(probs[idx], labels[idx], task, class_names, None if scores is None else scores[idx],
                                   None if pred is None else np.asarray(pred)[idx], with_auc)
        for k, v in m.items():
            samples[k].append(v)
    result = {}
    for k, v in point.items():
        arr = np.array(samples[k], dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        lo, hi = (np.quantile(arr, [alpha / 2, 1 - alpha / 2]).tolist() if len(arr) else (float("nan"), float("nan")))
        result[k] = {"value": v, "ci_low": float(lo), "ci_high": float(hi)}
    return result


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Softmax for single-label tasks, sigmoid for multi-label (also what the inference workflow outputs)."""
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=-1)


def log_odds(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Per-class log-odds log(p / (1 - p)): the same ranking as :func:`probabilities`, without saturation.

    For softmax this is ``x_j - logsumexp(x_k, k != j)``; for sigmoid it is the logit itself. Probabilities of
    confident predictions round to exactly 1.0 (even log-softmax rounds to 0.0), the log-odds keep every margin.
    """
    logits = logits.double()
    if task == "multilabel" or logits.shape[-1] == 1:
        return logits
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(-2).masked_fill(eye, float("-inf"))  # (..., C, C): row j holds x without x_j
    return logits - torch.logsumexp(others, dim=-1)


class ClassificationMetrics(Metric):
    """Ignite metric that accumulates probabilities and labels over an epoch and computes every metric at once.

    Its value (the key metric that selects checkpoints) is ``key`` (default ``auc``); on completion every other
    metric is also written to ``engine.state.metrics`` as ``<prefix><name>`` so that MLflow logs them per epoch.

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel``.
        class_names: names used in per-class keys.
        prefix: metric-name prefix (``val_``).
        key: which metric is the value.
        output_transform: maps ``engine.state.output`` to ``(logits, labels)``; MONAI evaluators give a list of
            decollated dicts with ``pred`` and ``label``.
    """

    def __init__(
        self,
        task: str = "binary",
        class_names: Sequence[str] | None = None,
        prefix: str = "val_",
        key: str = "auc",
        output_transform: Callable = lambda x: x,
    ) -> None:
        self.task = task
        self.class_names = list(class_names) if class_names else None
        self.prefix = prefix
        self.key = key
        self.last: dict[str, float] = {}
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output: Any) -> None:
        logits, labels = _split_output(output)
        self._logits.append(logits.detach().double().cpu())
        self._labels.append(labels.detach().cpu())

    def compute(self) -> float:
        if not self._logits:
            raise RuntimeError("ClassificationMetrics: no predictions were accumulated (empty validation split?)")
        logits = torch.cat(self._logits)
        labels = torch.cat(self._labels).numpy()
        self.last = classification_metrics(
            probabilities(logits, self.task).numpy(), labels, self.task, self.class_names,
            scores=log_odds(logits, self.task).numpy(),
        )
        return self.last[self.key]

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        for k, v in self.last.items():
            full = f"{self.prefix}{k}"
            if full != name:
                engine.state.metrics[full] = v


def _split_output(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept (logits, labels) tuples or MONAI's decollated list of {"pred", "label"} dicts."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        logits = torch.stack([torch.as_tensor(o["pred"]) for o in output])
        labels = torch.stack([torch.as_tensor(o["label"]) for o in output])
        return logits, labels
    if isinstance(output, dict):
        return torch.as_tensor(output["pred"]), torch.as_tensor(output["label"])
    logits, labels = output
    return torch.as_tensor(logits), torch.as_tensor(labels)
