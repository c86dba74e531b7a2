"""Per-epoch records of a run: the epoch means of the step outputs, the local history file and its curves, and the
``overfit`` sanity check that reads them.

- :class:`EpochMeans`: the one implementation of "average these ``engine.state.output`` entries over the epoch into
  ``engine.state.metrics``". The project's trainers register one before the config's handlers
  (:class:`~ffcl_monai.engines.base.BaseTrainer`, the Forward-Forward engines), :class:`HistoryWriter` uses one for
  ``train_loss`` on any trainer (MONAI's ``SupervisedTrainer`` included), :class:`OverfitCheck` one for its losses.
- :class:`HistoryWriter`: one row per epoch in ``history.jsonl`` (every number the trainer and the validator hold,
  each row tagged with the ``run_id``) and a PNG of the loss and validation curves: ``history.jsonl`` +
  ``training_curves.png`` in every workflow (other names: ``filename``, ``plot_filename``).
- :class:`OverfitCheck`: seed 001's assertion that the pretraining loss falls on a handful of images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ffcl_monai.data.distributed import is_rank0
from ffcl_monai.handlers.plots import plot_curves
from ffcl_monai.networks.checkpoints import atomic_write_text

__all__ = ["EpochMeans", "HistoryWriter", "OverfitCheck", "first_output", "read_rows"]

logger = logging.getLogger(__name__)

#: validation metrics drawn next to the losses in the curves PNG (the other numbers have their own plots)
VAL_CURVES = ("val_auc", "val_accuracy", "val_f1")


def first_output(output: Any) -> Mapping[str, Any]:
    """``engine.state.output`` as a mapping: the dict itself, the first item of MONAI's decollated list (its scalar
    entries, e.g. the loss, are replicated into every item), or ``{"loss": output}`` for a bare value."""
    if isinstance(output, Mapping):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        return output[0]
    return {"loss": output} if output is not None else {}


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines history file; a line that does not parse (a write cut short by a kill) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            logger.warning("%s: skipping a damaged row (%s...)", path, line[:60])
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)


class EpochMeans:
    """Average chosen entries of ``engine.state.output`` over an epoch into ``engine.state.metrics``.

    Tensors are summed on their device and read once at the epoch end, so the average costs no host sync per
    iteration (non-scalar tensors count with their mean).

    Args:
        names: output key -> metric name: a mapping, or a callable returning ``None`` for keys to leave out. Keys
            missing from an iteration's output are skipped (the greedy schedules only report what they train).
        weight_key: output key -> the output key of its weight (e.g. the number of known targets of a masked head
            loss, so the mean is over samples, not batches); ``None`` = weight 1. Entries of weight 0 are skipped.
        output_transform: ``engine.state.output`` -> mapping; default :func:`first_output`.
        drop_stale: at each epoch start remove the previous epoch's metrics, so a block a greedy schedule no longer
            trains is not logged again with an old value; False keeps them (Forward-Forward's goodness plot and
            summary read every layer's last value).
        write_metrics: False keeps the means in :attr:`last` only (a handler's private bookkeeping).

    Attributes:
        last: ``{metric name: mean}`` of the last completed epoch.
    """

    def __init__(
        self,
        names: Mapping[str, str] | Callable[[str], str | None],
        weight_key: Callable[[str], str | None] | None = None,
        output_transform: Callable[[Any], Mapping[str, Any]] = first_output,
        drop_stale: bool = True,
        write_metrics: bool = True,
    ) -> None:
        self.names = names.get if isinstance(names, Mapping) else names
        self.weight_key = weight_key
        self.output_transform = output_transform
        self.drop_stale = drop_stale
        self.write_metrics = write_metrics
        self.last: dict[str, float] = {}
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def reset(self, engine: Engine) -> None:
        if self.write_metrics and self.drop_stale:
            for name in self.last:
                engine.state.metrics.pop(name, None)
        self._sums.clear()
        self._counts.clear()

    def update(self, engine: Engine) -> None:
        out = self.output_transform(engine.state.output)
        for key, value in out.items():
            name = self.names(key)
            if name is None or not _is_number(value):
                continue
            w = 1.0
            if self.weight_key is not None and (wk := self.weight_key(key)) is not None and wk in out:
                w = float(out[wk])
                if w == 0:
                    continue
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean()
            term = value * w if w != 1.0 else value
            self._sums[name] = self._sums[name] + term if name in self._sums else term
            self._counts[name] = self._counts.get(name, 0.0) + w

    def complete(self, engine: Engine) -> None:
        self.last = {name: float(s) / max(self._counts[name], 1e-12) for name, s in self._sums.items()}
        if self.write_metrics:
            engine.state.metrics.update(self.last)


class HistoryWriter:
    """Per-epoch local record of a run: ``<output_dir>/<filename>`` (JSON lines) and ``<plot_filename>`` (curves).

    Each row holds ``run_id``, ``epoch``, ``train_loss`` (epoch mean of the step losses), ``lr`` (the rate used in
    the epoch), every other number in the trainer's ``state.metrics`` (the trainers' epoch means, the embedding
    monitor's kNN/probe scores, ``skipped_steps``, ...) and, in the epochs the validator ran, its metrics. Rows are
    appended, so a resumed run continues the file; ``run_id`` tells runs apart. A resumed run first removes the rows
    of the epochs it is about to train again (written after the resume checkpoint it starts from, by a run killed
    before its next checkpoint) and any row a kill cut short, so each epoch has one row. The curves (every ``*loss*``
    key and the validation AUC/accuracy/F1) are drawn when training completes, from the whole file.

    Also puts ``train_loss_epoch`` into the trainer's ``state.metrics`` so MLflow logs an epoch-level curve. Attach
    it after the ValidationHandler and the embedding monitor, before the MLflow handler (which uploads the files
    when the run completes). Writes on rank 0 only.

    Args:
        output_dir: folder of the two files.
        validator: the evaluator whose metrics join the rows of the epochs it ran.
        optimizer: read for ``lr`` (else the trainer's ``state.metrics["lr"]``, if any).
        run_id: stored in every row; ``None`` makes one (a uuid4 hex) per writer.
        title: title of the curves plot.
        filename: name of the JSON-lines file.
        plot_filename: name of the PNG.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        validator: Engine | None = None,
        optimizer: Any = None,
        run_id: str | None = None,
        title: str = "training",
        filename: str = "history.jsonl",
        plot_filename: str = "training_curves.png",
    ) -> None:
        self.dir = Path(output_dir)
        self.validator = validator
        self.optimizer = optimizer
        self.run_id = str(run_id) if run_id is not None else uuid.uuid4().hex
        self.title = title
        self.path = self.dir / filename
        self.plot_path = self.dir / plot_filename
        self.means = EpochMeans({"loss": "train_loss_epoch"})
        self._lr: float | None = None
        self._checked = False

    def attach(self, engine: Engine) -> None:
        self.means.attach(engine)
        engine.add_event_handler(Events.EPOCH_STARTED, self._drop_stale_rows)
        if self.optimizer is not None:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._remember_lr)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._plot)

    def _drop_stale_rows(self, engine: Engine) -> None:
        """At the first epoch of a resumed run (``ResumeHandler`` set the epoch counter, so it starts after epoch 1):
        keep only the rows of earlier epochs. A run killed after writing epoch e's row but before saving epoch e's
        checkpoint trains epoch e again when resumed; without this the file would hold it twice. A run that starts at
        epoch 1 appends to whatever the file holds."""
        if self._checked:
            return
        self._checked = True
        if engine.state.epoch <= 1 or not is_rank0() or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        rows = read_rows(self.path)
        keep = [r for r in rows if int(r.get("epoch", 0)) < engine.state.epoch]
        if len(keep) == len(lines):
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        logger.info("%s: removed %d row(s) of epochs >= %d (trained again by this resumed run) or cut short",
                    self.path, len(lines) - len(keep), engine.state.epoch)

    def _remember_lr(self, engine: Engine) -> None:
        self._lr = float(self.optimizer.param_groups[0]["lr"])  # the rate used this epoch, before the scheduler steps

    def row(self, engine: Engine) -> dict[str, Any]:
        """This epoch's row (also what :meth:`_write` appends)."""
        row: dict[str, Any] = {"run_id": self.run_id, "epoch": engine.state.epoch}
        if "train_loss_epoch" in self.means.last:
            row["train_loss"] = self.means.last["train_loss_epoch"]
        lr = self._lr if self._lr is not None else engine.state.metrics.get("lr")
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        if lr is not None:
            row["lr"] = float(lr)
        skip = {"train_loss_epoch", "lr", "epoch", "run_id"}
        row.update({k: float(v) for k, v in engine.state.metrics.items() if k not in skip and _is_number(v)})
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            row.update({k: float(v) for k, v in self.validator.state.metrics.items() if _is_number(v)})
        return row

    def _write(self, engine: Engine) -> None:
        if not is_rank0():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(self.row(engine)) + "\n")

    def _plot(self, engine: Engine) -> None:
        if not is_rank0() or not self.path.is_file():
            return
        rows = read_rows(self.path)
        losses = sorted({k for r in rows for k in r if "loss" in k and k != "train_loss"})
        keys = [k for k in ("train_loss", *losses, *VAL_CURVES) if any(k in r for r in rows)]
        plot_curves(rows, keys, self.plot_path, title=self.title)


class OverfitCheck:
    """The ``overfit`` switch's assertion (seed 001's sanity test): on a handful of images the pretraining loss must
    fall. At the end of training the mean loss of the last quarter of the epochs must be below ``max_ratio`` x the
    mean loss of the first quarter (windows, because the loss of a few augmented images is noisy from epoch to epoch).
    Writes the ratio to ``engine.state.metrics["overfit_loss_ratio"]``.

    Raises:
        AssertionError: naming both losses and what to try, so ``python -m monai.bundle run`` exits non-zero.
    """

    def __init__(self, max_ratio: float = 0.8, enabled: bool = True) -> None:
        self.max_ratio = max_ratio
        self.enabled = enabled
        self.epoch_losses: list[float] = []
        self.means = EpochMeans({"loss": "loss"}, write_metrics=False)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        self.means.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._check)

    def _epoch(self, engine: Engine) -> None:
        self.epoch_losses.append(self.means.last.get("loss", math.nan))

    def _check(self, engine: Engine) -> None:
        if len(self.epoch_losses) < 2:
            raise AssertionError("overfit check needs at least 2 epochs; raise `max_epochs`.")
        k = max(1, len(self.epoch_losses) // 4)
        first = sum(self.epoch_losses[:k]) / k
        last = sum(self.epoch_losses[-k:]) / k
        engine.state.metrics["overfit_loss_ratio"] = last / first
        if not last < self.max_ratio * first:
            raise AssertionError(
                f"overfit check failed: mean loss of the first {k} epoch(s) {first:.4f}, of the last {k} {last:.4f}: "
                f"not below {self.max_ratio} x the start. The model cannot fit {engine.state.epoch_length} batch(es) "
                "of a handful of images: check the augmentations, `learning_rate`, `temperature` and the loss, or "
                "raise `max_epochs`."
            )
        logger.info("overfit check passed: loss %.4f -> %.4f (%.2f x, first/last %d epochs) in %d epochs",
                    first, last, last / first, k, len(self.epoch_losses))
