"""Auxiliary-target supervised pretraining (seed 004, Awatramani et al., "In-domain Model Pre-training for Chest
X-Rays", Sec. 4.1/5.1): a backbone learns to predict metadata carried in the datalist -- e.g. view (cross-entropy),
sex (binary cross-entropy) and age (smooth L1) -- and is then fine-tuned on the target labels with train.yaml's
``pretrained_ckpt``.

Missing metadata (``null`` in the datalist) becomes NaN here and is masked out of its head's loss
(:class:`ffcl_monai.losses.auxiliary.MaskedMultiHeadLoss`), so images with partial metadata still train the heads
they have values for.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.transforms import MapTransform
from torch import nn
from torch.optim import Optimizer

from ffcl_monai.engines.precision import PrecisionTrainerMixin
from ffcl_monai.losses.auxiliary import MaskedMultiHeadLoss, parse_heads


def head_outputs(heads: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """``{field: number of outputs}`` for :class:`ffcl_monai.networks.projection.MultiHeadModel` from `aux_heads`."""
    return {k: spec.num_outputs for k, spec in parse_heads(heads).items()}


class MetadataToTensord(MapTransform):
    """Metadata fields -> float32 scalars, ``None``/missing -> NaN (masked by the loss), so batches collate."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            value = d.get(key)
            try:
                v = float("nan") if value is None else float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"metadata field {key!r} of {d.get('image')} is {value!r}; auxiliary targets must be numbers or null "
                    "(view as a class index, sex as 0/1, age in years)."
                ) from None
            d[key] = torch.tensor(v, dtype=torch.float32)
        return d


def check_metadata(items: Sequence[Mapping[str, Any]], heads: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Fail early when an `aux_heads` field is absent from every datalist entry (a typo, or the wrong datalist)."""
    items = [dict(d) for d in items]
    for field in heads:
        known = sum(1 for d in items if d.get(field) is not None)
        if known == 0:
            raise ValueError(
                f"no entry of the datalist has a value for auxiliary target {field!r}. Add it to the datalist "
                f"(e.g. data_prep's metadata columns) or remove it from `aux_heads`."
            )
    return items


class AuxiliaryTrainer(PrecisionTrainerMixin, Trainer):
    """Trainer for multi-head auxiliary-target pretraining.

    ``network(image) -> {field: prediction}``; ``loss_function(preds, targets) -> scalar`` (a
    :class:`MaskedMultiHeadLoss`). Output: ``{"loss", "loss_<field>" ...}``; per-epoch means of every head's loss
    and the learning rate go to ``engine.state.metrics`` before the user's handlers run.

    ``amp`` turns autocast on in ``amp_dtype`` (``bfloat16``, or ``float16`` with a gradient scaler kept as
    ``self.scaler``; :class:`~ffcl_monai.engines.precision.Precision`).
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
        amp: bool = False,
        train_handlers: Sequence | None = None,
        epoch_length: int | None = None,
        amp_dtype: str | torch.dtype = "bfloat16",
    ) -> None:
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader,
                         epoch_length=epoch_length, amp=amp, decollate=False)
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.image_key = image_key
        self._init_precision(amp, amp_dtype)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self.add_event_handler(Events.EPOCH_STARTED, self._reset)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_metrics)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._counts = {}, {}

    def _epoch_metrics(self, engine: Engine) -> None:
        for name, total in self._sums.items():
            n = self._counts.get(name, 0)
            engine.state.metrics[f"aux_{name}"] = total / n if n else float("nan")
        engine.state.metrics["lr"] = float(self._lr) if hasattr(self, "_lr") else float(self.optimizer.param_groups[0]["lr"])

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        device = engine.state.device
        x = batchdata[self.image_key]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)).to(device)
        targets = {k: torch.as_tensor(batchdata[k]).to(device) for k in self.loss_function.heads if k in batchdata}
        self._lr = self.optimizer.param_groups[0]["lr"]
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            preds = self.network(x)
            loss = self.loss_function(preds, targets)
        self.precision.backward_step(loss, self.optimizer)
        out: dict[str, Any] = {"loss": loss.detach()}
        for name in self.loss_function.heads:
            n = self.loss_function.last.get(f"known_{name}", 0.0)
            value = self.loss_function.last.get(f"loss_{name}", float("nan"))
            out[f"loss_{name}"] = value
            if n > 0 and math.isfinite(value):
                # weight by the number of known targets: the epoch mean is over samples, not over batches
                self._sums[f"loss_{name}"] = self._sums.get(f"loss_{name}", 0.0) + value * n
                self._counts[f"loss_{name}"] = self._counts.get(f"loss_{name}", 0.0) + n
        return out
