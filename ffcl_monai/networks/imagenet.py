"""ImageNet weights from a user-supplied torchvision ResNet state dict, mapped onto a MONAI ResNet :class:`Backbone`.

Nothing is downloaded: the user passes a file (e.g. torchvision's ``resnet18-f37072fd.pth``), written by
``torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)``. Config key ``init: imagenet:<file>``.

Key mapping (torchvision -> :func:`~ffcl_monai.networks.backbones.build_backbone` ResNet):

    conv1.*            -> blocks.0.conv1.*       (stem; kept as trained for 3 channels, summed for 1, see below)
    bn1.*              -> blocks.0.bn1.*
    layer{i}.{rest}    -> blocks.{i}.{rest}      (i = 1..4; BasicBlock/Bottleneck names are the same in MONAI:
                                                  conv1/bn1/conv2/bn2[/conv3/bn3], downsample.0 = 1x1 conv,
                                                  downsample.1 = BatchNorm)
    fc.*               -> dropped (the classifier head is task-specific)

MONAI's shortcut conv (``downsample.0``) has a bias that torchvision's lacks; it is set to zero, which is exactly
torchvision's function. Old files without ``num_batches_tracked`` get zeros there.

Input channels. ``in_channels=3`` keeps conv1 as trained: the FFCL program's default with an ImageNet ``init``
(``ffcl.yaml``: grey images repeated to R, G, B by ``EnsureChannelsd``, ImageNet mean/std by ``NormalizeInputd``,
``input_norm: imagenet``), which is exactly the network's ImageNet input (seed 000 §3: 224 x 224 x 3, ImageNet
normalised). ``in_channels=1`` sums conv1 over its 3 input channels (as timm's ``adapt_input_conv``): for a grey image
g, ``sum_c w_c * g`` is what the 3-channel filter computes on g repeated three times, so the stem's response (and the
BatchNorm statistics after it) stay those of the trained network. The mean over channels, used before, gave a third
of that response. The backbone must use the torchvision stem (``conv1_kernel=7``, ``conv1_stride=2``, the defaults)
and ``spatial_dims=2``; anything else is refused with the config key to change.

Checked in ``tests/test_imagenet_mapping.py`` against a ResNet-18 written from the published architecture (He et
al. 2016, torchvision's layout) in plain torch: the mapped backbone gives the reference's pooled features.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from ffcl_monai.networks.backbones import RESNET_LAYOUTS, Backbone
from ffcl_monai.networks.checkpoints import safe_load

logger = logging.getLogger(__name__)

__all__ = ["torchvision_resnet_to_backbone", "load_imagenet_resnet"]

_LAYER = re.compile(r"^layer([1-4])\.(.+)$")


def _unwrap(ckpt: Any, path: str) -> dict[str, torch.Tensor]:
    state = ckpt
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a torchvision ResNet state dict (expected {{name: tensor}}).")
    # DataParallel / DDP saves prefix every key with "module.".
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def torchvision_resnet_to_backbone(state: dict[str, torch.Tensor], backbone: Backbone) -> dict[str, torch.Tensor]:
    """Translate a torchvision ResNet state dict into a full state dict of ``backbone`` (a MONAI ResNet).

    Raises:
        ValueError: wrong architecture, 3D backbone, non-torchvision stem, unsupported channel count, or keys that
            the file does not provide.
    """
    if backbone.name not in RESNET_LAYOUTS:
        raise ValueError(
            f"ImageNet weights map only onto ResNets ({list(RESNET_LAYOUTS)}), not {backbone.name!r}; set `backbone` "
            "or use `init: random`."
        )
    if backbone.spatial_dims != 2:
        raise ValueError(
            "ImageNet ResNet weights are 2D and cannot initialise a 3D backbone; use `init: random` (or a 3D project "
            "checkpoint) when `spatial_dims` is 3."
        )
    own = backbone.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        if k.startswith(("conv1.", "bn1.")):
            new = f"blocks.0.{k}"
        else:
            m = _LAYER.match(k)
            if m is None:
                raise ValueError(f"unexpected key {k!r} in the ImageNet file: not a torchvision ResNet?")
            new = f"blocks.{m.group(1)}.{m.group(2)}"
        if new not in own:
            raise ValueError(
                f"torchvision key {k!r} has no place in a MONAI {backbone.name} ({new!r} is missing): the file holds "
                f"a different ResNet depth; set `backbone` to the file's architecture."
            )
        mapped[new] = v
    stem = "blocks.0.conv1.weight"
    if stem in mapped:
        w = mapped[stem]
        c = backbone.in_channels
        if w.shape[1] == 3 and c == 1:
            # grey input: sum_c w_c * g equals the trained filter on g repeated to R, G, B (the mean would be 1/3)
            mapped[stem] = w.sum(dim=1, keepdim=True)
            logger.info("ImageNet conv1 summed over R, G, B for in_channels=1; in_channels=3 keeps it as trained")
        elif w.shape[1] != c:
            raise ValueError(
                f"conv1 of the ImageNet file has {w.shape[1]} input channels; only in_channels 3 (kept as trained, "
                f"the default with an ImageNet init) or 1 (summed) are supported, the config has in_channels={c}."
            )
        if mapped[stem].shape != own[stem].shape:
            raise ValueError(
                f"stem conv shape {tuple(mapped[stem].shape)} in the file vs {tuple(own[stem].shape)} in the backbone: "
                "ImageNet weights need the torchvision stem (conv1_kernel=7, conv1_stride=2)."
            )
    for k, v in own.items():
        if k in mapped:
            if mapped[k].shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(mapped[k].shape)} in the file vs {tuple(v.shape)} in the backbone.")
            mapped[k] = mapped[k].to(v.dtype)
        elif k.endswith("downsample.0.bias") or k.endswith("num_batches_tracked"):
            mapped[k] = torch.zeros_like(v)  # torchvision has no shortcut-conv bias; zero keeps its function
        else:
            raise ValueError(f"the ImageNet file lacks {k!r} of the {backbone.name} backbone; is it a torchvision ResNet?")
    return mapped


def load_imagenet_resnet(backbone: Backbone, path: str | os.PathLike) -> dict[str, Any]:
    """Load a torchvision ResNet ImageNet state dict file into ``backbone`` (strictly: every key is set).

    Returns:
        ``{"path": ..., "loaded": n_keys, "zero_filled": [...]}``.
    """
    path = str(path)
    state = _unwrap(safe_load(path), path)
    mapped = torchvision_resnet_to_backbone(state, backbone)
    backbone.load_state_dict(mapped, strict=True)
    zero = [k for k in mapped if k.endswith("downsample.0.bias") or k not in _reverse_keys(state)]
    logger.info("loaded ImageNet weights from %s into %s (%d tensors)", path, backbone.name, len(mapped))
    return {"path": path, "loaded": len(mapped), "zero_filled": zero}


def _reverse_keys(state: dict[str, torch.Tensor]) -> set[str]:
    out = set()
    for k in state:
        if k.startswith(("conv1.", "bn1.")):
            out.add(f"blocks.0.{k}")
        elif (m := _LAYER.match(k)) is not None:
            out.add(f"blocks.{m.group(1)}.{m.group(2)}")
    return out
