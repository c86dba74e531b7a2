"""FFCL's two pretraining stages as MONAI/Ignite trainers (seed 000, Methods and Fig. 1).

- :class:`LocalContrastiveTrainer`: every block B_i of a :class:`~ffcl_monai.networks.backbones.Backbone` is trained
  by its own Eq. 1 loss on its embedding E_i (block output after ReLU, globally average-pooled). Block inputs are
  detached (``Backbone.block_embeddings(x, detach_inputs=True)``), so no gradient crosses blocks.
  - ``schedule="single_pass"`` (default): one forward pass per batch, the per-block losses summed, one backward and
    one optimizer step update all blocks at once. Because the graphs are disjoint, the gradient each block receives
    from the sum is exactly the gradient of its own loss. This is the paper's "can be extended to train end-to-end"
    and costs about one supervised step, unlike the authors' notebook, which steps the optimizer once per layer.
  - ``schedule="greedy"``: block after block for fidelity studies. The epochs are split evenly over the blocks;
    blocks already trained run frozen (eval mode, no grad), later blocks are not run at all.
- :class:`GlobalContrastiveTrainer`: Eq. 1 on the final embedding (pooled backbone output, optionally through a
  projection head, :class:`~ffcl_monai.networks.projection.GlobalContrastModel`), trained end to end.

Both are :class:`~ffcl_monai.engines.base.BaseTrainer` s (prepare_batch, MONAI IterationEvents, mixed precision, the
non-finite-step guard). They put MONAI's ``image``/``label``/``pred`` and ``{"loss": ..., ...}`` in
``engine.state.output`` and write per-epoch means to ``engine.state.metrics`` (``local_loss`` and
``local_loss_<block>`` / ``global_loss``, with ``lr`` and ``skipped_steps``) *before* any handler from the config
runs, so MONAI's ``MLFlowHandler``/``StatsHandler`` log them per epoch.

Mixed precision: ``amp`` runs the forward pass under autocast in ``amp_dtype``; the default ``None`` turns it on only
on CUDA. ``bfloat16`` (default) needs no GradScaler; ``float16`` adds one (:class:`~ffcl_monai.engines.precision.Precision`,
kept as ``self.scaler``). The Eq. 1 loss is always computed in float32.

Distributed: when ``torch.distributed`` is initialised (torchrun), the local trainer wraps *each block* in
``DistributedDataParallel`` (the engine calls blocks one by one through ``forward_blocks``, which would bypass a DDP
wrapper around the whole backbone and leave gradients unreduced); the global trainer wraps the whole model.
``ddp_kwargs`` (e.g. ``{"find_unused_parameters": True}``) go to every wrapper. The unwrapped modules stay the ones
that are saved (:class:`~ffcl_monai.handlers.checkpoint.BackboneSaver`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ffcl_monai.engines.base import BaseTrainer
from ffcl_monai.losses.ffcl_pair import FFCLPairLoss
from ffcl_monai.networks.backbones import Backbone, as_backbone
from ffcl_monai.networks.projection import GlobalContrastModel

SCHEDULES = ("single_pass", "greedy")

__all__ = [
    "SCHEDULES",
    "LocalContrastiveTrainer",
    "GlobalContrastiveTrainer",
    "local_step_per_block",
]

#: Eq. 1 needs class labels; raised when a batch has none
MISSING_LABELS = "FFCL's Eq. 1 needs class labels: the datalist entries of the pretraining split must have `label`."


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ddp(module: nn.Module, device: torch.device, ddp_kwargs: dict[str, Any]) -> DistributedDataParallel:
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **ddp_kwargs)


class LocalContrastiveTrainer(BaseTrainer):
    """FFCL stage 1: local per-block contrastive learning (Eq. 1 on every block's embedding E_i).

    Args:
        device: torch device.
        max_epochs: epochs of the local stage (greedy: split evenly over the blocks, at least one per block).
        train_data_loader: batches of ``{"image", "label"}``.
        network: a :class:`Backbone` or a model with ``.backbone`` (e.g. ``Classifier``); only the backbone trains.
        optimizer: optimizer over the backbone's parameters (one optimizer is fine: blocks never share gradients).
        loss_function: Eq. 1 module, default :class:`FFCLPairLoss()`.
        schedule: ``"single_pass"`` or ``"greedy"``.
        amp: autocast (default: on only on CUDA).
        amp_dtype: ``bfloat16`` or ``float16`` (adds a gradient scaler); config key ``amp_dtype``.
        ddp_kwargs: extra arguments of the per-block ``DistributedDataParallel`` wrappers under torchrun.
        train_handlers, epoch_length, prepare_batch, non_blocking: as MONAI's ``SupervisedTrainer``.
        kwargs: :class:`~ffcl_monai.engines.base.BaseTrainer` arguments (``max_skipped_steps``, ...).
    """

    missing_targets_message = MISSING_LABELS

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        schedule: str = "single_pass",
        ddp_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"local schedule must be one of {SCHEDULES}, got {schedule!r}; set `local_schedule`.")
        backbone = as_backbone(network)
        n = len(backbone.blocks)
        if schedule == "greedy" and max_epochs < n:
            raise ValueError(
                f"the greedy schedule trains the {n} blocks one after another and needs at least {n} epochs, got "
                f"max_epochs={max_epochs}; raise `local#max_epochs` or use `local#schedule: single_pass`."
            )
        self.backbone = backbone
        self.schedule = schedule
        self.block_names = list(backbone.block_names)
        names = set(self.block_names)
        device = torch.device(device)
        if _dist_on():
            # A Backbone whose blocks are per-block DDP wrappers around the same modules: forward_blocks then goes
            # through DDP, so gradients are all-reduced, and saving still uses self.backbone (no "module." keys).
            runner: Backbone = Backbone(
                [_ddp(b, device, dict(ddp_kwargs or {})) for b in backbone.blocks],
                backbone.block_names,
                backbone.block_channels,
                backbone.name,
                backbone.spatial_dims,
                backbone.in_channels,
            )
        else:
            runner = backbone
        self.runner = runner
        super().__init__(
            device, max_epochs, train_data_loader, backbone, optimizer,
            loss_function if loss_function is not None else FFCLPairLoss(),
            epoch_metrics=lambda k: (
                "local_loss" if k == "loss" else (f"local_{k}" if k.startswith("loss_") and k[5:] in names else None)
            ),
            **kwargs,
        )

    def current_block(self) -> int | None:
        """Index of the block the greedy schedule trains in the current epoch (None for single_pass)."""
        if self.schedule != "greedy":
            return None
        n = len(self.block_names)
        per_block = max(1, self.state.max_epochs // n)
        return min((max(self.state.epoch, 1) - 1) // per_block, n - 1)

    def _trained_names(self) -> list[str]:
        if self.schedule == "single_pass":
            return self.block_names
        k = self.current_block()
        assert k is not None
        return [self.block_names[k]]

    def train_mode(self) -> None:
        if self.schedule == "single_pass":
            self.network.train()
            return
        k = self.current_block()
        assert k is not None
        for i in range(k):
            # Trained blocks are frozen, BatchNorm statistics included.
            self.backbone.blocks[i].eval()
        self.backbone.blocks[k].train()

    def forward(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The embeddings E_i of the blocks trained this iteration (all blocks, or the greedy schedule's one)."""
        if self.schedule == "single_pass":
            return self.runner.block_embeddings(inputs, detach_inputs=True)
        k = self.current_block()
        assert k is not None
        blocks = self.runner.blocks
        x = inputs
        with torch.no_grad():
            for i in range(k):
                x = blocks[i](x)
        out = blocks[k](x.detach())
        return [torch.relu(out).flatten(2).mean(dim=2)]

    def compute_loss(self, pred: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        losses = torch.stack([self.loss_function(e, targets) for e in pred])
        report: dict[str, Any] = {f"loss_{n}": v for n, v in zip(self._trained_names(), losses.detach())}
        # The sum gives every block exactly its own gradient (disjoint graphs); the logged "loss" is the mean so that
        # it reads on the same 0..1 scale as each block's Eq. 1 value.
        report["loss"] = losses.detach().mean()
        return losses.sum(), report


class GlobalContrastiveTrainer(BaseTrainer):
    """FFCL stage 2: Eq. 1 on the final embedding, trained end to end with back-propagation.

    Args:
        network: a :class:`GlobalContrastModel`, a :class:`Backbone` or a model with ``.backbone`` (the latter two
            are wrapped without projection head).
        Other arguments as :class:`LocalContrastiveTrainer`.
    """

    missing_targets_message = MISSING_LABELS

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        model = network if isinstance(network, GlobalContrastModel) else GlobalContrastModel(network)
        self.model = model
        self.backbone = model.backbone
        device = torch.device(device)
        self.runner: nn.Module = _ddp(model, device, dict(ddp_kwargs or {})) if _dist_on() else model
        super().__init__(
            device, max_epochs, train_data_loader, model, optimizer,
            loss_function if loss_function is not None else FFCLPairLoss(),
            epoch_metrics={"loss": "global_loss"},
            **kwargs,
        )

    def forward(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.runner(inputs)  # the DDP wrapper under torchrun


def local_step_per_block(
    backbone: Backbone,
    optimizer: torch.optim.Optimizer,
    loss_function: Callable,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> list[float]:
    """The authors' notebook style of the local stage, for comparison only (bench, fidelity studies).

    Each block gets its own forward, backward and optimizer step before the (detached) output moves on to the next
    block: n optimizer steps per batch instead of one.
    """
    backbone.train()
    x = inputs
    losses = []
    for block in backbone.blocks:
        out = block(x.detach())
        loss = loss_function(torch.relu(out).flatten(2).mean(dim=2), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        x = out
    return losses
