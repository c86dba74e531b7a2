"""Checkpoint savers attached to the trainers and evaluators; every write goes through
:func:`ffcl_monai.networks.checkpoints.atomic_save` (temporary file, fsync, rename), so a crash never leaves a
half-written file under the real name.

- :class:`BackboneSaver`: the backbone alone in the ``save_backbone`` format (what ``pretrained_ckpt`` of train.yaml
  and the next FFCL stage load), by every pretraining workflow: SimCLR/Barlow, auxiliary targets, the FFCL stages.
- :class:`BestModelSaver`: the whole network whenever the validator reaches a new finite best.

(:class:`~ffcl_monai.handlers.training.ResumeHandler` writes the resume checkpoints.)
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ffcl_monai.data.distributed import is_rank0, unwrap_module
from ffcl_monai.networks.backbones import as_backbone
from ffcl_monai.networks.checkpoints import atomic_save, save_backbone

__all__ = ["BackboneSaver", "BestModelSaver"]

logger = logging.getLogger(__name__)

#: keys of the ``save_backbone`` payload that ``extra`` must not overwrite
RESERVED_KEYS = frozenset({"backbone", "backbone_name", "spatial_dims", "in_channels"})


def _finite_number(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class BackboneSaver:
    """Save the backbone alone (:func:`~ffcl_monai.networks.checkpoints.save_backbone` format) every ``every``
    epochs and when training completes, overwriting, so a stopped run leaves its latest backbone. Rank 0 only.

    The checkpoint also holds ``extra`` (method, stage, key settings: the config's ``ckpt_extra``), ``epochs`` (the
    epochs trained) and ``metrics`` (the trainer's finite numeric ``state.metrics`` at that point).

    Args:
        path: the checkpoint file (``<output_dir>/backbone.pt``).
        network: a :class:`~ffcl_monai.networks.backbones.Backbone` or a model with ``.backbone`` (possibly
            wrapped in DDP or ``torch.compile``).
        extra: stored next to the weights; must not use the payload's own keys.
        every: save every ``every`` epochs (and always at the end).
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, extra: dict[str, Any] | None = None,
                 every: int = 1) -> None:
        self.path = Path(path)
        self.backbone = as_backbone(network)  # fails here, at config time, for a network without a backbone
        self.extra = dict(extra or {})
        reserved = RESERVED_KEYS & set(self.extra)
        if reserved:
            raise ValueError(
                f"checkpoint `extra` must not use the reserved keys {sorted(reserved)} (see `ckpt_extra`)."
            )
        self.every = max(1, int(every))
        self._saved_epoch = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0() or self._saved_epoch == engine.state.epoch:  # COMPLETED right after the last epoch's save
            return
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if _finite_number(v)}
        save_backbone(self.path, self.backbone, extra={**self.extra, "epochs": engine.state.epoch, "metrics": metrics})
        self._saved_epoch = engine.state.epoch
        logger.info("saved the backbone after epoch %d to %s", engine.state.epoch, self.path)


class BestModelSaver:
    """Save ``{"model": state_dict}`` whenever the validator's key metric reaches a new, finite best.

    MONAI's evaluator already tracks ``best_metric``/``best_metric_epoch``; saving off that state (rather than a
    second score bookkeeping) keeps the choice consistent across resumes. A non-finite best is never saved (see
    :class:`~ffcl_monai.handlers.training.FiniteBestMetric`, which also keeps it from blocking later epochs).
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module,
                 model_input: dict[str, Any] | None = None) -> None:
        """``model_input``: the input settings the model is trained on (in_channels, input_norm, image_size), stored as
        ``"input"`` beside the weights so that evaluation and inference can refuse a mismatch
        (:func:`ffcl_monai.networks.checkpoints.check_model_input`)."""
        self.path = Path(path)
        self.network = network
        self.model_input = dict(model_input or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch == engine.state.epoch and _finite_number(engine.state.best_metric):
            payload: dict[str, Any] = {"model": unwrap_module(self.network).state_dict()}
            if self.model_input:
                payload["input"] = self.model_input
            atomic_save(payload, self.path)
            logger.info("new best %s=%.4f at epoch %d -> %s", engine.state.key_metric_name,
                        engine.state.best_metric, engine.state.epoch, self.path)
