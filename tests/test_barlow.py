"""Barlow Twins loss against its formula (Zbontar et al. 2021, Eq. 1-2), and the masked auxiliary losses."""

from __future__ import annotations

import math

import pytest
import torch

from ffcl_monai.losses.auxiliary import MaskedMultiHeadLoss
from ffcl_monai.losses.barlow_twins import BarlowTwinsLoss, cross_correlation


def _reference(za: torch.Tensor, zb: torch.Tensor, lambd: float) -> float:
    """Eq. (1)-(2) with explicit sums over b, i, j (centred embeddings, as in the paper)."""
    za = (za - za.mean(0)).double()
    zb = (zb - zb.mean(0)).double()
    n, d = za.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            num = sum(za[b, i] * zb[b, j] for b in range(n))
            den = math.sqrt(sum(za[b, i] ** 2 for b in range(n))) * math.sqrt(sum(zb[b, j] ** 2 for b in range(n)))
            c = float(num / den)
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


@pytest.mark.parametrize("lambd", [5e-3, 0.1])
def test_barlow_equals_formula(lambd: float) -> None:
    torch.manual_seed(0)
    za, zb = torch.randn(9, 5), torch.randn(9, 5)
    ours = BarlowTwinsLoss(lambd=lambd)(za, zb).item()
    assert ours == pytest.approx(_reference(za, zb, lambd), rel=1e-4)


def test_cross_correlation_properties() -> None:
    torch.manual_seed(0)
    z = torch.randn(64, 8)
    c = cross_correlation(z, z)
    assert torch.allclose(torch.diagonal(c), torch.ones(8), atol=1e-3)
    # identical, decorrelated views => loss ~ lambda * sum of squared off-diagonal sample correlations only
    loss_same = BarlowTwinsLoss(lambd=0.0)(z, z)
    assert loss_same < 1e-3
    assert BarlowTwinsLoss(lambd=0.0)(z, torch.randn(64, 8)) > 1.0


def test_barlow_finite_under_bf16_and_backprop() -> None:
    za = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BarlowTwinsLoss()(za, za.detach() + 0.1 * torch.randn(16, 32))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(za.grad).all()


def test_masked_multihead_loss() -> None:
    heads = {
        "view": {"kind": "ce", "num_outputs": 3, "weight": 1.0},
        "sex": {"kind": "bce", "weight": 0.5},
        "age": {"kind": "smooth_l1", "weight": 2.0, "scale": 100.0},
    }
    loss_fn = MaskedMultiHeadLoss(heads)
    preds = {"view": torch.randn(4, 3, requires_grad=True), "sex": torch.randn(4, 1), "age": torch.randn(4, 1)}
    nan = float("nan")
    targets = {
        "view": torch.tensor([0.0, 2.0, nan, -1.0]),
        "sex": torch.tensor([1.0, nan, 0.0, nan]),
        "age": torch.tensor([nan, nan, nan, nan]),  # all missing: contributes 0, not NaN
    }
    total = loss_fn(preds, targets)
    ce = torch.nn.functional.cross_entropy(preds["view"][:2], torch.tensor([0, 2]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(preds["sex"][[0, 2], 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(total, ce + 0.5 * bce, atol=1e-6)
    assert loss_fn.last["known_view"] == 2 and loss_fn.last["known_age"] == 0
    total.backward()
    assert torch.isfinite(preds["view"].grad).all()
    assert torch.all(preds["view"].grad[2:] == 0)  # masked samples receive no gradient


def test_masked_multihead_loss_smooth_l1_scale() -> None:
    loss_fn = MaskedMultiHeadLoss({"age": {"kind": "smooth_l1", "scale": 100.0}})
    out = loss_fn({"age": torch.tensor([[0.5], [0.0]])}, {"age": torch.tensor([50.0, float("nan")])})
    assert out.item() == pytest.approx(0.0)


def test_bad_head_config() -> None:
    with pytest.raises(ValueError, match="aux_heads"):
        MaskedMultiHeadLoss({"view": {"kind": "mse"}})
    with pytest.raises(KeyError, match="datalist"):
        MaskedMultiHeadLoss({"sex": {"kind": "bce"}})({"sex": torch.zeros(2, 1)}, {})
