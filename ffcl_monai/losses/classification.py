"""Classification losses for the downstream stage.

- Cross-entropy for single-label tasks.
- Binary cross-entropy (the FFCL paper's choice, Ahamed et al. 2023, Sec. 3) on one-hot targets for single-label
  tasks, or on multi-label targets where entries equal to -1 are masked out (CheXpert "U-Ignore", Irvin et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE with logits, averaged over the entries whose target is not negative.

    Single-label integer targets (B,) are turned into one-hot (B, C) first, so the same loss serves the paper's
    "BCE for binary classification" with a 2-logit head.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim - 1:  # class indices
            target = F.one_hot(target.long(), logits.shape[-1]).to(logits.dtype)
        target = target.to(logits.dtype)
        mask = (target >= 0).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        return (loss * mask).sum() / mask.sum().clamp(min=1)


def make_loss(task: str, name: str = "auto") -> nn.Module:
    """The loss for ``task``: ``auto`` (CE for single-label, masked BCE for multi-label), ``ce`` or ``bce``."""
    name = name.lower()
    if name == "auto":
        name = "bce" if task == "multilabel" else "ce"
    if name == "ce":
        if task == "multilabel":
            raise ValueError("`loss_name: ce` cannot train a multilabel task; use `bce` (or `auto`).")
        return nn.CrossEntropyLoss()
    if name == "bce":
        return MaskedBCEWithLogitsLoss()
    raise ValueError(f"unknown `loss_name` {name!r}; use auto, ce or bce.")
