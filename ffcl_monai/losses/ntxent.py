"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
arXiv:2002.05709, Eq. (1):

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),   sim(u, v) = u.v / (|u||v|)

averaged over all 2B anchors (both orderings of each positive pair). The denominator runs over the 2B - 1 candidates
k != i, the positive included, exactly as in the paper and in ``monai.losses.ContrastiveLoss``.

How this differs from ``monai.losses.ContrastiveLoss`` (same value, see ``tests/test_ntxent.py``):

* one matmul of the L2-normalised embeddings gives the (2B, 2B) similarity matrix, so memory is O(B^2);
  ContrastiveLoss broadcasts ``cosine_similarity`` over a (2B, 2B, D) tensor, O(B^2 D);
* the log-ratio is a cross-entropy (log-sum-exp), so it stays finite for small tau; ContrastiveLoss takes a plain
  ``exp(sim / tau)``, which overflows float32 once 1 / tau > ~88 (tau < ~0.011) and returns NaN;
* it always runs in float32, also inside a bf16/fp16 autocast region, because bf16's 8-bit mantissa would round
  similarities of 0.99 and 1.0 together and blur exactly the comparisons the loss is made of;
* ``gather_distributed=True`` takes negatives from every DDP rank (all-gather with gradients), which
  ContrastiveLoss cannot do; with one process it is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_world() -> tuple[int, int]:
    """(rank, world_size), or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph to every rank's copy.

    ``torch.distributed.all_gather`` returns tensors without gradient; ``torch.distributed.nn.functional.all_gather``
    back-propagates the gradient of each slice to the rank that produced it, which is what makes negatives from
    other GPUs train the encoder (SimCLR's "global" batch, Sec. 2.2 of the paper).
    """
    _, world = _dist_world()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather_distributed: bool = False
) -> torch.Tensor:
    """Functional NT-Xent. ``z1[i]`` and ``z2[i]`` are the two views of image i, shape (B, D) each."""
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"NT-Xent expects two (B, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; set the `temperature` config key.")
    batch = z1.shape[0]
    # Leave autocast: the similarity matmul and the log-softmax must be float32 (see module docstring).
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)  # (2B, D): rows 0..B-1 view 1, B..2B-1 view 2
        rank, world = _dist_world()
        if gather_distributed and world > 1:
            candidates = gather_with_grad(z)  # (2B * world, D), rank r's block starts at r * 2B
            offset = rank * 2 * batch
        else:
            candidates, offset = z, 0
        # (2B, 2B * world) logits: O(B^2) memory, one matmul; 1/tau is folded into the (2B, D) operand, not the
        # (2B, 2B) product.
        logits = (z / temperature) @ candidates.T
        idx = torch.arange(2 * batch, device=z.device)
        # An anchor is never its own candidate: -inf removes it from the softmax, leaving 2B*world - 1 candidates.
        if offset == 0 and candidates.shape[0] == z.shape[0]:
            logits = logits.fill_diagonal_(float("-inf"))
        else:
            logits[idx, idx + offset] = float("-inf")
        # The positive of row i is the other view of the same image, in this rank's block of the gathered matrix.
        positives = (idx + batch) % (2 * batch) + offset
        return F.cross_entropy(logits, positives)


class NTXentLoss(nn.Module):
    """NT-Xent loss module (SimCLR Eq. 1); see :func:`nt_xent` and the module docstring.

    Args:
        temperature: tau. SimCLR uses 0.5 with Adam/small batches and 0.1 with LARS/large batches.
        gather_distributed: all-gather embeddings from every DDP rank (with gradients) so that negatives come from
            the global batch. Ignored when torch.distributed is not initialised.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; set the `temperature` config key.")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
