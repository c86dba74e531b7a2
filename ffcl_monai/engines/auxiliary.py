"""Auxiliary targets (seed 004, Awatramani et al., "In-domain Model Pre-training for Chest X-Rays"):

- :class:`AuxiliaryTrainer`, pretraining (Sec. 4.1/5.1): a backbone learns to predict metadata carried in the
  datalist -- e.g. view (cross-entropy), sex (binary cross-entropy) and age (smooth L1) -- and is then fine-tuned on
  the target labels with train.yaml's ``pretrained_ckpt``;
- :class:`MultiTaskTrainer`, fine-tuning with auxiliary losses (Sec. 5.2): the pathology loss plus the weighted
  auxiliary losses, on :class:`~ffcl_monai.networks.classifier.MultiTaskClassifier` (``bundle/configs/multitask.yaml``).

Missing metadata (``null`` in the datalist) becomes NaN (:class:`~ffcl_monai.data.transforms.MetadataToTensord`) and
is masked out of its head's loss (:class:`ffcl_monai.losses.auxiliary.MaskedMultiHeadLoss`), so images with partial
metadata still train the heads they have values for. The network is
:class:`~ffcl_monai.networks.projection.MultiHeadModel` (heads from
:func:`~ffcl_monai.networks.projection.head_outputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ffcl_monai.engines.base import BaseTrainer, plain
from ffcl_monai.losses.auxiliary import MaskedMultiHeadLoss, MultiTaskLoss

__all__ = ["AuxiliaryTrainer", "MultiTaskTrainer", "PrepareTargetsBatch"]


class PrepareTargetsBatch:
    """MONAI ``prepare_batch`` for auxiliary targets: ``(image, {field: target})`` on the device.

    Fields absent from the batch are left out; the loss names the missing one.

    Args:
        image_key: the batch key of the image.
        target_keys: the metadata fields (the loss's heads).
    """

    def __init__(self, image_key: str = "image", target_keys: Sequence[str] = ()) -> None:
        self.image_key = image_key
        self.target_keys = tuple(target_keys)

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def to(x: Any) -> torch.Tensor:
            return torch.as_tensor(plain(x)).to(device=device, non_blocking=non_blocking, **kwargs)

        targets = {k: to(batchdata[k]) for k in self.target_keys if k in batchdata}
        return to(batchdata[self.image_key]), targets


def head_report(loss_function: Any) -> dict[str, Any]:
    """Per auxiliary head, the last batch's ``loss_<field>`` (NaN when no target was known) and ``known_<field>``
    (how many targets were known: the weight of the epoch mean), read from ``loss_function.last``."""
    last = loss_function.last
    report: dict[str, Any] = {}
    for name in loss_function.heads:
        report[f"loss_{name}"] = last.get(f"loss_{name}", float("nan"))
        report[f"known_{name}"] = last.get(f"known_{name}", 0.0)
    return report


class AuxiliaryTrainer(BaseTrainer):
    """Trainer for multi-head auxiliary-target pretraining, a :class:`~ffcl_monai.engines.base.BaseTrainer`.

    ``network(image) -> {field: prediction}``; ``loss_function(preds, targets) -> scalar`` (a
    :class:`MaskedMultiHeadLoss`). Output: MONAI's ``image``/``label`` (the targets)/``pred``/``loss``, plus
    ``loss_<field>`` and ``known_<field>`` (targets present in the batch) per head. At every epoch end, before the
    config's handlers run: ``aux_loss_<field>`` (mean over the samples with a known target), ``lr``, ``skipped_steps``.

    ``amp`` turns autocast on in ``amp_dtype`` (``bfloat16``, or ``float16`` with a gradient scaler kept as
    ``self.scaler``; :class:`~ffcl_monai.engines.precision.Precision`). ``prepare_batch`` defaults to
    :class:`PrepareTargetsBatch` over ``image_key`` and the loss's heads; ``kwargs`` go to the base class.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: MaskedMultiHeadLoss,
        image_key: str = "image",
        prepare_batch: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_key = image_key
        heads = list(loss_function.heads)
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, loss_function,
            prepare_batch=prepare_batch if prepare_batch is not None else PrepareTargetsBatch(image_key, heads),
            # per head, weighted by its known targets: the epoch mean is over samples, not over batches
            epoch_metrics={f"loss_{h}": f"aux_loss_{h}" for h in heads},
            epoch_metric_weights=lambda key: f"known_{key[len('loss_'):]}",
            **kwargs,
        )

    def compute_loss(self, pred: Any, targets: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = self.loss_function(pred, targets)
        return loss, {"loss": loss.detach(), **head_report(self.loss_function)}


class MultiTaskTrainer(BaseTrainer):
    """Fine-tuning with auxiliary losses (seed 004, Sec. 5.2), a :class:`~ffcl_monai.engines.base.BaseTrainer`.

    The batch carries the pathology label and the auxiliary targets: ``prepare_batch`` (default
    :class:`PrepareTargetsBatch` over ``label_key`` and the loss's heads) gives ``(image, {label, field: target})``,
    so MONAI handlers see ``engine.state.output["label"]`` as that mapping. ``network(image) -> {label: logits,
    field: prediction}`` (:class:`~ffcl_monai.networks.classifier.MultiTaskClassifier`); ``loss_function(preds,
    targets)`` is a :class:`~ffcl_monai.losses.auxiliary.MultiTaskLoss`. Output: MONAI's ``image``/``label``/
    ``pred``/``loss``, plus ``loss_<label_key>`` (the pathology loss alone) and ``loss_<field>``/``known_<field>`` per
    auxiliary head. At every epoch end: ``task_loss`` (mean pathology loss per sample), ``aux_loss_<field>`` (mean
    over the samples with a known target), ``lr``, ``skipped_steps``.

    Validation, model selection and the saved model stay the pathology classifier: the config's evaluator and
    checkpoint savers hold the plain classifier inside the multi-task network, never this trainer's network.
    """

    missing_targets_message = "multi-task fine-tuning needs `label` and the auxiliary targets in every batch."

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: MultiTaskLoss,
        image_key: str = "image",
        prepare_batch: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_key = image_key
        self.label_key = loss_function.label_key
        heads = list(loss_function.heads)
        names = {f"loss_{self.label_key}": "task_loss", **{f"loss_{h}": f"aux_loss_{h}" for h in heads}}
        super().__init__(
            device, max_epochs, train_data_loader, network, optimizer, loss_function,
            prepare_batch=(prepare_batch if prepare_batch is not None
                           else PrepareTargetsBatch(image_key, [self.label_key, *heads])),
            epoch_metrics=names,
            # per head, weighted by its known targets (the pathology loss by the batch size)
            epoch_metric_weights=lambda key: f"known_{key[len('loss_'):]}",
            **kwargs,
        )

    def compute_loss(self, pred: Any, targets: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.label_key not in targets:
            raise ValueError(self.missing_targets_message)
        loss = self.loss_function(pred, targets)
        last = self.loss_function.last
        report: dict[str, Any] = {
            "loss": loss.detach(),
            f"loss_{self.label_key}": last[f"loss_{self.label_key}"],
            f"known_{self.label_key}": float(len(targets[self.label_key])),
        }
        return loss, {**report, **head_report(self.loss_function)}
