"""Classifier = backbone + linear head. This is the bundle's ``network_def``.

The state dict has two parts, ``backbone.*`` and ``head.*``. Pretraining workflows save the backbone alone, which
:func:`ffcl_monai.networks.checkpoints.load_backbone` loads into ``Classifier.backbone``. The train/evaluate/inference
configs build the network with :func:`prepare_network` and optimise :func:`trainable_parameters`.
"""

from __future__ import annotations

import torch
from torch import nn

from ffcl_monai.networks.backbones import Backbone, build_backbone
from ffcl_monai.networks.checkpoints import load_backbone


class Classifier(nn.Module):
    """Image classifier returning logits of shape (B, num_classes).

    Args:
        backbone: architecture name (see :func:`build_backbone`).
        num_classes: number of output channels (classes, or labels for multi-label tasks).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        dropout: dropout before the linear head.
        freeze_backbone: keep backbone weights fixed and its BatchNorm in eval mode (linear probe).
        backbone_kwargs: extra arguments of :func:`build_backbone` (stem settings).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 2,
        spatial_dims: int = 2,
        in_channels: int = 1,
        dropout: float = 0.0,
        freeze_backbone: bool = False,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        self.backbone: Backbone = build_backbone(backbone, spatial_dims, in_channels, **backbone_kwargs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.backbone.feature_dim, num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.freeze_backbone:
            # A linear probe must not move BatchNorm statistics either, or the "frozen" features drift.
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


def prepare_network(
    network: nn.Module, device: torch.device | str, pretrained_ckpt: str | None = None, channels_last: bool = False
) -> nn.Module:
    """Load a pretrained backbone (``pretrained_ckpt``) if given, then move the network to ``device`` (in NHWC
    memory format with ``channels_last``, for Tensor-Core convolutions)."""
    if pretrained_ckpt:
        load_backbone(network, pretrained_ckpt)  # logs the missing/unexpected keys
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
