"""Barlow Twins redundancy-reduction loss.

Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
arXiv:2103.03230, Eq. (1)-(2):

    L_BT = sum_i (1 - C_ii)^2  +  lambda * sum_i sum_{j != i} C_ij^2

    C_ij = sum_b z^A_{b,i} z^B_{b,j} / ( sqrt(sum_b (z^A_{b,i})^2) * sqrt(sum_b (z^B_{b,j})^2) )

where z^A, z^B are the (B, D) embeddings of the two views, each centred over the batch. C is the cross-correlation
matrix between the two views' embedding dimensions: the first term makes each dimension invariant to augmentation,
the second decorrelates different dimensions (redundancy reduction). The paper uses lambda = 5e-3 with D = 8192.
Normalising each dimension by its batch mean and standard deviation (as the reference code's affine-free BatchNorm
does) gives exactly the C above.
"""

from __future__ import annotations

import torch
from torch import nn

from ffcl_monai.losses.ntxent import _dist_world, gather_with_grad


def cross_correlation(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """C of Eq. (2): the (D, D) cross-correlation between dimensions of z_a and z_b, computed over the batch."""
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(f"Barlow Twins expects two (B, D) tensors of equal shape, got {tuple(z_a.shape)}, {tuple(z_b.shape)}.")
    if z_a.shape[0] < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2 to estimate correlations; raise `batch_size`.")
    n = z_a.shape[0]
    a = (z_a - z_a.mean(0)) / (z_a.std(0, unbiased=False) + eps)
    b = (z_b - z_b.mean(0)) / (z_b.std(0, unbiased=False) + eps)
    return a.T @ b / n


def barlow_twins_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3, gather_distributed: bool = False
) -> torch.Tensor:
    """Functional Barlow Twins loss, Eq. (1). Runs in float32 even inside autocast (D x D sums of squares)."""
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        z_a, z_b = z_a.float(), z_b.float()
        if gather_distributed and _dist_world()[1] > 1:
            # Correlations over the global batch, as the reference implementation's all-reduce of C does.
            z_a, z_b = gather_with_grad(z_a), gather_with_grad(z_b)
        c = cross_correlation(z_a, z_b)
        diag = torch.diagonal(c)
        on_diag = (1 - diag).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
        return on_diag + lambd * off_diag


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss module (Eq. 1).

    Args:
        lambd: weight of the redundancy-reduction (off-diagonal) term; config key `lambd`. 5e-3 in the paper for
            D = 8192; for smaller projections ~1/D is a common choice.
        gather_distributed: compute C over the batch of all DDP ranks (all-gather with gradients).
    """

    def __init__(self, lambd: float = 5e-3, gather_distributed: bool = False) -> None:
        super().__init__()
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0, got {lambd}; set the `lambd` config key.")
        self.lambd = float(lambd)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return barlow_twins_loss(z_a, z_b, self.lambd, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, gather_distributed={self.gather_distributed}"
