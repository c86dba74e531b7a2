"""FFCL's pair contrastive loss (Eq. 1), batched over all pairs or with one random partner per image.

Reference:
    Md. A. Ahamed, J. Chen, A. Imran, "Forward-Forward Contrastive Learning" (seed 000), Methods, Eq. 1. For two
    images x_1, x_2 with embeddings E_1, E_2 and classes C_1, C_2::

        L_C = 1 - cos(E_1, E_2)        if C_1 == C_2
        L_C = max(0, cos(E_1, E_2))    otherwise

    This is ``torch.nn.CosineEmbeddingLoss(margin=0)`` with target +1 / -1. The same loss drives the local stage
    (one loss per block, on that block's pooled embedding) and the global stage (on the final embedding).

Two ways to form pairs (config key ``pair_mode``):
    - ``"all_pairs"`` (default): every ordered pair (i, j), i != j, of the batch. A B x B cosine matrix and a
      label-equality mask give all B(B-1) terms at the cost of one matmul. It estimates the same expectation as
      the paper's random pairs with far less variance per step.
    - ``"random_partner"``: the paper's literal mode (and the authors' notebook): each image i gets one partner
      j != i drawn uniformly from the batch; B terms.

How positive (same-class) and negative (different-class) terms are averaged (config key ``averaging``):
    - ``"pairs"`` (default): one mean over all formed pairs, the expectation over random pairs of Eq. 1. With
      imbalanced classes most pairs are positives (Kermany: ~62%).
    - ``"balanced"``: ``(mean of positive terms + neg_weight * mean of negative terms) / 2``, so each kind of pair
      counts the same whatever the class balance; a group with no pair in the batch is left out.
    ``neg_weight`` (default 1.0) scales the negative terms in both modes; 1.0 is Eq. 1 as printed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAIR_MODES", "AVERAGING", "same_class_mask", "cosine_matrix", "eq1_terms", "ffcl_pair_loss", "FFCLPairLoss"]

PAIR_MODES = ("all_pairs", "random_partner")
AVERAGING = ("pairs", "balanced")


def same_class_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, B) boolean mask, True where images i and j have the same class.

    ``labels`` may be class indices ``(B,)``, ``(B, 1)`` binary targets, or one-hot / multi-label rows ``(B, K)``;
    two multi-label rows are "the same class" only when every entry agrees.
    """
    lab = labels.reshape(labels.shape[0], -1)
    return (lab[:, None, :] == lab[None, :, :]).all(dim=-1)


def cosine_matrix(emb: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, B) cosine similarities of the rows of ``emb`` (B, D), in float32 even under autocast."""
    z = F.normalize(emb.float().flatten(1), dim=1, eps=eps)
    return z @ z.t()


def eq1_terms(cos: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Eq. 1 element-wise: ``1 - cos`` where the classes agree, ``max(0, cos)`` where they differ."""
    return torch.where(same, 1.0 - cos, cos.clamp(min=0.0))


def _reduce(terms: torch.Tensor, same: torch.Tensor, averaging: str, neg_weight: float) -> torch.Tensor:
    neg = ~same
    if averaging == "pairs":
        weights = torch.where(same, torch.ones_like(terms), torch.full_like(terms, neg_weight))
        return (terms * weights).sum() / terms.numel()
    if averaging == "balanced":
        parts = []
        if same.any():
            parts.append(terms[same].mean())
        if neg.any():
            parts.append(neg_weight * terms[neg].mean())
        return torch.stack(parts).sum() / 2.0 if len(parts) == 2 else parts[0]
    raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}; set the `averaging` config key.")


def ffcl_pair_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    pair_mode: str = "all_pairs",
    averaging: str = "pairs",
    neg_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. 1 of FFCL averaged over the pairs of a batch.

    Args:
        emb: embeddings (B, D) (any trailing shape is flattened). Cast to float32 first.
        labels: class indices (B,), binary targets (B, 1) or one-hot/multi-label rows (B, K).
        pair_mode: ``"all_pairs"`` (B x B matrix, self-pairs excluded) or ``"random_partner"`` (paper, one partner
            j != i per image).
        averaging: ``"pairs"`` or ``"balanced"`` (see the module docstring).
        neg_weight: weight of the different-class terms (1.0 = Eq. 1 as printed).
        generator: random generator for ``"random_partner"`` (reproducible tests).

    Returns:
        scalar loss in float32. A batch of one image has no pair: the loss is a zero that still has a graph, so an
        engine's ``backward`` does not fail on a last batch of size one.
    """
    if emb.shape[0] != labels.shape[0]:
        raise ValueError(f"embeddings have {emb.shape[0]} rows but labels {labels.shape[0]}")
    b = emb.shape[0]
    if b < 2:
        return emb.float().sum() * 0.0
    if pair_mode == "all_pairs":
        cos = cosine_matrix(emb)
        same = same_class_mask(labels)
        off_diag = ~torch.eye(b, dtype=torch.bool, device=emb.device)
        terms, same = eq1_terms(cos, same)[off_diag], same[off_diag]
        return _reduce(terms, same, averaging, neg_weight)
    if pair_mode == "random_partner":
        # j = (i + U{1..B-1}) mod B is uniform over the partners j != i (the notebook re-draws until j != i).
        shift = torch.randint(1, b, (b,), generator=generator, device="cpu").to(emb.device)
        j = (torch.arange(b, device=emb.device) + shift) % b
        e = emb.float().flatten(1)
        cos = F.cosine_similarity(e, e[j], dim=1, eps=1e-8)
        lab = labels.reshape(b, -1)
        same = (lab == lab[j]).all(dim=1)
        return _reduce(eq1_terms(cos, same), same, averaging, neg_weight)
    raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}; set the `pair_mode` config key.")


class FFCLPairLoss(nn.Module):
    """Module form of :func:`ffcl_pair_loss` (Eq. 1), for configs: ``loss(emb, labels) -> scalar``."""

    def __init__(self, pair_mode: str = "all_pairs", averaging: str = "pairs", neg_weight: float = 1.0) -> None:
        super().__init__()
        if pair_mode not in PAIR_MODES:
            raise ValueError(f"pair_mode must be one of {PAIR_MODES}, got {pair_mode!r}; set the `pair_mode` config key.")
        if averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}; set the `averaging` config key.")
        self.pair_mode = pair_mode
        self.averaging = averaging
        self.neg_weight = float(neg_weight)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ffcl_pair_loss(emb, labels, self.pair_mode, self.averaging, self.neg_weight)

    def extra_repr(self) -> str:
        return f"pair_mode={self.pair_mode!r}, averaging={self.averaging!r}, neg_weight={self.neg_weight}"
