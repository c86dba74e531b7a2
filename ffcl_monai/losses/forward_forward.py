"""Goodness and layer-local losses of Hinton's Forward-Forward algorithm.

References:
    - G. Hinton, "The Forward-Forward Algorithm: Some Preliminary Investigations", 2022 (arXiv:2212.13345),
      Eq. 1: ``p(positive) = sigma(sum_j y_j^2 - theta)``.
    - keras-io ``examples/vision/forwardforward.py`` (seed 002): goodness = *mean* of squared activations,
      loss = ``mean(log(1 + exp(concat[theta - g_pos, g_neg - theta])))``.
    - A. Sadam, T. Bui-Thanh, "Notes on the Forward-Forward Algorithm", 2023 (seed 003): Eq. 3.5 (goodness),
      Eq. 3.13 (L0, KL minimisation), Eq. 3.16 (L1, KL maximisation), Eqs. 4.1/4.2 (the "adjusted" ``ln(1 + .)``
      variants).

Conventions shared by every loss here:
    - ``g_pos``/``g_neg`` are goodness values of shape ``(N,)`` and ``(M,)``; ``M`` may differ from ``N``
      (seed 003: "the negative dataset need not be the same size as the positive dataset").
    - The expectation ``E[.]`` is taken over the concatenation ``[positive terms (+) negative terms]`` of the
      ``N + M`` samples, i.e. the ``1 / (n + m)`` normalisation of seed 003 Eq. 3.11 and exactly what seed 002
      computes with ``ops.mean(ops.concatenate([...]))``. For ``N == M`` this is half of
      ``mean_i [softplus(theta - g_pos_i) + softplus(g_neg_i - theta)]``.
    - Everything is computed with ``logsigmoid``/``softplus`` so that no ``exp`` overflows (seed 003's table
      reports NaN for the plain L0/L1 in its own implementation).

Identity worth knowing: ``-ln sigma(z) = softplus(-z)``, so seed 003's L0 is *the same function* as Hinton's / keras'
softplus loss; both names are kept because the configs of the seeds use both.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "goodness",
    "ff_softplus_loss",
    "ff_l0_loss",
    "ff_l1_loss",
    "ff_l0_adjusted_loss",
    "ff_l1_adjusted_loss",
    "FF_LOSSES",
    "get_ff_loss",
]


def goodness(h: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Goodness of a layer's activations: mean (seed 002) or sum (Hinton Eq. 1, seed 003 Eq. 3.5) of squares.

    Args:
        h: activations ``(..., H)``; the last dimension holds the units of one layer.
        reduction: ``"mean"`` or ``"sum"`` over the units.

    Returns:
        ``(...)`` goodness, computed in float32 even under bf16 autocast (squares of bf16 lose digits).
    """
    h = h.float()
    if reduction == "mean":
        return h.square().mean(dim=-1)
    if reduction == "sum":
        return h.square().sum(dim=-1)
    raise ValueError(f"goodness reduction must be 'mean' or 'sum', got {reduction!r} (config key `goodness`).")


def _expect(pos_terms: torch.Tensor, neg_terms: torch.Tensor) -> torch.Tensor:
    """E[.] over the concatenation of positive and negative terms (seed 003 Eq. 3.11's 1/(n+m))."""
    return torch.cat([pos_terms.reshape(-1), neg_terms.reshape(-1)]).mean()


def ff_softplus_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Hinton / keras loss: ``E[log(1 + exp(theta - g_pos)) (+) log(1 + exp(g_neg - theta))]``.

    Positive data are pushed above the threshold ``theta``, negative data below it (Hinton 2022, Eq. 1 with the
    logistic ``p = sigma(g - theta)``; seed 002 ``FFDense.forward_forward``).
    """
    return _expect(F.softplus(threshold - g_pos.float()), F.softplus(g_neg.float() - threshold))


def ff_l0_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Seed 003 Eq. 3.13, KL minimisation: ``L0 = -E[ln(sigma(g_pos - theta) (+) sigma(theta - g_neg))]``.

    Bounded below by 0; equal to :func:`ff_softplus_loss` because ``-ln sigma(z) = softplus(-z)``.
    """
    return -_expect(F.logsigmoid(g_pos.float() - threshold), F.logsigmoid(threshold - g_neg.float()))


def ff_l1_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Seed 003 Eq. 3.16, KL maximisation: ``L1 = E[ln(sigma(theta - g_pos) (+) sigma(g_neg - theta))]``.

    Unbounded below (it goes to ``-inf`` as ``g_pos -> inf``); seed 003: "fast but easily explodes".
    """
    return _expect(F.logsigmoid(threshold - g_pos.float()), F.logsigmoid(g_neg.float() - threshold))


def ff_l0_adjusted_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Seed 003 Eq. 4.1, adjusted L0: ``-E[ln(1 + sigma(g_pos - theta) (+) sigma(theta - g_neg))]``.

    The ``ln(1 + .)`` keeps the loss in ``[-ln 2, 0]`` so it cannot explode.
    """
    return -_expect(
        torch.log1p(torch.sigmoid(g_pos.float() - threshold)), torch.log1p(torch.sigmoid(threshold - g_neg.float()))
    )


def ff_l1_adjusted_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Seed 003 Eq. 4.2, adjusted L1: ``E[ln(1 + sigma(theta - g_pos) (+) sigma(g_neg - theta))]``, in ``[0, ln 2]``."""
    return _expect(
        torch.log1p(torch.sigmoid(threshold - g_pos.float())), torch.log1p(torch.sigmoid(g_neg.float() - threshold))
    )


FF_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "softplus": ff_softplus_loss,
    "L0": ff_l0_loss,
    "L1": ff_l1_loss,
    "L0_adjusted": ff_l0_adjusted_loss,
    "L1_adjusted": ff_l1_adjusted_loss,
}


def get_ff_loss(name: str) -> Callable[..., torch.Tensor]:
    """Look a loss up by its config name (``loss`` key): one of :data:`FF_LOSSES`."""
    try:
        return FF_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown Forward-Forward loss {name!r} (config key `loss`); choose from {sorted(FF_LOSSES)}")
