"""Embedding-collapse monitor for self-supervised pretraining.

Two per-epoch numbers go into ``engine.state.metrics`` (and from there to MLflow):

- ``collapse_std``: the per-dimension standard deviation of the L2-normalised projections z, averaged over
  dimensions and multiplied by sqrt(D). Chen & He, "Exploring Simple Siamese Representation Learning" (CVPR 2021,
  Sec. 4.1): for z spread over the unit sphere the std is ~1/sqrt(D), so this is ~1 when healthy and 0 when every
  image maps to the same point (complete collapse).
- ``collapse_rank``: MONAI 1.6's ``compute_embedding_collapse`` effective-rank score of the backbone features h
  (Roy & Vetterli 2007 effective rank, scaled so that 1 = collapsed to one direction, 0 = full rank). It catches
  dimensional collapse, which the std alone misses.

Embeddings come from the trainer's output (``"z"`` and ``"h"``), up to ``max_samples`` per epoch, so the monitor
costs no extra forward pass.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


def normalized_std(z: torch.Tensor) -> float:
    """mean_d std_b(z_b / |z_b|)_d * sqrt(D): ~1 for a spread embedding, 0 for a collapsed one."""
    if z.shape[0] < 2:
        return float("nan")
    zn = F.normalize(z.float(), dim=1)
    return float(zn.std(dim=0).mean() * math.sqrt(z.shape[1]))


def effective_rank_score(h: torch.Tensor) -> float:
    """MONAI's ``compute_embedding_collapse`` effective-rank score (1 = collapsed), NaN if it cannot be computed."""
    try:
        from monai.metrics import compute_embedding_collapse

        out = compute_embedding_collapse(h.float(), include_indicators=["effective_rank"], reduction="none")
        value = out.get("effective_rank_score")
        return float(value) if value is not None else float("nan")
    except Exception as e:  # an old MONAI or a degenerate batch must not stop a pretraining run
        logger.debug("compute_embedding_collapse failed: %s", e)
        return float("nan")


class CollapseMonitor:
    """Collect embeddings during an epoch and write ``collapse_std`` / ``collapse_rank`` at its end.

    Args:
        max_samples: embeddings kept per epoch (memory and SVD cost are bounded).
        z_key, h_key: keys of the projections and backbone features in ``engine.state.output``.
        warn_below: log a warning when ``collapse_std`` drops below this value.
    """

    def __init__(self, max_samples: int = 1024, z_key: str = "z", h_key: str = "h", warn_below: float = 0.1) -> None:
        self.max_samples = max_samples
        self.z_key, self.h_key = z_key, h_key
        self.warn_below = warn_below
        self._z: list[torch.Tensor] = []
        self._h: list[torch.Tensor] = []
        self._n = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._compute)

    def _reset(self, engine: Engine) -> None:
        self._z, self._h, self._n = [], [], 0

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        if not isinstance(out, dict) or self._n >= self.max_samples:
            return
        take = self.max_samples - self._n
        if self.z_key in out:
            self._z.append(out[self.z_key][:take].detach().float().cpu())
        if self.h_key in out:
            self._h.append(out[self.h_key][:take].detach().float().cpu())
        self._n += min(take, len(out.get(self.z_key, out.get(self.h_key, []))))

    def _compute(self, engine: Engine) -> None:
        if self._z:
            std = normalized_std(torch.cat(self._z))
            engine.state.metrics["collapse_std"] = std
            if std < self.warn_below:
                logger.warning("embedding collapse: normalised std %.3f at epoch %d (1 = spread, 0 = collapsed)",
                               std, engine.state.epoch)
        if self._h:
            engine.state.metrics["collapse_rank"] = effective_rank_score(torch.cat(self._h))
