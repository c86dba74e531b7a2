"""End-of-run reports: the test evaluation (metrics with bootstrap CIs, per-image predictions, plots, MLflow) and
the inference writer (class probabilities per image).

Predictions are matched to datalist entries by position: evaluation and inference loaders never shuffle, and
cached tensors carry no metadata (``track_meta=False``), so the position is the reliable link.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ffcl_monai.handlers.metrics import HEADLINE, bootstrap_ci, confusion_matrix, log_odds, probabilities
from ffcl_monai.handlers.mlflow_tracking import log_report
from ffcl_monai.handlers.plots import plot_confusion, plot_roc
from ffcl_monai.networks.checkpoints import atomic_write_text

logger = logging.getLogger(__name__)


def _batch_preds(engine: Engine) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = engine.state.output
    if isinstance(out, list):  # MONAI evaluators decollate the batch
        pred = torch.stack([torch.as_tensor(o["pred"]) for o in out])
        has_label = out[0].get("label") is not None
        label = torch.stack([torch.as_tensor(o["label"]) for o in out]) if has_label else None
        return pred, label
    return torch.as_tensor(out["pred"]), (torch.as_tensor(out["label"]) if out.get("label") is not None else None)


def _relative(path: str, base: str | None) -> str:
    if base:
        try:
            return os.path.relpath(path, base)
        except ValueError:
            pass
    return os.path.basename(path)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV content (written through :func:`atomic_write_text`, so a crash never leaves half a file)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def format_metrics_table(metrics: dict[str, dict[str, float]], keys: Sequence[str] = HEADLINE) -> str:
    """A terminal table: metric, value, 95% CI."""
    lines = [f"{'metric':<12}{'value':>8}   95% CI", "-" * 36]
    for k in keys:
        if k in metrics:
            m = metrics[k]
            lines.append(f"{k:<12}{m['value']:>8.4f}   [{m['ci_low']:.4f}, {m['ci_high']:.4f}]")
    return "\n".join(lines)


class TestReport:
    """Collect test-split predictions; at the end write metrics.json (with bootstrap 95% CIs), predictions.csv,
    roc.png, confusion_matrix.png and dataset_summary.json to ``output_dir``, print a table, and log it all to MLflow.

    Args:
        data: the evaluated datalist entries, in loader order.
        output_dir: where the files go.
        task, class_names: as in the config.
        tracking_uri, experiment_name, run_name, parent_run_id: MLflow target (None URI disables MLflow).
        params: parameters to log with the run (checkpoint, datalist, ...).
        dataset_summary: counts per split and class (no identifiers).
        datalist_dir: image paths in predictions.csv are written relative to it.
        n_bootstrap, seed: bootstrap settings.
    """

    def __init__(
        self,
        data: Sequence[dict],
        output_dir: str | os.PathLike,
        task: str,
        class_names: Sequence[str],
        tracking_uri: str | None = None,
        experiment_name: str = "ffcl_monai",
        run_name: str = "evaluate",
        parent_run_id: str | None = None,
        params: dict[str, Any] | None = None,
        dataset_summary: dict[str, Any] | None = None,
        datalist_dir: str | None = None,
        n_bootstrap: int = 1000,
        seed: int = 0,
        prefix: str = "test_",
    ) -> None:
        self.data = list(data)
        self.dir = Path(output_dir)
        self.task = task
        self.class_names = list(class_names)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.params = params or {}
        self.dataset_summary = dataset_summary
        self.datalist_dir = datalist_dir
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self.prefix = prefix
        self.metrics: dict[str, dict[str, float]] = {}
        self.run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        pred, label = _batch_preds(engine)
        self._logits.append(pred.detach().double().cpu())
        if label is None:
            raise ValueError("the evaluated split has no labels; use the inference workflow for unlabeled images.")
        self._labels.append(label.detach().cpu())

    def _report(self, engine: Engine) -> None:
        logits = torch.cat(self._logits)
        probs, scores = probabilities(logits, self.task).numpy(), log_odds(logits, self.task).numpy()
        labels = torch.cat(self._labels).numpy()
        if len(probs) != len(self.data):
            raise RuntimeError(f"{len(probs)} predictions for {len(self.data)} datalist entries; evaluation must not drop items.")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = bootstrap_ci(probs, labels, self.task, self.class_names, self.n_bootstrap, self.seed, scores=scores)
        files = self.write_files(probs, labels)
        print("\nTest metrics (bootstrap 95% CI, n={}):\n{}".format(len(labels), format_metrics_table(self.metrics)), flush=True)
        if self.tracking_uri:
            flat: dict[str, float] = {}
            for k, m in self.metrics.items():
                flat[f"{self.prefix}{k}"] = m["value"]
                flat[f"{self.prefix}{k}_ci_low"] = m["ci_low"]
                flat[f"{self.prefix}{k}_ci_high"] = m["ci_high"]
            self.run_id = log_report(
                self.tracking_uri, self.experiment_name, self.run_name, params=self.params, metrics=flat,
                artifacts=files, parent_run_id=self.parent_run_id,
            )
            if self.tracking_uri.startswith("sqlite:///"):
                print(f"MLflow: mlflow ui --backend-store-uri {self.tracking_uri}", flush=True)

    def write_files(self, probs: np.ndarray, labels: np.ndarray) -> list[Path]:
        """Write metrics.json, predictions.csv, plots and the dataset summary; return their paths."""
        metrics_path = self.dir / "metrics.json"
        atomic_write_text(metrics_path, json.dumps(
            {"task": self.task, "class_names": self.class_names, "n": int(len(labels)), "n_bootstrap": self.n_bootstrap,
             "ci": 0.95, "metrics": self.metrics}, indent=2))
        pred_path = self.dir / "predictions.csv"
        rows = []
        for item, p, y in zip(self.data, probs, labels):
            predicted = (
                "|".join(c for c, v in zip(self.class_names, p) if v >= 0.5) if self.task == "multilabel"
                else self.class_names[int(np.argmax(p))]
            )
            label = "|".join(str(int(v)) for v in np.atleast_1d(y)) if self.task == "multilabel" else int(y)
            rows.append([_relative(item["image"], self.datalist_dir), label, predicted, *[f"{v:.6f}" for v in p]])
        atomic_write_text(pred_path, _csv_text(["image", "label", "predicted", *[f"prob_{c}" for c in self.class_names]], rows))
        files = [metrics_path, pred_path]
        values = {k: m["value"] for k, m in self.metrics.items()}
        files.append(plot_roc(probs, labels, self.task, self.class_names, self.dir / "roc.png", values))
        if self.task != "multilabel":
            files.append(plot_confusion(confusion_matrix(probs, labels), self.class_names, self.dir / "confusion_matrix.png"))
        if self.dataset_summary is not None:
            summary_path = self.dir / "dataset_summary.json"
            atomic_write_text(summary_path, json.dumps(self.dataset_summary, indent=2))
            files.append(summary_path)
        return files


class InferenceWriter:
    """Write class probabilities for every inferred image to ``<output_dir>/inference.csv`` (and .json)."""

    def __init__(self, data: Sequence[dict], output_dir: str | os.PathLike, class_names: Sequence[str]) -> None:
        self.data = list(data)
        self.dir = Path(output_dir)
        self.class_names = list(class_names)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "_probs", []))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        pred, _ = _batch_preds(engine)
        self._probs.append(pred.detach().float().cpu())  # postprocessing already applied softmax/sigmoid

    def _write(self, engine: Engine) -> None:
        probs = torch.cat(self._probs).numpy()
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = [
            {"image": item["image"], **{c: float(v) for c, v in zip(self.class_names, p)}}
            for item, p in zip(self.data, probs)
        ]
        atomic_write_text(self.dir / "inference.json", json.dumps(rows, indent=2))
        atomic_write_text(self.dir / "inference.csv", _csv_text(
            ["image", *self.class_names], [[r["image"], *[f"{r[c]:.6f}" for c in self.class_names]] for r in rows]))
        print(f"class probabilities for {len(rows)} image(s): {self.dir / 'inference.csv'}", flush=True)
