"""One MONAI/Ignite trainer for two-view self-supervised pretraining; the loss is a parameter.

- SimCLR (Chen et al. 2020): ``loss_function = NTXentLoss`` on the projections z of both views.
- Barlow Twins (Zbontar et al. 2021): ``loss_function = BarlowTwinsLoss``.

Any ``loss(z1, z2) -> scalar`` fits. The trainer puts ``{"loss", "h", "z"}`` in ``engine.state.output`` (h: backbone
features, z: projections of view 1, detached; used by the collapse monitor) and, at every epoch end, the learning
rate used in that epoch in ``engine.state.metrics["lr"]``, before any handler runs (so MLflow logs it).

Also here: the optimizer/scheduler factories the configs call (Adam, or LARS for large-batch SimCLR), the helpers
that save the backbone in the ``pretrained_ckpt`` format, and the ``overfit`` sanity check of seed 001.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import Trainer
from torch import nn
from torch.optim import Optimizer

from ffcl_monai.data.distributed import unwrap_module
from ffcl_monai.engines.precision import PrecisionTrainerMixin
from ffcl_monai.networks.checkpoints import save_backbone

logger = logging.getLogger(__name__)


def _as_tensor(x: Any, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # MetaTensor -> Tensor: no meta overhead
    return x.to(device, non_blocking=non_blocking)


class TwoViewTrainer(PrecisionTrainerMixin, Trainer):
    """Trainer for two-view pretraining (SimCLR, Barlow Twins, ...).

    Args:
        device: training device.
        max_epochs: epochs.
        train_data_loader: yields dicts with ``view_keys``.
        network: module whose ``forward(x)`` returns ``(h, z)`` (:class:`ffcl_monai.networks.projection.ContrastiveModel`).
        optimizer: optimizer over the network's parameters.
        loss_function: ``loss(z1, z2)``.
        view_keys: the two batch keys holding the views.
        concat_views: one forward pass over both views concatenated (BatchNorm statistics over 2B images, like
            SimCLR's implementation); False = one pass per view (per-view BatchNorm, like Barlow Twins').
        amp: autocast on the training device (losses still run in float32, see their docstrings).
        amp_dtype: ``bfloat16`` (no gradient scaler: bf16 has float32's exponent range) or ``float16`` (adds a
            :class:`torch.amp.GradScaler`, kept as ``self.scaler``); :class:`~ffcl_monai.engines.precision.Precision`.
        train_handlers: MONAI/Ignite handlers.
        epoch_length: iterations per epoch (default: len(loader)).
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
        amp: bool = False,
        train_handlers: Sequence | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        amp_dtype: str | torch.dtype = "bfloat16",
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            amp=amp,
            decollate=False,  # the output holds a scalar loss and batch embeddings, not per-sample predictions
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.view_keys = tuple(view_keys)
        self.concat_views = concat_views
        self._init_precision(amp, amp_dtype)
        # Registered before the user's handlers so that metrics["lr"] exists when LR schedulers and MLflow run.
        self.add_event_handler(Events.ITERATION_COMPLETED, self._remember_lr)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_lr)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def _remember_lr(self, engine: Engine) -> None:
        self._lr = float(self.optimizer.param_groups[0]["lr"])

    def _epoch_lr(self, engine: Engine) -> None:
        engine.state.metrics["lr"] = getattr(self, "_lr", float(self.optimizer.param_groups[0]["lr"]))

    def embed(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h1, z1, z2) for a batch of view pairs."""
        if self.concat_views:
            h, z = self.network(torch.cat([x1, x2], dim=0))
            n = x1.shape[0]
            return h[:n], z[:n], z[n:]
        h1, z1 = self.network(x1)
        _, z2 = self.network(x2)
        return h1, z1, z2

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        missing = [k for k in self.view_keys if k not in batchdata]
        if missing:
            raise KeyError(f"batch has no {missing}; the two-view dataset must produce {self.view_keys} (TwoViewd).")
        device = engine.state.device
        x1, x2 = (_as_tensor(batchdata[k], device, self.non_blocking) for k in self.view_keys)
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            h1, z1, z2 = self.embed(x1, x2)
            loss = self.loss_function(z1, z2)
        self.precision.backward_step(loss, self.optimizer)
        return {"loss": loss.detach(), "h": h1.detach().float(), "z": z1.detach().float()}


# --------------------------------------------------------------------------------------------------------------
# Optimizers and schedules (config keys `optimizer_name`, `learning_rate`, `weight_decay`, `momentum`, `warmup_epochs`)
# --------------------------------------------------------------------------------------------------------------


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017, arXiv:1708.03888, Algorithm 1), as used by
    SimCLR for large batches: SGD with momentum where each layer's step is scaled by the trust ratio
    ``eta * |w| / (|g| + wd |w|)``. Biases and BatchNorm parameters (1-D tensors) get neither weight decay nor the
    trust ratio, as in SimCLR's implementation.
    """

    def __init__(self, params: Iterable, lr: float = 0.3, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 0.001) -> None:
        if lr <= 0:
            raise ValueError(f"LARS lr must be > 0, got {lr}; set `learning_rate`.")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def make_optimizer(
    name: str, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> Optimizer:
    """``adam`` (Adam; SimCLR with small batches), ``adamw``, ``lars`` (large-batch SimCLR) or ``sgd``."""
    name = str(name).lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown `optimizer_name` {name!r}; use adam, adamw, lars or sgd.")


def make_scheduler(optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: linear warm-up over ``warmup_epochs`` then cosine decay to 0 (SimCLR, Sec. B.6)."""
    warmup = max(0, min(int(warmup_epochs), max_epochs - 1))

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        t = (epoch - warmup) / max(1, max_epochs - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------------------
# Handlers: backbone checkpoint, overfit check
# --------------------------------------------------------------------------------------------------------------


class BackboneCheckpoint:
    """Save ``network.backbone`` alone (``save_backbone`` format: ``pretrained_ckpt`` of train.yaml loads it) at every
    epoch end, overwriting, so a stopped run leaves its latest backbone. Rank 0 only.

    Args:
        path: the checkpoint file (``<output_dir>/backbone.pt``).
        network: a model with ``.backbone`` (possibly DDP-wrapped).
        extra: stored next to the weights (method, epochs, keys...).
        every: save every ``every`` epochs (and always at the end).
    """

    def __init__(self, path: str | os.PathLike, network: nn.Module, extra: dict[str, Any] | None = None,
                 every: int = 1) -> None:
        self.path = Path(path)
        self.network = network
        self.extra = dict(extra or {})
        reserved = {"backbone", "backbone_name", "spatial_dims", "in_channels"} & set(self.extra)
        if reserved:
            raise ValueError(f"checkpoint `extra` must not use the reserved keys {sorted(reserved)} (see `ckpt_extra`).")
        self.every = max(1, int(every))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        metrics = {k: float(v) for k, v in engine.state.metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(float(v))}
        backbone = unwrap_module(self.network).backbone
        save_backbone(self.path, backbone, extra={**self.extra, "epochs": engine.state.epoch, "metrics": metrics})


class OverfitCheck:
    """The ``overfit`` switch's assertion (seed 001's sanity test): on a handful of images the pretraining loss must
    fall. At the end of training the mean loss of the last quarter of the epochs must be below ``max_ratio`` x the
    mean loss of the first quarter (windows, because the loss of a few augmented images is noisy from epoch to epoch).

    Raises:
        AssertionError: naming both losses and what to try, so ``python -m monai.bundle run`` exits non-zero.
    """

    def __init__(self, max_ratio: float = 0.8, enabled: bool = True) -> None:
        self.max_ratio = max_ratio
        self.enabled = enabled
        self.epoch_losses: list[float] = []
        self._sum, self._n = 0.0, 0

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._check)

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        self._sum += float(out["loss"])
        self._n += 1

    def _epoch(self, engine: Engine) -> None:
        self.epoch_losses.append(self._sum / max(1, self._n))
        self._sum, self._n = 0.0, 0

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
        msg = (f"overfit check passed: loss {first:.4f} -> {last:.4f} ({last / first:.2f} x, first/last {k} epochs) "
               f"in {len(self.epoch_losses)} epochs")
        logger.info(msg)
        print(msg, flush=True)


def check_pretrain_datalist(datalist: str, spatial_dims: int) -> dict[str, Any]:
    """Header check for pretraining: only the dimensionality matters (labels, classes and task are unused)."""
    from ffcl_monai.data.datalist import check_header, read_header

    header = read_header(datalist)
    return check_header(datalist, int(header.get("num_classes") or 2), spatial_dims, header.get("task") or "binary")
