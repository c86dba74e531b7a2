"""Masked multi-head losses for auxiliary-target supervised pretraining.

Awatramani, Akshama, Miller, "In-domain Model Pre-training for Chest X-Rays" (NYU, seed 004), Sec. 4.1 and 5.1: a
backbone is pretrained to predict metadata of each image -- the view (frontal/lateral, a class), the patient's sex
(binary) and age (regression with a smooth L1 loss) -- and then fine-tuned on the target labels.

Total loss (our formulation of their weighted sum, with missing values masked):

    L = sum_h w_h * mean_{i : y_ih known} l_h(f_h(x_i), y_ih)

with l_h = cross-entropy (``ce``), binary cross-entropy on logits (``bce``) or smooth L1 / Huber (``smooth_l1``,
Girshick, Fast R-CNN, ICCV 2015, Eq. 3). A value is "missing" when it is NaN (what ``null`` in the datalist becomes)
or negative for class targets. A head whose targets are all missing in a batch contributes 0 with a zero gradient,
instead of NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("ce", "bce", "smooth_l1")


@dataclass
class HeadSpec:
    """One auxiliary target.

    Args:
        kind: ``ce`` (multi-class, ``num_outputs`` classes), ``bce`` (binary, 1 logit) or ``smooth_l1`` (regression).
        weight: w_h in the total loss.
        num_outputs: outputs of the head (classes for ``ce``; 1 otherwise).
        scale: regression targets are divided by this before the loss (e.g. 100 for age in years), so that the
            smooth-L1 transition at 1 sits at a sensible place and the heads have comparable magnitudes.
        beta: smooth-L1 transition point.
    """

    kind: str
    weight: float = 1.0
    num_outputs: int = 1
    scale: float = 1.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"auxiliary head kind {self.kind!r} unknown; use one of {KINDS} in the `aux_heads` key.")
        if self.kind == "ce" and self.num_outputs < 2:
            raise ValueError("a `ce` auxiliary head needs num_outputs >= 2 (the number of classes) in `aux_heads`.")
        if self.kind != "ce":
            self.num_outputs = 1


def parse_heads(heads: Mapping[str, Mapping | HeadSpec]) -> dict[str, HeadSpec]:
    """Turn the `aux_heads` config mapping ``{field: {kind, weight, num_outputs, ...}}`` into :class:`HeadSpec`s."""
    if not heads:
        raise ValueError("`aux_heads` is empty; name at least one metadata field, e.g. {sex: {kind: bce}}.")
    return {k: v if isinstance(v, HeadSpec) else HeadSpec(**dict(v)) for k, v in heads.items()}


def known_mask(target: torch.Tensor, kind: str) -> torch.Tensor:
    """True where the target value is present (not NaN; for class targets also not negative)."""
    target = target.reshape(target.shape[0], -1)[:, 0] if target.ndim > 1 else target
    mask = ~torch.isnan(target.float())
    if kind in ("ce", "bce"):
        mask &= target.float() >= 0
    return mask


def masked_head_loss(pred: torch.Tensor, target: torch.Tensor, spec: HeadSpec) -> tuple[torch.Tensor, int]:
    """Loss of one head over the samples whose target is known, and how many there were."""
    target = target.reshape(-1).to(pred.device)
    mask = known_mask(target, spec.kind)
    n = int(mask.sum())
    if n == 0:
        return pred.sum() * 0.0, 0  # keeps the graph (DDP needs every parameter used) with a zero gradient
    p, t = pred[mask], target[mask]
    if spec.kind == "ce":
        return F.cross_entropy(p.float(), t.long()), n
    p = p.reshape(-1).float()
    if spec.kind == "bce":
        return F.binary_cross_entropy_with_logits(p, t.float()), n
    return F.smooth_l1_loss(p, t.float() / spec.scale, beta=spec.beta), n


class MaskedMultiHeadLoss(nn.Module):
    """Weighted sum of masked per-head losses (module docstring).

    ``forward(preds, targets)`` takes two mappings keyed by field name; it returns the total loss and stores the
    per-head values of the last call in ``self.last`` (for logging).
    """

    def __init__(self, heads: Mapping[str, Mapping | HeadSpec]) -> None:
        super().__init__()
        self.heads = parse_heads(heads)
        self.last: dict[str, float] = {}

    def forward(self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total: torch.Tensor | None = None
        self.last = {}
        for name, spec in self.heads.items():
            if name not in targets:
                raise KeyError(f"auxiliary target {name!r} is not in the batch; add it to the datalist or `aux_heads`.")
            loss, n = masked_head_loss(preds[name], targets[name], spec)
            self.last[f"loss_{name}"] = float(loss.detach())
            self.last[f"known_{name}"] = float(n)
            term = spec.weight * loss
            total = term if total is None else total + term
        assert total is not None
        return total
