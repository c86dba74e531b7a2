"""End-of-run reports: the test evaluation (metrics with bootstrap CIs, operating point and calibration, per-image
predictions, plots, MLflow) and the inference writer (class probabilities per image).

The operating point (binary threshold) and the temperature are chosen on the validation split's predictions, which
a :class:`PredictionCollector` gathers in a pass before the evaluated split (evaluate.yaml's ``calibrate``), and
applied unchanged; :mod:`ffcl_monai.evaluation.operating_point` has the definitions.

Predictions are matched to datalist entries by position: evaluation and inference loaders never shuffle, and
cached tensors carry no metadata (``track_meta=False``), so the position is the reliable link.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ffcl_monai.errors import UserInputError
from ffcl_monai.evaluation.operating_point import REFERENCE_SPLIT, Assessment, assess, parse_threshold_rule
from ffcl_monai.handlers.metrics import HEADLINE, bootstrap_ci, confusion_matrix, log_odds, probabilities
from ffcl_monai.handlers.mlflow_tracking import log_report
from ffcl_monai.handlers.plots import plot_confusion, plot_reliability, plot_roc
from ffcl_monai.networks.checkpoints import atomic_write_text, csv_text

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


def _ci(m: dict[str, Any]) -> str:
    return f"{m['value']:>8.4f}   [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"


def format_metrics_table(
    metrics: dict[str, dict[str, float]],
    keys: Sequence[str] = HEADLINE,
    operating_point: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> str:
    """A terminal table: metric, value, 95% CI; with ``operating_point`` (binary) a second column at the threshold
    chosen on validation plus sensitivity and specificity rows (per class for multi-class), with ``calibration`` the
    ECE before (and after) temperature scaling. Without them, the table is the plain headline table."""
    opp = operating_point or {}
    at = opp.get("at_threshold")
    if at is None:
        lines = [f"{'metric':<12}{'value':>8}   95% CI", "-" * 36]
        if "at_0.5" in opp:
            lines[0] = f"{'metric':<12}{'at 0.5':>8}   95% CI"
    else:
        head = f"at {at['threshold']:.4f}"
        lines = [f"{'metric':<12}{'at 0.5':>8}   95% CI{'':<10}{head:>10}   95% CI", "-" * 78]
    for k in keys:
        if k in metrics:
            row = f"{k:<12}{_ci(metrics[k])}"
            if at is not None:
                m = at.get("metrics", {}).get(k)
                row += f"  {_ci(m)}" if m is not None else "      (threshold-free)"
            lines.append(row)
    if "at_0.5" in opp:
        for k in ("sensitivity", "specificity"):
            row = f"{k:<12}{_ci(opp['at_0.5'][k])}"
            lines.append(row + (f"  {_ci(at[k])}" if at is not None else ""))
    if at is not None:
        where = (f"chosen on {opp['chosen_on']} (n={opp['n_chosen_on']})" if opp.get("chosen_on") != "fixed"
                 else "fixed")
        lines.append(f"threshold {at['threshold']:.4f} on P({opp.get('positive_class', 'positive')}): "
                     f"{opp.get('rule')}, {where}" + (" - optimistic, same split" if opp.get("same_split") else ""))
    for name, rates in opp.get("per_class", {}).items():
        lines.append(f"{name[:11]:<12}sensitivity {_ci(rates['sensitivity']).strip()}   "
                     f"specificity {_ci(rates['specificity']).strip()}")
    if opp.get("at_0.5") or opp.get("per_class"):
        lines.append("sensitivity/specificity: Wilson score 95% CI; other rows: bootstrap 95% CI")
    if calibration:
        line = f"ECE ({calibration['kind']}, {calibration['n_bins']} bins) {calibration['ece']:.4f}"
        ts = calibration.get("temperature_scaling", {})
        if ts.get("enabled"):
            line += (f"; after temperature scaling (T={ts['temperature']:.3g}, fitted on {ts['fitted_on']}): "
                     f"{ts['ece']:.4f}")
        lines.append(line)
    return "\n".join(lines)


class PredictionCollector:
    """Evaluator handler that keeps one pass's logits and labels (evaluate.yaml: the validation split, scored before
    the evaluated split, to choose the threshold and fit the temperature). ``logits``/``labels`` are None until a
    pass has completed (e.g. when the pass was not needed and its evaluator is disabled)."""

    def __init__(self, name: str = REFERENCE_SPLIT) -> None:
        self.name = name
        self.logits: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def _collect(self, engine: Engine) -> None:
        pred, label = _batch_preds(engine)
        if label is None:
            raise ValueError(f"the {self.name} split has no labels; a threshold or temperature cannot be fitted on it.")
        self._logits.append(pred.detach().double().cpu())
        self._labels.append(label.detach().cpu())

    def _complete(self, engine: Engine) -> None:
        self.logits, self.labels = torch.cat(self._logits), torch.cat(self._labels)
        logger.info("%s predictions for the operating point / temperature: %d images", self.name, len(self.labels))


class TestReport:
    """Collect test-split predictions; at the end write metrics.json (with bootstrap 95% CIs, the operating point and
    calibration), predictions.csv, roc.png, confusion_matrix.png, reliability.png and dataset_summary.json to
    ``output_dir``, print a table, and log it all to MLflow.

    Args:
        data: the evaluated datalist entries, in loader order.
        output_dir: where the files go.
        task, class_names: as in the config.
        tracking_uri, experiment_name, run_name, parent_run_id: MLflow target (None URI disables MLflow).
        params: parameters to log with the run (checkpoint, datalist, ...).
        dataset_summary: counts per split and class (no identifiers).
        datalist_dir: image paths in predictions.csv are written relative to it.
        n_bootstrap, seed: bootstrap settings.
        threshold: binary decision rule (``youden``, a probability such as 0.5, ``sensitivity:<target>``); None:
            only the 0.5 point. Chosen on ``reference`` (the validation split's predictions).
        temperature_scaling: fit one temperature on ``reference`` and report the ECE after it too.
        ece_bins: equal-width bins of the ECE and the reliability diagram.
        reference: a :class:`PredictionCollector` that scored the validation split; when it holds nothing and
            ``split`` is the validation split, the evaluated predictions are used and metrics.json says the choice
            was made on the same split (optimistic).
        split: the evaluated split's name (``eval_split``).
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
        threshold: str | float | None = None,
        temperature_scaling: bool = False,
        ece_bins: int = 15,
        reference: PredictionCollector | None = None,
        split: str | None = None,
    ) -> None:
        if threshold is not None:
            parse_threshold_rule(threshold)  # a typo fails when the report is built, before any image is read
        if int(ece_bins) < 1:
            raise UserInputError(f"`ece_bins` (evaluate.yaml) must be >= 1, got {ece_bins!r}.")
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
        self.threshold = threshold
        self.temperature_scaling = bool(temperature_scaling)
        self.ece_bins = int(ece_bins)
        self.reference = reference
        self.split = split
        self.metrics: dict[str, dict[str, float]] = {}
        self.assessment: Assessment | None = None
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

    def _reference(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[tuple[Any, Any] | None, bool]:
        """The predictions to fit on and whether they are the evaluated split's own."""
        name = getattr(self.reference, "name", REFERENCE_SPLIT)
        if self.split == name:  # evaluating the validation split: it is its own reference
            return (logits, labels), True
        if self.reference is not None and self.reference.logits is not None:
            return (self.reference.logits, self.reference.labels), False
        return None, False

    def _report(self, engine: Engine) -> None:
        logits = torch.cat(self._logits)
        labels_t = torch.cat(self._labels)
        probs, scores = probabilities(logits, self.task).numpy(), log_odds(logits, self.task).numpy()
        labels = labels_t.numpy()
        if len(probs) != len(self.data):
            raise RuntimeError(f"{len(probs)} predictions for {len(self.data)} datalist entries; evaluation must not drop items.")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics = bootstrap_ci(probs, labels, self.task, self.class_names, self.n_bootstrap, self.seed, scores=scores)
        reference, same_split = self._reference(logits, labels_t)
        self.assessment = assess(
            logits, labels_t, self.task, self.class_names, threshold=self.threshold,
            temperature_scaling=self.temperature_scaling, ece_bins=self.ece_bins, reference=reference,
            reference_name=getattr(self.reference, "name", REFERENCE_SPLIT), same_split=same_split,
            n_bootstrap=self.n_bootstrap, seed=self.seed,
        )
        files = self.write_files(probs, labels, scores=scores)
        table = format_metrics_table(self.metrics, operating_point=self.assessment.operating_point,
                                     calibration=self.assessment.calibration)
        split = (self.split or "test").capitalize()  # the split's own name: a validation report is not a test result
        print("\n{} metrics (bootstrap 95% CI, n={}):\n{}".format(split, len(labels), table), flush=True)
        if self.tracking_uri:
            flat: dict[str, float] = {}
            for k, m in self.metrics.items():
                flat[f"{self.prefix}{k}"] = m["value"]
                flat[f"{self.prefix}{k}_ci_low"] = m["ci_low"]
                flat[f"{self.prefix}{k}_ci_high"] = m["ci_high"]
            flat.update(self.assessment.flat_metrics(self.prefix))
            self.run_id = log_report(
                self.tracking_uri, self.experiment_name, self.run_name, params=self.params, metrics=flat,
                artifacts=files, parent_run_id=self.parent_run_id,
            )
            if self.tracking_uri.startswith("sqlite:///"):
                print(f"MLflow: mlflow ui --backend-store-uri {self.tracking_uri}", flush=True)

    def write_files(self, probs: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None) -> list[Path]:
        """Write metrics.json, predictions.csv, plots and the dataset summary; return their paths.

        ``scores``: the (N, C) ranking scores behind the AUCs (log-odds, :func:`~ffcl_monai.handlers.metrics.log_odds`),
        written at full precision as ``score_<class>`` columns: the 6-decimal probabilities of a confident model round
        to 0 or 1 and tie, so a paired comparison read from the file (:mod:`ffcl_monai.evaluation.paired`) ranks by
        these instead and gets the AUCs of ``metrics.json``."""
        metrics_path = self.dir / "metrics.json"
        content: dict[str, Any] = {
            "task": self.task, "class_names": self.class_names, "n": int(len(labels)), "n_bootstrap": self.n_bootstrap,
            "ci": 0.95, "metrics": self.metrics}
        a = self.assessment
        if a is not None:
            content["operating_point"] = a.operating_point
            content["calibration"] = a.calibration
        atomic_write_text(metrics_path, json.dumps(content, indent=2))
        pred_path = self.dir / "predictions.csv"
        decisions = a.decisions if a is not None else None
        rows = []
        for i, (item, p, y) in enumerate(zip(self.data, probs, labels)):
            predicted = (
                "|".join(c for c, v in zip(self.class_names, p) if v >= 0.5) if self.task == "multilabel"
                else self.class_names[int(np.argmax(p))]
            )
            label = "|".join(str(int(v)) for v in np.atleast_1d(y)) if self.task == "multilabel" else int(y)
            extra = [self.class_names[int(decisions[i])]] if decisions is not None else []
            score = [f"{v:.17g}" for v in scores[i]] if scores is not None else []  # round-trips a float64
            rows.append([_relative(item["image"], self.datalist_dir), label, predicted, *extra,
                         *[f"{v:.6f}" for v in p], *score])
        header = ["image", "label", "predicted", *(["predicted_at_threshold"] if decisions is not None else []),
                  *[f"prob_{c}" for c in self.class_names],
                  *([f"score_{c}" for c in self.class_names] if scores is not None else [])]
        atomic_write_text(pred_path, csv_text(header, rows))
        files = [metrics_path, pred_path]
        values = {k: m["value"] for k, m in self.metrics.items()}
        files.append(plot_roc(probs, labels, self.task, self.class_names, self.dir / "roc.png", values))
        if self.task != "multilabel":
            files.append(plot_confusion(confusion_matrix(probs, labels), self.class_names, self.dir / "confusion_matrix.png"))
        if a is not None:
            cal, ts = a.calibration, a.calibration["temperature_scaling"]
            files.append(plot_reliability(
                cal["reliability"], self.dir / "reliability.png", cal["ece"], cal["kind"],
                ts.get("reliability"), ts.get("ece"), ts.get("temperature"), a.operating_point.get("positive_class")))
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
        atomic_write_text(self.dir / "inference.csv", csv_text(
            ["image", *self.class_names], [[r["image"], *[f"{r[c]:.6f}" for c in self.class_names]] for r in rows]))
        print(f"class probabilities for {len(rows)} image(s): {self.dir / 'inference.csv'}", flush=True)
