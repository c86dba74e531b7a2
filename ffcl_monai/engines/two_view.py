"""One MONAI/Ignite trainer for two-view self-supervised pretraining; the loss is a parameter.

- SimCLR (Chen et al. 2020): ``loss_function = NTXentLoss`` on the projections z of both views.
- Barlow Twins (Zbontar et al. 2021): ``loss_function = BarlowTwinsLoss``.

Any ``loss(z1, z2) -> scalar`` fits. :class:`TwoViewTrainer` is a :class:`~ffcl_monai.engines.base.BaseTrainer`
(prepare_batch, MONAI IterationEvents, mixed precision, the non-finite-step guard, ``lr`` and ``skipped_steps`` in
``engine.state.metrics`` at every epoch end before any config handler runs). Its batches go through
:class:`PrepareTwoViewBatch` (the ``view1``/``view2`` keys of :class:`~ffcl_monai.data.two_view.TwoViewd`) unless the
config passes its own ``prepare_batch``. ``engine.state.output`` holds MONAI's ``image`` (the two views), ``pred``
(``(h1, z1, z2)``) and ``loss``, plus ``h`` (backbone features) and ``z`` (projections) of view 1, detached float32,
for the collapse monitor.

Optimizers and schedules (Adam, LARS for large-batch SimCLR, warm-up + cosine): :mod:`ffcl_monai.engines.optimizers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ffcl_monai.engines.base import BaseTrainer, plain


class PrepareTwoViewBatch:
    """MONAI ``prepare_batch`` for two-view batches: ``((view1, view2), None)`` on the device, no targets.

    Args:
        view_keys: the two batch keys holding the views (:class:`~ffcl_monai.data.two_view.TwoViewd` writes
            ``view1`` and ``view2``).
    """

    def __init__(self, view_keys: Sequence[str] = ("view1", "view2")) -> None:
        self.view_keys = tuple(view_keys)
        if len(self.view_keys) != 2:
            raise ValueError(f"two-view batches need exactly two view keys, got {self.view_keys}.")

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[tuple[torch.Tensor, torch.Tensor], None]:
        missing = [k for k in self.view_keys if k not in batchdata]
        if missing:
            raise KeyError(f"batch has no {missing}; the two-view dataset must produce {self.view_keys} (TwoViewd).")
        # MetaTensor -> Tensor before the copy: the metadata is unused and costs time in every op
        x1, x2 = (torch.as_tensor(plain(batchdata[k])).to(device=device, non_blocking=non_blocking, **kwargs)
                  for k in self.view_keys)
        return (x1, x2), None


class TwoViewTrainer(BaseTrainer):
    """Trainer for two-view pretraining (SimCLR, Barlow Twins, ...).

    Args:
        device: training device.
        max_epochs: epochs.
        train_data_loader: yields dicts with ``view_keys``.
        network: module whose ``forward(x)`` returns ``(h, z)`` (:class:`ffcl_monai.networks.projection.ContrastiveModel`).
        optimizer: optimizer over the network's parameters.
        loss_function: ``loss(z1, z2)``.
        view_keys: the two batch keys holding the views (used by the default ``prepare_batch``).
        concat_views: one forward pass over both views concatenated (BatchNorm statistics over 2B images, like
            SimCLR's implementation); False = one pass per view (per-view BatchNorm, like Barlow Twins').
        amp: autocast on the training device (losses still run in float32, see their docstrings).
        train_handlers: MONAI/Ignite handlers.
        epoch_length: iterations per epoch (default: len(loader)).
        non_blocking: asynchronous host-to-device copies.
        amp_dtype: ``bfloat16`` (no gradient scaler: bf16 has float32's exponent range) or ``float16`` (adds a
            :class:`torch.amp.GradScaler`, kept as ``self.scaler``); :class:`~ffcl_monai.engines.precision.Precision`.
        prepare_batch: MONAI-style batch preparation returning ``((x1, x2), None)``; default
            :class:`PrepareTwoViewBatch` over ``view_keys``.
        kwargs: :class:`~ffcl_monai.engines.base.BaseTrainer` arguments (``max_skipped_steps``, ``max_grad_norm``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        view_keys: Sequence[str] = ("view1", "view2"),
        concat_views: bool = True,
        prepare_batch: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        self.view_keys = tuple(view_keys)
        self.concat_views = concat_views
        prepare_batch = prepare_batch if prepare_batch is not None else PrepareTwoViewBatch(self.view_keys)
        super().__init__(device, max_epochs, train_data_loader, network, optimizer, loss_function,
                         prepare_batch=prepare_batch, **kwargs)

    def embed(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h1, z1, z2) for a batch of view pairs."""
        if self.concat_views:
            h, z = self.network(torch.cat([x1, x2], dim=0))
            n = x1.shape[0]
            return h[:n], z[:n], z[n:]
        h1, z1 = self.network(x1)
        _, z2 = self.network(x2)
        return h1, z1, z2

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return self.embed(*inputs)

    def compute_loss(self, pred: tuple[torch.Tensor, ...], targets: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        h1, z1, z2 = pred
        loss = self.loss_function(z1, z2)
        return loss, {"loss": loss.detach(), "h": h1.detach().float(), "z": z1.detach().float()}
