"""Saving and loading checkpoints safely.

Every load goes through ``torch.load(..., weights_only=True)``: a checkpoint is data, never code. Backbone
checkpoints carry the architecture name so that loading into a different backbone fails with a clear message
instead of silently leaving layers random. Every save goes through :func:`atomic_save` (temporary file, fsync,
rename). The handlers that save during training are in :mod:`ffcl_monai.handlers.checkpoint`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffcl_monai.networks.backbones import Backbone, as_backbone

logger = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened; the rename is atomic there anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Any, keep_previous: bool = False) -> Path:
    """Write ``path`` through a per-process temporary file: ``write(file)``, flush, fsync, rename, fsync the folder.

    The temporary file is removed when anything fails, so a full disk or a crash in ``write`` leaves nothing behind.
    With ``keep_previous`` the file being replaced is kept as ``<stem>.prev<suffix>`` (one older generation).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may write at once
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the new name points at them
        if keep_previous and path.is_file():
            os.replace(path, previous_generation(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def previous_generation(path: str | os.PathLike) -> Path:
    """``resume.pt`` -> ``resume.prev.pt``: the generation :func:`atomic_save` keeps with ``keep_previous``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> Path:
    """``torch.save`` through a temporary file, fsync and rename, so that a crash never leaves a half-written
    checkpoint under the real name, and a failed write leaves no temporary file. ``keep_previous`` keeps the replaced
    file as one older generation (:func:`previous_generation`)."""
    return _atomic_write(path, lambda f: torch.save(obj, f), keep_previous)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV content (written through :func:`atomic_write_text`, so a crash never leaves half a file)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (per-process temporary file, fsync, rename): ranks may write the same file."""
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path you passed (e.g. `pretrained_ckpt`).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the problem
        raise RuntimeError(
            f"cannot load checkpoint {path} with weights_only=True ({e}). Only tensor/primitive checkpoints are "
            "accepted; re-save it as {'model': state_dict}."
        ) from e


def save_backbone(path: str | os.PathLike, backbone: Backbone, extra: dict[str, Any] | None = None) -> Path:
    """Save a backbone alone, in the format ``pretrained_ckpt`` of the classification workflow loads."""
    payload = {
        "backbone": backbone.state_dict(),
        "backbone_name": backbone.name,
        "spatial_dims": backbone.spatial_dims,
        "in_channels": backbone.in_channels,
    }
    payload.update(extra or {})
    return atomic_save(payload, path)


def _extract_backbone_state(ckpt: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(ckpt, dict) and "backbone" in ckpt and isinstance(ckpt["backbone"], dict):
        return ckpt["backbone"], ckpt
    # A full classifier checkpoint ({"model": state_dict} or a bare state dict): take its backbone.* part.
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict; expected {{'backbone': ...}} or {{'model': ...}}.")
    sub = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return (sub or state), {}


def load_backbone(target: nn.Module, path: str | os.PathLike, max_missing_fraction: float = 0.0) -> dict[str, list]:
    """Load backbone weights from ``path`` into ``target`` (a :class:`Backbone` or a model with ``.backbone``).

    Missing and unexpected keys are reported. Loading fails when the architecture recorded in the checkpoint differs
    from the target's, or when more than ``max_missing_fraction`` of the target's keys are missing.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``
    """
    path = Path(path)
    backbone = target.backbone if hasattr(target, "backbone") else target
    state, meta = _extract_backbone_state(safe_load(path), path)
    for key in ("backbone_name", "spatial_dims", "in_channels"):
        attr = "name" if key == "backbone_name" else key
        if key in meta and getattr(backbone, attr, meta[key]) != meta[key]:
            raise ValueError(
                f"{path} holds a {meta.get('backbone_name')} backbone with spatial_dims={meta.get('spatial_dims')}, "
                f"in_channels={meta.get('in_channels')}, but the config builds {getattr(backbone, 'name', '?')} with "
                f"spatial_dims={getattr(backbone, 'spatial_dims', '?')}, in_channels={getattr(backbone, 'in_channels', '?')}. "
                "Set `backbone`, `spatial_dims` and `in_channels` to match the checkpoint."
            )
    own = backbone.state_dict()
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_mismatch:
        raise ValueError(f"{path}: tensor shapes differ from the backbone for {shape_mismatch[:5]}...; wrong backbone?")
    result = backbone.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if len(missing) > max_missing_fraction * len(own):
        raise ValueError(
            f"{path} does not match the backbone: {len(missing)} of {len(own)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    logger.info("loaded backbone from %s: %d missing, %d unexpected keys", path, len(missing), len(unexpected))
    if missing or unexpected:
        logger.warning("backbone keys missing: %s; unexpected: %s", missing, unexpected)
    return {"missing": missing, "unexpected": unexpected}


# What a classifier checkpoint records of the input it was trained on (train.yaml's `model_input`, saved by
# BestModelSaver as "input"). A model fed other channels or another normalisation still runs and silently predicts
# garbage, so loading it that way is refused; another image size only degrades it (global pooling): a warning.
INPUT_KEYS_REFUSED = ("in_channels", "input_norm")
INPUT_KEYS_WARNED = ("image_size",)


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: 3 == "3", "ImageNet" == "imagenet", [64, 64] == (64, 64)."""
    def norm(v: Any) -> Any:
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else str(v).strip().lower()
    return norm(a) == norm(b)


def check_model_input(saved: dict[str, Any], expect: dict[str, Any], path: str | os.PathLike) -> None:
    """Compare the input settings recorded in a checkpoint with the config's; raise naming the keys to set.

    Keys the checkpoint does not record (checkpoints written before they were saved) are not checked.
    """
    refused = {k: (saved[k], expect[k]) for k in INPUT_KEYS_REFUSED if k in saved and k in expect and not _same(saved[k], expect[k])}
    if refused:
        fix = " ".join(f"--{k} {saved_v!r}" for k, (saved_v, _) in refused.items())
        raise ValueError(
            f"checkpoint {path} was trained on inputs with "
            + ", ".join(f"{k}={saved_v!r}" for k, (saved_v, _) in refused.items())
            + ", but the config prepares " + ", ".join(f"{k}={exp!r}" for k, (_, exp) in refused.items())
            + f"; its predictions would be meaningless. Give the training's values ({fix}) to this workflow."
        )
    for k in INPUT_KEYS_WARNED:
        if k in saved and k in expect and not _same(saved[k], expect[k]):
            logger.warning("checkpoint %s was trained at %s=%s, the config uses %s: predictions may degrade; "
                           "give --%s %s for the training's setting.", path, k, saved[k], expect[k], k, saved[k])


def load_model(network: nn.Module, path: str | os.PathLike, strict: bool = True,
               expect: dict[str, Any] | None = None) -> nn.Module:
    """Load a ``{"model": state_dict}`` (or bare state dict) classifier checkpoint with ``weights_only=True``.

    ``expect``: the config's input settings (``in_channels``, ``input_norm``, ``image_size``), checked against what
    the checkpoint records (:func:`check_model_input`) before the weights are loaded.
    """
    ckpt = safe_load(path)
    if expect and isinstance(ckpt, dict) and isinstance(ckpt.get("input"), dict):
        check_model_input(ckpt["input"], expect, path)
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


def init_backbone(network: nn.Module, init: str | None) -> nn.Module:
    """Initialise a network's backbone in place from the ``init`` key and return the network.

    ``init``: ``"random"``/empty (keep the fresh weights), ``"imagenet:<file>"`` (torchvision ResNet state dict,
    see :mod:`ffcl_monai.networks.imagenet`) or the path of a project checkpoint (``save_backbone`` or a classifier
    checkpoint).
    """
    if init is None or str(init).strip() in ("", "random", "none", "None"):
        return network
    init = str(init)
    if init.startswith("imagenet:"):
        from ffcl_monai.networks.imagenet import load_imagenet_resnet  # imagenet imports this module

        load_imagenet_resnet(as_backbone(network), init[len("imagenet:") :])
    else:
        load_backbone(as_backbone(network), init)
    return network
