"""Projection heads and the backbone + head models of the pretraining methods; each is dropped after pretraining
(only ``backbone.*`` is saved for fine-tuning).

SimCLR (Chen et al. 2020, Sec. 2.1 and Fig. 8) trains the contrastive loss on z = g(h), a small MLP on the pooled
backbone features h, and then throws g away: h transfers better than z. Barlow Twins (Zbontar et al. 2021, Sec. 2)
uses a deeper and wider "projector" with BatchNorm. :class:`ProjectionHead` covers both through its keys.
:class:`MultiHeadModel` carries the auxiliary-target heads (seed 004), :class:`GlobalContrastModel` the optional head
of FFCL's global stage (seed 000).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ffcl_monai.networks.backbones import Backbone, as_backbone, build_backbone


class ProjectionHead(nn.Module):
    """MLP g: ``num_layers`` linear layers, BatchNorm + ReLU between them, none after the last.

    Args:
        in_dim: backbone feature dimension.
        hidden_dim: width of the hidden layers (SimCLR: = in_dim; Barlow Twins: 8192).
        out_dim: embedding dimension z (SimCLR: 128).
        num_layers: 2 in SimCLR v1, 3 in Barlow Twins and SimCLR v2.
        batch_norm: BatchNorm1d after each hidden linear layer.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, num_layers: int = 2, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"projection num_layers must be >= 1, got {num_layers}; set `proj_layers`.")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ContrastiveModel(nn.Module):
    """Backbone f + projection head g. ``forward(x) -> (h, z)``: pooled features h = f(x) and z = g(h).

    The state dict has ``backbone.*`` (what :func:`ffcl_monai.networks.checkpoints.save_backbone` keeps and the
    classification workflow loads through ``pretrained_ckpt``) and ``projector.*`` (dropped after pretraining).

    Args:
        backbone: architecture name (see :func:`ffcl_monai.networks.backbones.build_backbone`) or a built Backbone.
        spatial_dims, in_channels: as for the classifier.
        proj_hidden_dim, proj_dim, proj_layers, proj_batch_norm: :class:`ProjectionHead` settings.
        backbone_kwargs: stem settings passed to ``build_backbone``.
    """

    def __init__(
        self,
        backbone: str | Backbone = "resnet18",
        spatial_dims: int = 2,
        in_channels: int = 1,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        proj_layers: int = 2,
        proj_batch_norm: bool = True,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        self.backbone: Backbone = (
            backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, spatial_dims, in_channels, **backbone_kwargs)
        )
        self.projector = ProjectionHead(
            self.backbone.feature_dim, proj_hidden_dim, proj_dim, proj_layers, proj_batch_norm
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.projector(h)


class MultiHeadModel(nn.Module):
    """Backbone + one linear head per auxiliary target (auxiliary-target pretraining, seed 004).

    ``forward(x)`` returns ``{field: logits or value}``; ``backbone.*`` is saved for fine-tuning, heads are dropped.

    Args:
        heads: ``{field: number of outputs}`` (classes for ``ce`` heads, 1 for ``bce`` and ``smooth_l1``).
    """

    def __init__(
        self,
        heads: dict[str, int],
        backbone: str | Backbone = "resnet18",
        spatial_dims: int = 2,
        in_channels: int = 1,
        dropout: float = 0.0,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        self.backbone: Backbone = (
            backbone if isinstance(backbone, nn.Module) else build_backbone(backbone, spatial_dims, in_channels, **backbone_kwargs)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.heads = nn.ModuleDict({k: nn.Linear(self.backbone.feature_dim, int(n)) for k, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.backbone(x))
        return {k: head(h) for k, head in self.heads.items()}


def head_outputs(heads: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """``{field: number of outputs}`` for :class:`MultiHeadModel` from the config's ``aux_heads``."""
    from ffcl_monai.losses.auxiliary import parse_heads  # the head specs are the loss's; networks do not import losses

    return {k: spec.num_outputs for k, spec in parse_heads(heads).items()}


class GlobalContrastModel(nn.Module):
    """Backbone + optional projection head; ``forward`` returns the final embedding FFCL's global stage trains
    Eq. 1 on (seed 000, Methods).

    Args:
        backbone: the backbone, or a model with ``.backbone`` (its pooled output is the embedding).
        projection: ``"none"`` (the pooled features themselves), ``"linear"``, or ``"mlp"`` (Linear-ReLU-Linear).
        proj_dim: output size of the head.
    """

    def __init__(self, backbone: nn.Module, projection: str = "none", proj_dim: int = 128) -> None:
        super().__init__()
        self.backbone = as_backbone(backbone)
        d = self.backbone.feature_dim
        if projection == "none":
            self.head: nn.Module = nn.Identity()
        elif projection == "linear":
            self.head = nn.Linear(d, proj_dim)
        elif projection == "mlp":
            self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim))
        else:
            raise ValueError(
                f"projection must be none, linear or mlp, got {projection!r}; set the `projection` config key."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
