"""Online representation monitor for pretraining: is the backbone learning something that separates the classes?

Every ``interval`` epochs (and at the last epoch, and once before training as the random-init reference, "epoch 0")
the monitor embeds a labelled subset of the training split and the validation split with the current backbone
(eval mode, no gradient) and writes into ``engine.state.metrics`` (from there the project's MLflow handler logs them
per epoch, with the epoch as step):

- ``knn_acc``, ``knn_auc``: weighted k-nearest-neighbour classifier on the frozen embeddings (Wu et al. 2018,
  InstDisc, Sec. 3.4; solo-learn's ``WeightedKNNClassifier``): cosine similarity to the labelled training bank, the
  ``k`` most similar images vote for their class with weight ``exp(s / T)``, and the votes normalised to sum to 1 are
  the class scores. ``k`` = 20 by default (solo-learn), 200 in InstDisc; ``T`` = 0.07 (both). Extra ``k`` values give
  ``knn<k>_acc`` / ``knn<k>_auc``. The scores equal scikit-learn's
  ``KNeighborsClassifier(metric="cosine", weights=lambda d: exp((1 - d) / T)).predict_proba`` (tested to 1e-6).
- ``probe_acc``, ``probe_auc``: logistic regression (scikit-learn, L2, standardised features) fitted on the
  training bank, scored on validation: a linear probe without a single gradient step on the backbone.
- per level of a multi-level embedding: ``block<i>_...`` for every block B_i of the FFCL local stage (B_1 = stem),
  ``layer<l>_...`` for the Forward-Forward layers. The unprefixed names are always the backbone's final embedding.
- ``monitor_time_s``: seconds the monitor took.

AUC and accuracy are :func:`ffcl_monai.handlers.metrics.classification_metrics` (the project's one definition):
binary tasks the AUC of the positive class, multi-class the macro one-vs-rest mean, multi-label the macro mean over
labels (kNN: per-label weighted vote among neighbours with a known value).

Also, per monitored epoch, a 2D plot (PCA, and scikit-learn t-SNE) of the validation embeddings coloured by class,
``<output_dir>/embeddings/epoch_<e>.png``, is logged to the MLflow run at once (folder ``embeddings``), and a row goes
to ``<output_dir>/embedding_monitor.jsonl`` (the epoch-0 row included; MLflow gets epoch 0 as step 0).

It never changes training: the labelled images are loaded by the monitor itself (pretraining still sees no labels)
with the workflow's deterministic transforms, cached once as tensors; the network runs in eval mode under
``torch.no_grad`` (BatchNorm running statistics are not touched) and every module's train/eval flag is restored; the
Python, NumPy, torch CPU and CUDA random states are saved and restored; there are no collective calls. Under
torchrun only rank 0 monitors, on the unwrapped module; the other ranks do nothing (they wait for rank 0 at their
next gradient all-reduce).

A datalist without labels (or without a labelled validation split) skips the monitor with a logged message, and the
MLflow run gets the tag ``embedding_monitor`` saying why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn

from ffcl_monai.data.distributed import is_rank0, unwrap_module

logger = logging.getLogger(__name__)

PLOTS = ("pca+tsne", "pca", "tsne", "none")
FEATURES = ("backbone", "blocks", "ff")
MLFLOW_TAG = "embedding_monitor"


# ------------------------------------------------------------------------------------------------------------------
# the numbers
# ------------------------------------------------------------------------------------------------------------------
def _label_matrix(labels: np.ndarray, num_classes: int, task: str) -> np.ndarray:
    """(N, C) float: one-hot for single-label tasks, the 0/1/-1 rows for multi-label."""
    labels = np.asarray(labels)
    if task == "multilabel":
        return labels.astype(np.float64).reshape(len(labels), num_classes)
    return np.eye(num_classes, dtype=np.float64)[labels.astype(int)]


def knn_scores(
    bank: torch.Tensor | np.ndarray,
    bank_labels: np.ndarray,
    query: torch.Tensor | np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    task: str = "binary",
) -> np.ndarray:
    """Class scores ``(N_query, C)`` of the temperature-weighted cosine kNN classifier (InstDisc / solo-learn).

    The ``k`` bank vectors most cosine-similar to a query vote for their class with weight ``exp(s / T)``; the votes
    normalised to sum to 1 are the scores (single-label tasks: scikit-learn's ``predict_proba`` with
    ``weights = exp((1 - d) / T)``, ``d`` the cosine distance). Multi-label: per label, the weighted fraction of
    positives among the neighbours whose value is known (not -1); 0.5 where none is known.
    Computed in float64; ``exp((s - s_max) / T)`` (the common factor cancels) cannot overflow for any ``T``.
    """
    b = torch.as_tensor(np.asarray(bank) if not isinstance(bank, torch.Tensor) else bank).double().cpu()
    q = torch.as_tensor(np.asarray(query) if not isinstance(query, torch.Tensor) else query).double().cpu()
    b, q = F.normalize(b, dim=1), F.normalize(q, dim=1)
    bank_labels = np.asarray(bank_labels)
    if num_classes is None:
        num_classes = bank_labels.shape[1] if task == "multilabel" else int(bank_labels.max()) + 1
    k = max(1, min(int(k), b.shape[0]))
    sim, idx = (q @ b.t()).topk(k, dim=1)  # (Nq, k), most similar first
    w = torch.exp((sim - sim[:, :1]) / float(temperature))  # (Nq, k)
    y = torch.as_tensor(_label_matrix(bank_labels, num_classes, task))[idx]  # (Nq, k, C)
    if task == "multilabel":
        known = (y >= 0).double()
        pos = (y == 1).double()
        num = (w[..., None] * pos).sum(1)
        den = (w[..., None] * known).sum(1)
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, 0.5)).numpy()
    votes = (w[..., None] * y).sum(1)
    return (votes / votes.sum(1, keepdim=True)).numpy()


def _headline(scores: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
    from ffcl_monai.handlers.metrics import classification_metrics

    m = classification_metrics(scores, labels, task)
    return {"acc": float(m["accuracy"]), "auc": float(m["auc"])}


def knn_metrics(
    bank: Any, bank_labels: np.ndarray, query: Any, query_labels: np.ndarray, k: int = 20,
    temperature: float = 0.07, num_classes: int | None = None, task: str = "binary",
) -> dict[str, float]:
    """``{"acc", "auc"}`` of :func:`knn_scores` on labelled queries (the project's accuracy and AUC definitions)."""
    scores = knn_scores(bank, bank_labels, query, k, temperature, num_classes, task)
    return _headline(scores, np.asarray(query_labels), task)


def probe_metrics(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, num_classes: int,
    task: str = "binary", seed: int = 0,
) -> dict[str, float]:
    """``{"acc", "auc"}`` of a logistic-regression probe (standardised features, L2, lbfgs) on frozen features.

    Multi-label: one probe per label on the images where it is known. NaN where a probe cannot be fitted (a single
    class in the training bank).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, val = np.asarray(train, dtype=np.float64), np.asarray(val, dtype=np.float64)
    scaler = StandardScaler().fit(train)
    xt, xv = scaler.transform(train), scaler.transform(val)
    nan = {"acc": float("nan"), "auc": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if task == "multilabel":
            yt = np.asarray(train_labels).reshape(len(train), num_classes)
            scores = np.full((len(val), num_classes), 0.5)
            for j in range(num_classes):
                m = yt[:, j] >= 0
                if len(np.unique(yt[m, j])) < 2:
                    continue
                clf = LogisticRegression(max_iter=1000, random_state=seed).fit(xt[m], yt[m, j].astype(int))
                scores[:, j] = clf.predict_proba(xv)[:, 1]
            return _headline(scores, np.asarray(val_labels), task)
        yt = np.asarray(train_labels).astype(int)
        if len(np.unique(yt)) < 2:
            return nan
        clf = LogisticRegression(max_iter=1000, random_state=seed).fit(xt, yt)
        proba = clf.predict_proba(xv)
    scores = np.zeros((len(val), num_classes))
    scores[:, clf.classes_] = proba  # classes absent from the bank keep score 0
    return _headline(scores, np.asarray(val_labels), task)


def embedding_metrics(
    bank: np.ndarray, bank_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, num_classes: int,
    task: str = "binary", ks: Sequence[int] = (20,), temperature: float = 0.07, probe: bool = True, seed: int = 0,
) -> dict[str, float]:
    """Every number of one embedding: ``knn_acc``/``knn_auc`` (first ``k``), ``knn<k>_*`` (others), ``probe_*``."""
    out: dict[str, float] = {}
    for i, k in enumerate(ks):
        m = knn_metrics(bank, bank_labels, val, val_labels, k, temperature, num_classes, task)
        name = "knn" if i == 0 else f"knn{int(k)}"
        out[f"{name}_acc"], out[f"{name}_auc"] = m["acc"], m["auc"]
    if probe:
        m = probe_metrics(bank, bank_labels, val, val_labels, num_classes, task, seed)
        out["probe_acc"], out["probe_auc"] = m["acc"], m["auc"]
    return out


# ------------------------------------------------------------------------------------------------------------------
# data: the monitor's own labelled, deterministic, cached view of the datalist
# ------------------------------------------------------------------------------------------------------------------
def _strat_key(label: Any) -> Any:
    if isinstance(label, (list, tuple)):
        return next((i for i, v in enumerate(label) if v == 1), -1)
    return int(label)


def capped_subset(items: Sequence[Mapping[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """At most ``n`` items: all of them if there are no more, else a seeded, class-stratified subset of exactly
    ``n`` (largest-remainder allocation, at least one per class where ``n`` allows), in datalist order."""
    items = [dict(d) for d in items]
    if n <= 0 or len(items) <= n:
        return items
    groups: dict[Any, list[int]] = {}
    for i, d in enumerate(items):
        groups.setdefault(_strat_key(d["label"]), []).append(i)
    keys = sorted(groups, key=str)
    exact = {g: n * len(groups[g]) / len(items) for g in keys}
    alloc = {g: int(math.floor(exact[g])) for g in keys}
    if n >= len(keys):
        for g in keys:
            alloc[g] = max(alloc[g], 1)
    left = n - sum(alloc.values())
    for g in sorted(keys, key=lambda g: (-(exact[g] - math.floor(exact[g])), str(g))):
        if left <= 0:
            break
        if alloc[g] < len(groups[g]):
            alloc[g] += 1
            left -= 1
    while sum(alloc.values()) > n:  # the at-least-one rule overshot: trim the largest groups
        g = max(keys, key=lambda g: (alloc[g], str(g)))
        alloc[g] -= 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for g in keys:
        chosen += rng.choice(groups[g], size=min(alloc[g], len(groups[g])), replace=False).tolist()
    return [items[i] for i in sorted(chosen)]


def _labelled(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(d) for d in items if d.get("label") is not None]




# ------------------------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------------------------
def embed_levels(
    network: nn.Module, x: torch.Tensor, features: str | Callable = "backbone"
) -> list[tuple[str, torch.Tensor]]:
    """``[(level name, (B, D) embedding), ...]`` of one batch; the last entry is the final embedding.

    - ``backbone``: the pooled backbone output (``network`` is a Backbone or has ``.backbone``): ``[("", h)]``.
    - ``blocks``: every block's pooled embedding E_i (``Backbone.block_embeddings``), ``block1``..``block<n>``; the
      final embedding is the last block's.
    - ``ff``: a Forward-Forward net's neutral-label activations per layer (``layer0``..) and their concatenation
      (the linear read-out's features) as the final; the backprop MLP baseline: its last hidden activations.
    - a callable ``f(network, x)`` returning a tensor or a list of tensors (levels ``level1``.., last = final).
    """
    net = unwrap_module(network)
    if callable(features):
        out = features(net, x)
        if isinstance(out, torch.Tensor):
            return [("", out)]
        return [(f"level{i + 1}", o) for i, o in enumerate(out)]
    if features == "ff":
        if hasattr(net, "activations") and hasattr(net, "neutral_code"):
            flat = x.flatten(1)
            acts = [a[:, 0] for a in net.activations(flat, net.neutral_code(flat.shape[0], flat.device))]
            levels = [(f"layer{i}", a) for i, a in enumerate(acts)] if len(acts) > 1 else []
            return levels + [("", torch.cat(acts, dim=-1))]
        body = getattr(net, "body", None)
        if isinstance(body, nn.Sequential):
            return [("", body[:-1](x.flatten(1).float()))]
        raise TypeError(f"`features: ff` needs an FFNet or the MLP baseline, got {type(net).__name__}.")
    from ffcl_monai.networks.backbones import as_backbone

    backbone = as_backbone(net)
    if features == "blocks":
        embs = backbone.block_embeddings(x)
        return [(f"block{i + 1}", e) for i, e in enumerate(embs)]
    if features == "backbone":
        return [("", backbone(x))]
    raise ValueError(f"embedding monitor `features` must be one of {FEATURES} or a callable, got {features!r}.")


class _FrozenState:
    """Context: eval mode + no_grad on ``module``; every module's flag and every random state restored on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> "_FrozenState":
        self.flags = [(m, m.training) for m in self.module.modules()]
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if cuda else None)
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.module.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag
        py, npy, cpu, cuda = self.rng
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------------------------
def plot_embeddings(
    emb: np.ndarray, labels: np.ndarray, path: str | os.PathLike, kind: str = "pca+tsne",
    class_names: Sequence[str] | None = None, title: str = "", seed: int = 0,
) -> Path | None:
    """PCA and/or t-SNE (scikit-learn) of ``emb`` in 2D, one colour per class; multi-label: by first positive
    label. Written atomically; None when ``kind`` is ``none``."""
    if kind == "none":
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(emb, dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    colour = np.array([_strat_key(list(r)) if np.ndim(r) else int(r) for r in labels])
    panels: list[tuple[str, np.ndarray]] = []
    if "pca" in kind:
        n_comp = min(2, x.shape[0], x.shape[1])
        p = PCA(n_components=n_comp, svd_solver="full").fit(x)
        xy = p.transform(x)
        if xy.shape[1] < 2:
            xy = np.concatenate([xy, np.zeros((len(xy), 2 - xy.shape[1]))], 1)
        ev = p.explained_variance_ratio_
        panels.append((f"PCA ({100 * ev[:2].sum():.0f}% of variance)", xy))
    if "tsne" in kind and len(x) >= 4:
        perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3)))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        panels.append((f"t-SNE (perplexity {perplexity:.0f})", xy))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), dpi=100, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, xy) in zip(axes[0], panels):
        for j, c in enumerate(sorted(set(colour.tolist()))):
            m = colour == c
            label = class_names[c] if class_names and 0 <= c < len(class_names) else ("none" if c < 0 else str(c))
            ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, color=cmap(j % 10), label=f"{label} ({int(m.sum())})")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# the handler
# ------------------------------------------------------------------------------------------------------------------
class EmbeddingMonitor:
    """kNN / linear-probe accuracy and AUC of the frozen embeddings every ``interval`` epochs (module docstring).

    Attach it to the trainer before the MLflow handler (its numbers must be in ``engine.state.metrics`` when MLflow
    reads them at the epoch's end).

    Args:
        network: the trained network (DDP-wrapped or not): a Backbone or a model with ``.backbone`` (``features``
            ``backbone``/``blocks``), an FFNet or the MLP baseline (``features: ff``).
        transforms: the workflow's deterministic transforms (``deterministic_transforms``: load, channels, scale,
            resize, label to tensor), cached once; never the random augmentations.
        datalist: the decathlon datalist; labels come from its ``train_split``, validation from ``val_split``.
            Task, number of classes and class names come from its header.
        train_items, val_items: item lists to use instead of the datalist's splits (e.g. the Forward-Forward
            workflow's own training / carved validation split).
        interval: monitor every ``interval`` epochs and at the last epoch; 0 = off.
        max_images: at most this many labelled training images (the kNN bank and probe training set) and at most
            this many validation images; a larger split gives a seeded, class-stratified subset.
        k: neighbours of the kNN vote; a list logs each (the first as ``knn_*``, the others as ``knn<k>_*``).
        temperature: vote temperature T of ``exp(s / T)``.
        plot: ``pca+tsne``, ``pca``, ``tsne`` or ``none``: 2D plot of the validation embeddings per monitored epoch.
        output_dir: where ``embeddings/epoch_<e>.png`` and ``embedding_monitor.jsonl`` go (None: no files).
        features: ``backbone``, ``blocks`` (per-block numbers, FFCL local stage), ``ff`` or a callable
            (:func:`embed_levels`).
        batch_size: images per forward pass.
        seed: seed of the capped subsets, the probe and t-SNE.
        baseline: also monitor once before the first epoch (epoch 0: the random-init or starting-checkpoint value).
        probe: fit the logistic-regression probe (``probe_*``).
        task, num_classes, class_names: override the header's values.
        train_split, val_split: the datalist splits of the bank and of the scored images.
        max_cache_gb: the cached images (float32, CPU) stay below this; large 3D volumes get fewer images, with a
            warning.

    Problems of the monitor itself (an unreadable image, a label outside the classes, a plotting or MLflow failure)
    are logged as warnings and switch it off or skip that step; they never stop training.
    """

    def __init__(
        self,
        network: nn.Module,
        transforms: Sequence[Any] | Callable | None = None,
        datalist: str | os.PathLike | None = None,
        train_items: Sequence[Mapping[str, Any]] | None = None,
        val_items: Sequence[Mapping[str, Any]] | None = None,
        interval: int = 5,
        max_images: int = 1000,
        k: int | Sequence[int] = 20,
        temperature: float = 0.07,
        plot: str | bool | None = "pca+tsne",
        output_dir: str | os.PathLike | None = None,
        features: str | Callable = "backbone",
        batch_size: int = 64,
        seed: int = 0,
        baseline: bool = True,
        probe: bool = True,
        task: str | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        train_split: str = "training",
        val_split: str = "validation",
        max_cache_gb: float = 2.0,
    ) -> None:
        self.network = network
        self.transforms = transforms
        self.datalist = None if datalist is None else str(datalist)
        self.train_items, self.val_items = train_items, val_items
        self.interval = int(interval or 0)
        self.max_images = int(max_images)
        self.ks = [int(v) for v in (k if isinstance(k, (list, tuple)) else [k])]
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"`monitor_k` must be a positive integer or a list of them, got {k!r}.")
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise ValueError(f"`monitor_temperature` must be > 0, got {temperature!r}.")
        plot = "pca+tsne" if plot is True else "none" if plot in (False, None, "", "false", "off") else str(plot)
        plot = {"both": "pca+tsne", "tsne+pca": "pca+tsne"}.get(plot, plot)
        if plot not in PLOTS:
            raise ValueError(f"`monitor_plot` must be one of {PLOTS}, got {plot!r}.")
        self.plot = plot
        if not callable(features) and features not in FEATURES:
            raise ValueError(f"embedding monitor `features` must be one of {FEATURES} or a callable, got {features!r}.")
        self.features = features
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.baseline = baseline
        self.probe = probe
        self.task, self.num_classes = task, num_classes
        self.class_names = list(class_names) if class_names else None
        self.train_split, self.val_split = train_split, val_split
        self.max_cache_gb = float(max_cache_gb)
        self.skip_reason: str | None = None
        self.history: list[dict[str, float]] = []
        self._data: dict[str, Any] | None = None
        self._keys: set[str] = set()
        self._tagged = False

    # -------------------------------------------------------------------------------------------- wiring
    def attach(self, engine: Engine) -> None:
        if self.interval <= 0:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def due(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether epoch ``epoch`` (1-based) is monitored: every ``interval`` epochs and the last one."""
        return self.interval > 0 and (epoch % self.interval == 0 or (max_epochs is not None and epoch == max_epochs))

    def _epoch_started(self, engine: Engine) -> None:
        if not is_rank0():
            return
        try:
            self._prepare()
        except Exception as e:
            logger.debug("embedding monitor preparation failed", exc_info=True)
            self._skip(f"its images could not be prepared ({type(e).__name__}: {e})")
        self._tag_skip(engine)
        if self.baseline and engine.state.epoch == 1 and not self.history and self.skip_reason is None:
            metrics = self._safe_run(engine, epoch=0)
            if metrics:
                self._log_mlflow_metrics(engine, metrics, step=0)

    def _epoch_completed(self, engine: Engine) -> None:
        for key in self._keys:  # no stale numbers on epochs that are not monitored
            engine.state.metrics.pop(key, None)
        if not is_rank0() or self.skip_reason is not None:
            return
        if not self.due(engine.state.epoch, engine.state.max_epochs):
            return
        metrics = self._safe_run(engine, epoch=engine.state.epoch)
        engine.state.metrics.update(metrics)
        self._keys = set(metrics)

    def _safe_run(self, engine: Engine, epoch: int) -> dict[str, float]:
        try:
            return self.run(engine, epoch)
        except Exception as e:  # the monitor must never stop a pretraining run
            logger.warning("embedding monitor failed at epoch %d (%s: %s); training continues", epoch,
                           type(e).__name__, e, exc_info=logger.isEnabledFor(logging.DEBUG))
            return {}

    # -------------------------------------------------------------------------------------------- data
    def _header(self) -> dict[str, Any]:
        if not self.datalist:
            return {}
        from ffcl_monai.data.datalist import read_header

        try:
            return read_header(self.datalist)
        except Exception:  # a missing header is not the monitor's problem to report
            return {}

    def _items(self, split: str, given: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        if given is not None:
            return [dict(d) for d in given]
        if not self.datalist:
            return []
        content = json.loads(Path(self.datalist).read_text())
        if not content.get(split):
            return []
        from ffcl_monai.data.datalist import load_datalist

        return load_datalist(self.datalist, split, require_labels=False)

    def _prepare(self) -> None:
        """Load, subset and cache the labelled images once (rank 0, first epoch start)."""
        if self._data is not None or self.skip_reason is not None:
            return
        t0 = time.perf_counter()
        header = self._header()
        task = self.task or header.get("task") or "binary"
        train = _labelled(self._items(self.train_split, self.train_items))
        val = _labelled(self._items(self.val_split, self.val_items))
        where = f"datalist {self.datalist}" if self.datalist else "the given items"
        if not train:
            self._skip(f"the training split of {where} has no labelled images (unlabeled pretraining data); add "
                       "`label` to some training and validation entries to get kNN and probe numbers")
            return
        if not val and self.val_items is not None:
            self._skip("the workflow has no validation images to score the embeddings on (Forward-Forward: "
                       "`val_source: none`)")
            return
        if not val:
            self._skip(f"{where} has no labelled '{self.val_split}' split to score the embeddings on; create one "
                       "(`python -m data_prep ... --val-count N`)")
            return
        if task == "multilabel":
            num_classes = len(train[0]["label"])
        else:
            num_classes = max(int(d["label"]) for d in train + val) + 1
        num_classes = int(self.num_classes or header.get("num_classes") or num_classes)
        if self.class_names is None:
            from ffcl_monai.data.datalist import class_names_from_header

            try:
                self.class_names = class_names_from_header(header) if header else None
            except Exception:
                self.class_names = None
        train = capped_subset(train, self.max_images, self.seed)
        val = capped_subset(val, self.max_images, self.seed + 1)
        transform = self._transform()
        first = self._load(transform, val[0])
        per_image = first[0].numel() * first[0].element_size()
        budget = int(self.max_cache_gb * 2**30 // max(per_image, 1))
        if len(train) + len(val) > budget:  # large 3D volumes: keep the cache within max_cache_gb
            keep = max(2, budget) / (len(train) + len(val))
            n_train, n_val = max(1, int(len(train) * keep)), max(1, int(len(val) * keep))
            logger.warning("embedding monitor: %d + %d images of %.1f MB exceed its %.1f GB cache; using %d + %d "
                           "(lower `monitor_max_images` to choose)", len(train), len(val), per_image / 2**20,
                           self.max_cache_gb, n_train, n_val)
            train, val = capped_subset(train, n_train, self.seed), capped_subset(val, n_val, self.seed + 1)
            first = self._load(transform, val[0])
        xt, yt = self._stack(transform, train)
        xv, yv = self._stack(transform, val[1:], first)
        self._data = {"train": (xt, yt), "val": (xv, yv), "task": task, "num_classes": num_classes}
        logger.info("embedding monitor: %d labelled training and %d validation images cached in %.1f s; every %d "
                    "epoch(s), k=%s, T=%g", len(train), len(val), time.perf_counter() - t0, self.interval,
                    self.ks, self.temperature)

    def _transform(self) -> Callable:
        from monai.transforms import Compose

        return self.transforms if isinstance(self.transforms, Compose) else Compose(list(self.transforms or []))

    @staticmethod
    def _load(transform: Callable, item: Mapping[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
        """One item through the deterministic transforms: (float32 CPU image, label array)."""
        from monai.data import get_track_meta, set_track_meta

        track = get_track_meta()
        set_track_meta(True)  # as the workflow's caches, built before its run list switches tracking off
        try:
            d = transform(dict(item))
        except Exception as e:
            from ffcl_monai.data.transforms import ImageReadError

            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, ImageReadError):  # MONAI wraps it in RuntimeErrors
                cause = cause.__cause__ or cause.__context__
            raise RuntimeError(f"{item.get('image')}: {cause or e}") from None
        finally:
            set_track_meta(track)
        x = d["image"]
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return x.detach().float().cpu(), np.asarray(torch.as_tensor(d["label"]).cpu())

    def _stack(self, transform: Callable, items: Sequence[Mapping[str, Any]],
               first: tuple[torch.Tensor, np.ndarray] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """The items' images stacked into one preallocated tensor (no second copy), and their labels."""
        loaded = [first] if first is not None else []
        n = len(items) + len(loaded)
        head = loaded[0] if loaded else self._load(transform, items[0])
        rest = items if loaded else items[1:]
        x = torch.empty((n, *head[0].shape), dtype=torch.float32)
        x[0] = head[0]
        ys = [head[1]]
        for i, item in enumerate(rest, start=1):
            xi, yi = self._load(transform, item)
            x[i] = xi
            ys.append(yi)
        return x, np.stack(ys)

    def _skip(self, reason: str) -> None:
        self.skip_reason = reason
        logger.warning("embedding monitor skipped: %s.", reason)

    def _tag_skip(self, engine: Engine) -> None:
        if self.skip_reason is None or self._tagged:
            return
        self._tagged = True
        target = _mlflow_target(engine)
        if target is not None:
            client, run_id = target
            try:
                client.set_tag(run_id, MLFLOW_TAG, f"skipped: {self.skip_reason}"[:5000])
            except Exception as e:
                logger.warning("embedding monitor: could not tag the MLflow run: %s", e)

    # -------------------------------------------------------------------------------------------- compute
    def _embed(self, engine: Engine, net: nn.Module, x: torch.Tensor) -> list[tuple[str, np.ndarray]]:
        try:
            device = next(net.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        precision = getattr(engine, "precision", None)
        chunks: dict[str, list[torch.Tensor]] = {}
        names: list[str] = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size].to(device)
            ctx = precision.autocast() if precision is not None and hasattr(precision, "autocast") else nullcontext()
            with ctx:
                levels = embed_levels(net, xb, self.features)
            if not names:
                names = [n for n, _ in levels]
            for n, e in levels:
                chunks.setdefault(n, []).append(e.detach().float().cpu())
        return [(n, torch.cat(chunks[n]).numpy().astype(np.float64)) for n in names]

    def compute(self, engine: Engine | None = None) -> tuple[dict[str, float], np.ndarray | None]:
        """Metrics of the current network and the final validation embeddings (for the plot)."""
        assert self._data is not None
        data = self._data
        (xt, yt), (xv, yv) = data["train"], data["val"]
        net = unwrap_module(self.network)
        eng = engine if engine is not None else Engine(lambda e, b: None)
        with _FrozenState(net):
            train_levels = self._embed(eng, net, xt)
            val_levels = self._embed(eng, net, xv)
            metrics: dict[str, float] = {}
            final_val = None
            for (name, et), (_, ev) in zip(train_levels, val_levels):
                m = embedding_metrics(et, yt, ev, yv, data["num_classes"], data["task"], self.ks, self.temperature,
                                      self.probe, self.seed)
                prefix = f"{name}_" if name else ""
                metrics.update({prefix + k: v for k, v in m.items()})
                final_val = ev
            last = train_levels[-1][0]
            if last:  # the final embedding is a named level (last block): publish its numbers unprefixed too
                metrics.update({k[len(last) + 1 :]: v for k, v in list(metrics.items()) if k.startswith(last + "_")})
        return metrics, final_val

    def run(self, engine: Engine, epoch: int) -> dict[str, float]:
        """Monitor now: metrics (returned), history row, plot file and MLflow artifact. Never raises on a plot or
        MLflow problem; the random states and module flags are restored whatever happens."""
        t0 = time.perf_counter()
        metrics, final_val = self.compute(engine)
        plot_path = None
        if self.plot != "none" and self.output_dir is not None and final_val is not None:
            try:
                with _FrozenState(nn.Module()):  # t-SNE/PCA keep to their own seeded generators; be sure anyway
                    plot_path = plot_embeddings(
                        final_val, self._data["val"][1], self.output_dir / "embeddings" / f"epoch_{epoch:03d}.png",
                        self.plot, self.class_names,
                        f"epoch {epoch}: validation embeddings, kNN AUC {metrics.get('knn_auc', float('nan')):.3f}, "
                        f"probe AUC {metrics.get('probe_auc', float('nan')):.3f}", self.seed)
            except Exception as e:  # a plotting problem must not stop pretraining
                logger.warning("embedding monitor: could not plot epoch %d: %s", epoch, e)
        row: dict[str, float] = {"epoch": epoch, **metrics}
        self.history.append(row)
        if plot_path is not None:
            self._log_mlflow_artifact(engine, plot_path, "embeddings")
        curves = self._plot_curves()
        if curves is not None:
            self._log_mlflow_artifact(engine, curves, None)
        metrics["monitor_time_s"] = row["monitor_time_s"] = time.perf_counter() - t0  # everything but this row's write
        self._write_history()
        head = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("knn_acc", "knn_auc", "probe_auc") if k in metrics)
        logger.info("embedding monitor, epoch %d: %s (%.1f s)", epoch, head, metrics["monitor_time_s"])
        return metrics

    def _write_history(self) -> None:
        if self.output_dir is None:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "embedding_monitor.jsonl", "a") as f:
                f.write(json.dumps(self.history[-1]) + "\n")
        except OSError as e:
            logger.warning("embedding monitor: could not write its history: %s", e)

    def _plot_curves(self) -> Path | None:
        """``embedding_monitor.png``: kNN and probe AUC (every level) over the monitored epochs, epoch 0 included."""
        if self.output_dir is None or not self.history:
            return None
        try:
            from ffcl_monai.handlers.plots import plot_curves

            keys = sorted({k for r in self.history for k in r if k.endswith(("knn_auc", "probe_auc"))},
                          key=lambda k: (k.count("_") > 1, k))
            return plot_curves(self.history, keys, self.output_dir / "embedding_monitor.png",
                               "embedding monitor (validation AUC of frozen embeddings)")
        except Exception as e:  # a plotting problem must not stop pretraining
            logger.warning("embedding monitor: could not plot its curves: %s", e)
            return None

    # -------------------------------------------------------------------------------------------- MLflow
    def _log_mlflow_metrics(self, engine: Engine, metrics: Mapping[str, float], step: int) -> None:
        target = _mlflow_target(engine)
        if target is None:
            return
        client, run_id = target
        try:
            import mlflow

            ts = int(time.time() * 1000)
            rows = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in metrics.items()]
            client.log_batch(run_id, metrics=rows)
        except Exception as e:
            logger.warning("embedding monitor: MLflow logging failed (%s); the numbers are in "
                           "embedding_monitor.jsonl", e)

    def _log_mlflow_artifact(self, engine: Engine, path: Path, folder: str | None) -> None:
        target = _mlflow_target(engine)
        if target is None:
            return
        client, run_id = target
        try:
            client.log_artifact(run_id, str(path), artifact_path=folder)
        except Exception as e:
            logger.warning("embedding monitor: could not log %s to MLflow: %s", path.name, e)


def _mlflow_target(engine: Engine) -> tuple[Any, str] | None:
    """(client, run id) of the MLflow handler logging ``engine``'s run, when it has one open."""
    from ffcl_monai.handlers.mlflow_tracking import run_logger

    handler = run_logger(engine)
    return (handler.client, handler.cur_run.info.run_id) if handler is not None and handler.cur_run else None
