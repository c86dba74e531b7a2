"""Downstream classification: the helpers the train/evaluate/inference configs call.

The engines themselves are MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator`` (wired in
``bundle/configs/train.yaml``); this module builds the network (optionally from a pretrained backbone), picks the
trainable parameters and loads weights safely.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffcl_monai.networks.checkpoints import atomic_write_text, load_backbone, safe_load

logger = logging.getLogger(__name__)


def prepare_network(
    network: nn.Module, device: torch.device | str, pretrained_ckpt: str | None = None, channels_last: bool = False
) -> nn.Module:
    """Load a pretrained backbone (``pretrained_ckpt``) if given, then move the network to ``device``."""
    if pretrained_ckpt:
        report = load_backbone(network, pretrained_ckpt)
        print(
            f"pretrained backbone {pretrained_ckpt}: {len(report['missing'])} missing, "
            f"{len(report['unexpected'])} unexpected keys", flush=True,
        )
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (only the head for a linear probe)."""
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the network has no trainable parameters; check `freeze_backbone`.")
    return params


def load_model(network: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a ``{"model": state_dict}`` (or bare state dict) classifier checkpoint with ``weights_only=True``."""
    ckpt = safe_load(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    target = getattr(network, "module", network)
    try:
        target.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise RuntimeError(
            f"checkpoint {path} does not fit the configured network ({e}). Use the same `backbone`, `num_classes`, "
            "`spatial_dims` and `in_channels` as in training."
        ) from None
    return network


def _find_parser() -> Any:
    """The ConfigParser evaluating the current expression (found on the call stack), or None."""
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        candidate = frame.f_locals.get("parser")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    return None


def save_resolved_config(output_dir: str | os.PathLike, name: str = "config_resolved.json") -> str:
    """Write the merged config (all files + CLI overrides) to ``output_dir`` for MLflow and for reproducibility.

    Called from a config's ``initialize``; the running ConfigParser is taken from the call stack, so what is saved
    is exactly what runs, except that credentials in any value (a ``--tracking_uri`` with ``user:password@`` or
    ``?token=``) are replaced by ``***`` (:func:`~ffcl_monai.redaction.redact_uri`): the file is also
    logged to MLflow as an artifact.
    """
    from ffcl_monai.redaction import redact_values

    parser = _find_parser()
    content = parser.get() if parser is not None else {"argv": sys.argv}
    content = redact_values(json.loads(json.dumps(content, default=str)))  # plain JSON types, then redacted
    return str(atomic_write_text(Path(output_dir) / name, json.dumps(content, indent=2)))


def save_dataset_summary(output_dir: str | os.PathLike, datalist: str, class_names: list[str] | None = None) -> str:
    """Write counts per split and class (never paths or patient identifiers) to ``dataset_summary.json``."""

    from ffcl_monai.data.datalist import split_summary

    path = Path(output_dir) / "dataset_summary.json"
    return str(atomic_write_text(path, json.dumps(split_summary(datalist, class_names), indent=2)))
