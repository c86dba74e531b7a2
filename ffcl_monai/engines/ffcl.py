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
  projection head, :class:`GlobalContrastModel`), trained end to end.

Both put ``{"loss": ..., ...}`` in ``engine.state.output`` and write per-epoch means to ``engine.state.metrics``
(``local_loss`` and ``local_loss_<block>`` / ``global_loss``) *before* any handler from the config runs, so MONAI's
``MLFlowHandler``/``StatsHandler`` log them per epoch.

Mixed precision: ``amp`` runs the forward pass under autocast in ``amp_dtype``; the default ``None`` turns it on only
on CUDA. ``bfloat16`` (default) needs no GradScaler; ``float16`` adds one (:class:`~ffcl_monai.engines.precision.Precision`,
kept as ``self.scaler``). The Eq. 1 loss is always computed in float32.

Distributed: when ``torch.distributed`` is initialised (torchrun), the local trainer wraps *each block* in
``DistributedDataParallel`` (the engine calls blocks one by one through ``forward_blocks``, which would bypass a DDP
wrapper around the whole backbone and leave gradients unreduced); the global trainer wraps the whole model.
``ddp_kwargs`` (e.g. ``{"find_unused_parameters": True}``) go to every wrapper. The unwrapped modules stay the ones
that are saved.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import default_prepare_batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ffcl_monai.data.distributed import unwrap_module
from ffcl_monai.engines.precision import PrecisionTrainerMixin
from ffcl_monai.losses.ffcl_pair import FFCLPairLoss
from ffcl_monai.networks.backbones import Backbone
from ffcl_monai.networks.checkpoints import load_backbone, save_backbone

logger = logging.getLogger(__name__)

SCHEDULES = ("single_pass", "greedy")

__all__ = [
    "SCHEDULES",
    "EpochMeans",
    "GlobalContrastModel",
    "LocalContrastiveTrainer",
    "GlobalContrastiveTrainer",
    "BackboneSaver",
    "StageHistory",
    "init_backbone",
    "as_backbone",
    "default_amp",
    "local_step_per_block",
]


def default_amp(device: torch.device | str | None) -> bool:
    """Autocast is on by default only on CUDA (CPU bf16 is slower than fp32 on most CPUs)."""
    return device is not None and torch.device(device).type == "cuda"


def as_backbone(network: nn.Module) -> Backbone:
    """The :class:`Backbone` inside ``network`` (itself, ``.backbone``, or inside a DDP / compile wrapper)."""
    net = unwrap_module(network)
    if isinstance(net, Backbone):
        return net
    bb = getattr(net, "backbone", None)
    if isinstance(bb, Backbone):
        return bb
    raise TypeError(
        f"FFCL needs a ffcl_monai Backbone (with .blocks) or a model with .backbone, got {type(net).__name__}; "
        "build the network with ffcl_monai.networks.backbones.build_backbone or Classifier."
    )


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ddp(module: nn.Module, device: torch.device, ddp_kwargs: dict[str, Any]) -> DistributedDataParallel:
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **ddp_kwargs)


class EpochMeans:
    """Average chosen entries of ``engine.state.output`` over an epoch into ``engine.state.metrics``.

    Args:
        rename: maps an output key to the metric name; keys missing from an iteration's output are skipped (the
            greedy schedule only reports the block it trains).
    """

    def __init__(self, rename: Callable[[str], str | None]) -> None:
        self.rename = rename
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def reset(self, engine: Engine) -> None:
        # Drop last epoch's values, so that a block the greedy schedule no longer trains is not logged again.
        for name in self._sums:
            engine.state.metrics.pop(name, None)
        self._sums.clear()
        self._counts.clear()

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        if not isinstance(out, dict):
            return
        for k, v in out.items():
            name = self.rename(k)
            if name is None:
                continue
            self._sums[name] += float(v)
            self._counts[name] += 1

    def complete(self, engine: Engine) -> None:
        for name, s in self._sums.items():
            engine.state.metrics[name] = s / max(self._counts[name], 1)


class _ContrastiveTrainerBase(PrecisionTrainerMixin, SupervisedTrainer):
    """Shared set-up: mixed precision (``self.precision``), epoch means registered before the config's handlers."""

    epoch_means: EpochMeans

    def __init__(self, *args: Any, amp: bool | None = None, amp_dtype: str | torch.dtype = "bfloat16",
                 train_handlers: Sequence | None = None, **kwargs: Any):
        # MONAI's own `amp` autocasts "cuda" only and always adds a CUDA GradScaler; self.precision does both for the
        # training device and dtype instead, so MONAI's flag stays off.
        super().__init__(*args, amp=False, decollate=False, train_handlers=train_handlers, **kwargs)
        self._init_precision(default_amp(self.state.device) if amp is None else amp, amp_dtype)
        self._attach_epoch_means()

    @property
    def bf16(self) -> bool:
        """Autocast is on in bfloat16."""
        return self.precision.enabled and self.precision.dtype == torch.bfloat16

    def _attach_epoch_means(self) -> None:
        if not getattr(self, "_epoch_means_attached", False):
            self.epoch_means.attach(self)
            self._epoch_means_attached = True

    def _register_handlers(self, handlers: Sequence) -> None:
        # Epoch means must land in state.metrics before MLFlowHandler/StatsHandler read them at EPOCH_COMPLETED;
        # Ignite calls handlers in registration order, so ours go first.
        self._attach_epoch_means()
        super()._register_handlers(handlers)

    def _batch(self, batchdata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        inputs, targets = batch[0], batch[1]
        if targets is None:
            raise ValueError(
                "FFCL's Eq. 1 needs class labels: the datalist entries of the pretraining split must have `label`."
            )
        # MetaTensor -> Tensor: metadata is useless here and costs time in every op.
        inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        targets = targets.as_tensor() if hasattr(targets, "as_tensor") else targets
        return inputs, targets


class LocalContrastiveTrainer(_ContrastiveTrainerBase):
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
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        schedule: str = "single_pass",
        amp: bool | None = None,
        amp_dtype: str | torch.dtype = "bfloat16",
        ddp_kwargs: dict[str, Any] | None = None,
        train_handlers: Sequence | None = None,
        epoch_length: int | None = None,
        prepare_batch: Callable = default_prepare_batch,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"local schedule must be one of {SCHEDULES}, got {schedule!r}; set `local#schedule`.")
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
        self.epoch_means = EpochMeans(
            lambda k: "local_loss" if k == "loss" else (f"local_{k}" if k[5:] in names and k.startswith("loss_") else None)
        )
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
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=backbone,
            optimizer=optimizer,
            loss_function=loss_function if loss_function is not None else FFCLPairLoss(),
            epoch_length=epoch_length,
            prepare_batch=prepare_batch,
            non_blocking=non_blocking,
            train_handlers=train_handlers,
            amp=amp,
            amp_dtype=amp_dtype,
            **kwargs,
        )

    def current_block(self) -> int | None:
        """Index of the block the greedy schedule trains in the current epoch (None for single_pass)."""
        if self.schedule != "greedy":
            return None
        n = len(self.block_names)
        per_block = max(1, self.state.max_epochs // n)
        return min((max(self.state.epoch, 1) - 1) // per_block, n - 1)

    def _iteration(self, engine: Engine, batchdata: Any) -> dict[str, Any]:
        inputs, targets = self._batch(batchdata)
        self.optimizer.zero_grad(set_to_none=True)
        if self.schedule == "single_pass":
            self.network.train()
            with self.precision.autocast():
                embs = self.runner.block_embeddings(inputs, detach_inputs=True)
            losses = [self.loss_function(e, targets) for e in embs]
            names = self.block_names
        else:
            k = self.current_block()
            assert k is not None
            losses, names = [self._greedy_block_loss(inputs, targets, k)], [self.block_names[k]]
        # The sum gives every block exactly its own gradient (disjoint graphs); the logged "loss" is the mean so that
        # it reads on the same 0..1 scale as each block's Eq. 1 value.
        self.precision.backward_step(torch.stack(losses).sum(), self.optimizer)
        out: dict[str, Any] = {f"loss_{n}": float(l.detach()) for n, l in zip(names, losses)}
        out["loss"] = sum(out.values()) / len(losses)
        return out

    def _greedy_block_loss(self, inputs: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
        blocks = self.runner.blocks
        with self.precision.autocast():
            x = inputs
            with torch.no_grad():
                for i in range(k):
                    # Trained blocks are frozen, BatchNorm statistics included.
                    self.backbone.blocks[i].eval()
                    x = blocks[i](x)
            self.backbone.blocks[k].train()
            out = blocks[k](x.detach())
        return self.loss_function(torch.relu(out).flatten(2).mean(dim=2), targets)


class GlobalContrastModel(nn.Module):
    """Backbone + optional projection head; ``forward`` returns the final embedding used by the global stage.

    Args:
        backbone: the backbone (its pooled output is the embedding).
        projection: ``"none"`` (the pooled features themselves), ``"linear"``, or ``"mlp"`` (Linear-ReLU-Linear).
        proj_dim: output size of the head.
    """

    def __init__(self, backbone: nn.Module, projection: str = "none", proj_dim: int = 128) -> None:
        super().__init__()
        self.backbone = as_backbone(backbone)
        d = self.backbone.feature_dim
        if projection == "none":
            self.head: nn.Module = nn.Identity()
        elif projection == "linear":
            self.head = nn.Linear(d, proj_dim)
        elif projection == "mlp":
            self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))
        else:
            raise ValueError(f"projection must be none, linear or mlp, got {projection!r}; set `global#projection`.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class GlobalContrastiveTrainer(_ContrastiveTrainerBase):
    """FFCL stage 2: Eq. 1 on the final embedding, trained end to end with back-propagation.

    Args:
        network: a :class:`GlobalContrastModel`, a :class:`Backbone` or a model with ``.backbone`` (the latter two
            are wrapped without projection head).
        Other arguments as :class:`LocalContrastiveTrainer`.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        amp: bool | None = None,
        amp_dtype: str | torch.dtype = "bfloat16",
        ddp_kwargs: dict[str, Any] | None = None,
        train_handlers: Sequence | None = None,
        epoch_length: int | None = None,
        prepare_batch: Callable = default_prepare_batch,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> None:
        model = network if isinstance(network, GlobalContrastModel) else GlobalContrastModel(network)
        self.model = model
        self.backbone = model.backbone
        self.epoch_means = EpochMeans(lambda k: "global_loss" if k == "loss" else None)
        device = torch.device(device)
        self.runner: nn.Module = _ddp(model, device, dict(ddp_kwargs or {})) if _dist_on() else model
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=model,
            optimizer=optimizer,
            loss_function=loss_function if loss_function is not None else FFCLPairLoss(),
            epoch_length=epoch_length,
            prepare_batch=prepare_batch,
            non_blocking=non_blocking,
            train_handlers=train_handlers,
            amp=amp,
            amp_dtype=amp_dtype,
            **kwargs,
        )

    def _iteration(self, engine: Engine, batchdata: Any) -> dict[str, Any]:
        inputs, targets = self._batch(batchdata)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            emb = self.runner(inputs)
        loss = self.loss_function(emb, targets)
        self.precision.backward_step(loss, self.optimizer)
        return {"loss": float(loss.detach())}


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


class BackboneSaver:
    """Save the trained backbone (``save_backbone`` format, which ``pretrained_ckpt`` loads) when the stage ends.

    Only rank 0 writes. ``extra`` is stored in the checkpoint next to the weights (stage name, epochs, ...).
    """

    def __init__(self, path: str | os.PathLike, backbone: nn.Module, extra: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.backbone = as_backbone(backbone)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if _dist_on() and dist.get_rank() != 0:
            return
        final = {k: v for k, v in engine.state.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        save_backbone(self.path, self.backbone, extra={**self.extra, "epochs": engine.state.epoch, "final_metrics": final})
        logger.info("saved backbone to %s", self.path)


def init_backbone(network: nn.Module, init: str | None) -> nn.Module:
    """Initialise a network's backbone in place from the ``init`` key and return the network.

    ``init``: ``"random"``/empty (keep the fresh weights), ``"imagenet:<file>"`` (torchvision ResNet state dict,
    see :mod:`ffcl_monai.networks.imagenet`) or the path of a project checkpoint (``save_backbone`` or a classifier
    checkpoint).
    """
    if init is None or str(init).strip() in ("", "random", "none", "None"):
        return network
    init = str(init)
    if init.startswith("imagenet:"):
        from ffcl_monai.networks.imagenet import load_imagenet_resnet

        load_imagenet_resnet(as_backbone(network), init[len("imagenet:") :])
    else:
        load_backbone(as_backbone(network), init)
    return network


class StageHistory:
    """Per-epoch ``engine.state.metrics`` of a pretraining stage to ``stage_history.jsonl`` (every number, the
    embedding monitor's included) and ``stage_curves.png`` (the per-block local losses or the global loss), written at
    every epoch end so that MLflow's end-of-run upload finds them."""

    def __init__(self, output_dir: str | os.PathLike, title: str = "") -> None:
        self.dir = Path(output_dir)
        self.title = title
        self.history: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import json

        from ffcl_monai.handlers.plots import plot_curves

        if _dist_on() and dist.get_rank() != 0:
            return
        row = {"epoch": engine.state.epoch}
        row.update({k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))})
        self.history.append(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "stage_history.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        # losses only: the embedding monitor's AUCs (other scale, sparse epochs) have their own embedding_monitor.png
        keys = sorted({k for r in self.history for k in r if "loss" in k})
        plot_curves(self.history, keys, self.dir / "stage_curves.png", self.title)
