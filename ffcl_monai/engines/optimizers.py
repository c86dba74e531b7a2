"""Optimizers and learning-rate schedules of every training workflow (config keys ``optimizer_name``,
``learning_rate``, ``weight_decay``, ``momentum``, ``warmup_epochs``, ``lr_schedule``; train.yaml builds
``optimizer`` and ``lr_scheduler`` with them, the overlays change the keys).

- :func:`make_optimizer`: ``adam`` (the default everywhere), ``adamw``, ``lars`` (large-batch SimCLR), ``sgd``.
- :class:`LARS`: You, Gitman, Ginsburg 2017 (arXiv:1708.03888), Algorithm 1, as SimCLR uses it.
- :func:`make_scheduler`: per-epoch linear warm-up, then cosine decay to 0 (SimCLR, Sec. B.6; with no warm-up this
  is ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=max_epochs, eta_min=0)``, the FFCL paper's "Cosine Annealing
  scheduler", seed 000 §3), or a constant rate (``lr_schedule: constant``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["LARS", "LR_SCHEDULES", "make_optimizer", "make_scheduler"]

#: Values of the ``lr_schedule`` config key.
LR_SCHEDULES = ("cosine", "constant")


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


def make_scheduler(
    optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 0, schedule: str = "cosine"
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: linear warm-up over ``warmup_epochs``, then

    - ``cosine``: ``lr_e = lr * (1 + cos(pi * (e - w) / (max_epochs - w))) / 2``, decaying to 0 at ``max_epochs``
      (SimCLR, Sec. B.6; for ``w = 0`` the closed form of ``CosineAnnealingLR(T_max=max_epochs, eta_min=0)``);
    - ``constant``: ``lr_e = lr``.

    Raises:
        ValueError: an unknown ``schedule``, naming the config key ``lr_schedule``.
    """
    name = str(schedule).strip().lower()
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown `lr_schedule` {schedule!r}; use one of {list(LR_SCHEDULES)}.")
    warmup = max(0, min(int(warmup_epochs), max_epochs - 1))

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        t = (epoch - warmup) / max(1, max_epochs - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
