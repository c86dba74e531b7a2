"""Classifier = backbone + linear head. This is the bundle's ``network_def``.

The state dict has two parts, ``backbone.*`` and ``head.*``. Pretraining workflows save the backbone alone, which
:func:`ffcl_monai.networks.checkpoints.load_backbone` loads into ``Classifier.backbone``. The train/evaluate/inference
configs build the network with :func:`prepare_network` and optimise :func:`trainable_parameters`.

:class:`MultiTaskClassifier` (``bundle/configs/multitask.yaml``, seed 004 Sec. 5.2) adds auxiliary heads to a
Classifier for training only: it holds the Classifier itself, so validation, the best-model checkpoint and the served
model stay that Classifier, shape and state-dict keys unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

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


class MultiTaskClassifier(nn.Module):
    """A :class:`Classifier` plus one linear head per auxiliary target on the same pooled features (training only).

    ``forward(x)`` returns ``{label_key: the classifier's logits, field: head output}`` from one backbone pass; the
    logits equal ``classifier(x)`` (same backbone, dropout and head modules, not copies). The state dict is
    ``classifier.*`` and ``aux_heads.*`` (what the resume checkpoint holds); the classifier's own state dict, the
    served model, has no trace of the auxiliary heads.

    Args:
        classifier: the built Classifier (train.yaml's ``network``), trained together with the heads.
        heads: ``{field: number of outputs}`` (:func:`ffcl_monai.networks.projection.head_outputs` of the resolved
            ``aux_heads``).
        label_key: the output key of the pathology logits (the batch key of the label).
    """

    def __init__(self, classifier: Classifier, heads: Mapping[str, int], label_key: str = "label") -> None:
        super().__init__()
        if not isinstance(classifier, Classifier):
            raise TypeError(
                f"MultiTaskClassifier needs train.yaml's Classifier (network_def), got {type(classifier).__name__}; "
                "bundle/configs/multitask.yaml does not combine with overlays that wrap `network` "
                "(multi_gpu_train.yaml)."
            )
        if label_key in heads:
            raise ValueError(f"`aux_heads` names {label_key!r}, the pathology label; rename that auxiliary target.")
        self.classifier = classifier
        self.label_key = label_key
        dim = classifier.backbone.feature_dim
        self.aux_heads = nn.ModuleDict({k: nn.Linear(dim, int(n)) for k, n in heads.items()})
        # next to the classifier's parameters (channels_last does not apply to linear layers)
        ref = next(classifier.parameters(), None)
        if ref is not None:
            self.aux_heads.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.classifier
        h = c.dropout(c.backbone(x))
        return {self.label_key: c.head(h), **{k: head(h) for k, head in self.aux_heads.items()}}


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
