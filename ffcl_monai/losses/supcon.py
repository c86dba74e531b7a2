"""Supervised contrastive loss (SupCon), an alternative to FFCL's Eq. 1 for the global stage.

Reference:
    P. Khosla, P. Teterwak, C. Wang, A. Sarna, Y. Tian, P. Isola, A. Maschinot, C. Liu, D. Krishnan, "Supervised
    Contrastive Learning", NeurIPS 2020, arXiv:2004.11362, Eq. 2 (``L^sup_out``, the mean over positives OUTSIDE the
    log, the variant the paper finds best). FFCL (seed 000) cites this paper as the basis of its pretraining. For
    L2-normalised embeddings z and temperature tau::

        L = mean_{i in I'} -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau) )

    A(i) = every sample of the batch except i; P(i) = {p in A(i): y_p = y_i}, the positives of anchor i.

Choices made here (the paper leaves them open or assumes a large multi-view batch):
    - One view per image, as FFCL's global stage feeds it: the positives of an image are the other images of its
      class in the batch (the paper's batch also holds two augmentations of every image; with one view the loss is
      the same formula on a smaller A(i)).
    - I' = the anchors with at least one positive. An anchor alone in its class in this batch has an empty P(i) and
      no defined term, so it is left out of the mean (it still serves as a negative for the others). The paper sums
      over anchors; the mean keeps the scale independent of the batch size, as in the authors' reference code. The
      authors' code also multiplies by tau / base_tau (0.07); Eq. 2 has no such factor and neither has this module.
    - A batch without any positive pair (every image of its own class, or a batch of one) gives a zero loss that
      still has a graph to the embeddings (zero gradient, no NaN), so an engine's backward never fails.
    - Labels: class indices ``(B,)``, binary targets ``(B, 1)``, or one-hot / multi-label rows ``(B, K)``. Two
      samples are positives when their label rows are identical, exactly the "same class" of Eq. 1
      (:func:`ffcl_monai.losses.ffcl_pair.same_class_mask`): one-hot rows behave as their class index, and two
      multi-label rows must agree on every finding (an ignored entry, -1, matches only another -1). With many
      findings identical rows get rare and more anchors drop out of the mean; a partial-overlap weighting
      (e.g. Jaccard) is a different loss and is not offered.
    - tau defaults to 0.1, the temperature of the paper's main experiments (its temperature sweep favours low values;
      the authors' PyTorch code has 0.07 as the class default). The config key is ``supcon_temperature``.

Numerics:
    - Everything runs in float32 (float64 stays float64), also inside a bf16/fp16 autocast region: bf16's 8-bit
      mantissa would round similarities of 0.99 and 1.0 together.
    - Each row is divided by its largest absolute entry (detached) before the L2 normalisation: the result is the
      same unit vector, but squaring entries of 1e20 or 1e-25 can no longer overflow or underflow float32, so the
      loss is exactly invariant to the embedding's scale. Normalisation is 0-homogeneous, so detaching the divisor
      leaves the gradient unchanged.
    - log-softmax via log-sum-exp with the self-similarity masked to -inf: finite for tau = 0.01 (1/tau = 100).

Distributed (``gather_distributed=True``): embeddings and labels are all-gathered from every DDP rank (embeddings with
gradients, :func:`ffcl_monai.losses.ntxent.gather_with_grad`), so positives and negatives come from the global batch.
Each rank's anchors are its own samples; its loss is ``world * (sum of its anchors' terms) / (number of valid anchors
on all ranks)``, so that the mean of the rank losses, which is what DDP's gradient averaging optimises, equals
SupCon on the global batch even when the ranks hold different numbers of valid anchors. Like NT-Xent, it needs the
same batch size on every rank (``partition`` / ``DistributedSampler`` use ``even_divisible=True``). FFCL's Eq. 1
(:class:`~ffcl_monai.losses.ffcl_pair.FFCLPairLoss`) does not gather, so the global stage's default is off: both
global losses then see the same per-rank batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ffcl_monai.losses.ntxent import _dist_world, gather_with_grad

__all__ = ["GLOBAL_LOSSES", "positive_mask", "supcon_loss", "SupConLoss", "global_stage_loss"]

#: values of the config key ``global_objective`` (the global stage's loss; the local stage always uses Eq. 1)
GLOBAL_LOSSES = ("eq1", "supcon")


def positive_mask(labels: torch.Tensor, candidate_labels: torch.Tensor) -> torch.Tensor:
    """(B, N) boolean mask, True where anchor i and candidate j have identical label rows.

    The rectangular form of :func:`ffcl_monai.losses.ffcl_pair.same_class_mask` (equal to it when both arguments are
    the same batch); the self-pair is not removed here.
    """
    a = labels.reshape(labels.shape[0], -1)
    b = candidate_labels.reshape(candidate_labels.shape[0], -1)
    return (a[:, None, :] == b[None, :, :]).all(dim=-1)


def _unit_rows(emb: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows of ``emb`` (B, D) in at least float32, safe for any finite scale (module docstring)."""
    x = emb.to(torch.promote_types(emb.dtype, torch.float32)).flatten(1)
    scale = x.detach().abs().amax(dim=1, keepdim=True)
    # A zero row stays zero (normalize's eps), instead of 0/0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return F.normalize(x / scale, dim=1, eps=1e-12)


def _gather_labels(labels: torch.Tensor, world: int) -> torch.Tensor:
    """Labels of every rank, concatenated in rank order (no gradient needed)."""
    parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts, dim=0)


def supcon_loss(
    emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, gather_distributed: bool = False
) -> torch.Tensor:
    """SupCon ``L^sup_out`` (Khosla et al. 2020, Eq. 2) of a batch; see the module docstring.

    Args:
        emb: embeddings (B, D); any trailing shape is flattened. Normalised here; any scale gives the same loss.
        labels: class indices (B,), binary targets (B, 1) or one-hot / multi-label rows (B, K).
        temperature: tau > 0.
        gather_distributed: positives and negatives from every DDP rank (no-op without torch.distributed).

    Returns:
        scalar loss in float32 (float64 for float64 input): the mean over the anchors that have a positive; zero,
        with a graph, when none has one.
    """
    if emb.ndim < 2 or emb.shape[0] != labels.shape[0]:
        raise ValueError(
            f"SupCon expects embeddings (B, D) and B labels, got embeddings {tuple(emb.shape)} and labels "
            f"{tuple(labels.shape)}."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; set the `supcon_temperature` config key.")
    rank, world = _dist_world()
    gather = gather_distributed and world > 1
    batch = emb.shape[0]
    # Leave autocast: the similarity matmul and the log-softmax must not run in bf16/fp16 (module docstring).
    with torch.autocast(device_type=emb.device.type, enabled=False):
        z = _unit_rows(emb)
        if not gather and batch < 2:
            # No candidate at all: the log-softmax row would be -inf - (-inf). Nothing to learn from this batch.
            return z.sum() * 0.0
        if gather:
            candidates = gather_with_grad(z)  # (B * world, D); rank r's rows start at r * B
            candidate_labels = _gather_labels(labels, world)
            offset = rank * batch
        else:
            candidates, candidate_labels, offset = z, labels, 0
        # (B, N) logits with 1/tau folded into the (B, D) operand, not the (B, N) product.
        logits = (z / temperature) @ candidates.T
        rows = torch.arange(batch, device=z.device)
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[rows, rows + offset] = True
        # A(i) excludes i itself: -inf takes it out of the log-sum-exp.
        logits = logits.masked_fill(is_self, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos = positive_mask(labels, candidate_labels) & ~is_self
        n_pos = pos.sum(dim=1)
        # where (not a product with the mask): log_prob is -inf on the diagonal, and -inf * 0 would be NaN.
        pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        per_anchor = -pos_log_prob / n_pos.clamp(min=1)  # 0 for anchors without positives
        valid = (n_pos > 0).to(per_anchor.dtype)
        n_valid = valid.sum()
        if gather:
            # Divide by the global count so that the rank losses average to the global-batch SupCon.
            n_valid = n_valid.detach().clone()
            dist.all_reduce(n_valid)
            return world * (per_anchor * valid).sum() / n_valid.clamp(min=1)
        return (per_anchor * valid).sum() / n_valid.clamp(min=1)


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss` for configs: ``loss(emb, labels) -> scalar``.

    Args:
        temperature: tau (default 0.1, the paper's main setting); config key ``supcon_temperature``.
        gather_distributed: positives and negatives from every DDP rank; config key ``supcon_gather_distributed``.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; set the `supcon_temperature` config key.")
        self.temperature = float(temperature)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(emb, labels, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


def global_stage_loss(
    global_objective: str, eq1_loss: nn.Module, temperature: float = 0.1, gather_distributed: bool = False
) -> nn.Module:
    """The global stage's loss from the config key ``global_objective``: ``eq1`` (FFCL's Eq. 1, ``eq1_loss``) or
    ``supcon`` (:class:`SupConLoss` with ``supcon_temperature`` and ``supcon_gather_distributed``)."""
    name = str(global_objective).strip().lower()
    if name == "eq1":
        return eq1_loss
    if name == "supcon":
        return SupConLoss(temperature, gather_distributed)
    raise ValueError(
        f"global_objective must be one of {GLOBAL_LOSSES}, got {global_objective!r}; set the `global_objective` config key "
        "(bundle/configs/ffcl.yaml, global stage)."
    )
