"""Backbones as explicit sequences of blocks, built on MONAI's ResNet and DenseNet (2D and 3D).

Every method in the project sees a backbone the same way: ``blocks`` (an ``nn.ModuleList`` B_1..B_n), a
``feature_dim`` and ``forward(x) -> (B, feature_dim)`` pooled features. FFCL's local stage needs the blocks; SimCLR,
classification and Forward-Forward only need the pooled features.

Which modules form each block (this is what FFCL's local stage trains one by one):

ResNet-10/18/34/50 (``monai.networks.nets.ResNet``):
    - B_1 "stem":   conv1 -> bn1 -> act (ReLU) -> maxpool
    - B_2 "layer1", B_3 "layer2", B_4 "layer3", B_5 "layer4": the residual stages; each ends with the ReLU of its
      last residual block, so every block output is "after ReLU".
DenseNet121 (``monai.networks.nets.DenseNet121``):
    - B_1 "stem":   conv0 -> norm0 -> relu0 -> pool0
    - B_2..B_4 "dense{i}": denseblock{i} -> transition{i} (norm -> relu -> conv -> pool)
    - B_5 "dense4": denseblock4 -> norm5 -> ReLU (the ReLU DenseNet otherwise applies in its classification head)
    Transition outputs end in a 1x1 conv + pooling, not a ReLU, so ``block_embeddings`` applies ReLU before pooling
    to keep "embedding = block output after ReLU, globally average-pooled" true for every block.

The stem stride defaults to 2 (``conv1_stride``), as in torchvision's and the FFCL paper's ResNet; MONAI's own
default is 1, which costs 4x the compute and breaks the mapping of ImageNet weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck, get_inplanes
from torch import nn

from ffcl_monai.data.distributed import unwrap_module

RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (ResNetBlock, [1, 1, 1, 1]),
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
}
BACKBONES = [*RESNET_LAYOUTS, "densenet121"]


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a (B, C, *spatial) map to (B, C), for any number of spatial dims."""
    return x.flatten(2).mean(dim=2)


class Backbone(nn.Module):
    """A feature extractor made of named blocks.

    Args:
        blocks: the blocks B_1..B_n in forward order.
        block_names: a human-readable name per block (used in logs and MLflow metric names).
        block_channels: number of output channels of each block.
        name: the architecture name, recorded in checkpoints so that a mismatching backbone is refused on load.
        spatial_dims: 2 or 3.
        in_channels: number of input channels.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        block_names: Sequence[str],
        block_channels: Sequence[int],
        name: str,
        spatial_dims: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.block_names = list(block_names)
        self.block_channels = list(block_channels)
        self.name = name
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels

    @property
    def feature_dim(self) -> int:
        """Length of the pooled feature vector returned by ``forward``."""
        return self.block_channels[-1]

    def forward_blocks(self, x: torch.Tensor, detach_inputs: bool = False) -> list[torch.Tensor]:
        """Outputs of every block (feature maps, after ReLU).

        Args:
            x: input batch (B, C, *spatial).
            detach_inputs: cut the graph between blocks, so that a loss on block k's output reaches only block k.
                This is FFCL's local stage: one forward pass updates every block from its own loss.
        """
        outputs = []
        for block in self.blocks:
            x = block(x.detach() if detach_inputs else x)
            outputs.append(x)
        return outputs

    def block_embeddings(self, x: torch.Tensor, detach_inputs: bool = False) -> list[torch.Tensor]:
        """E_i for every block: the block output after ReLU, globally average-pooled to (B, C_i)."""
        return [global_pool(F.relu(o)) for o in self.forward_blocks(x, detach_inputs=detach_inputs)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return global_pool(F.relu(x))


def _resnet_backbone(
    name: str, spatial_dims: int, in_channels: int, conv1_kernel: int, conv1_stride: int, no_max_pool: bool
) -> Backbone:
    block, layers = RESNET_LAYOUTS[name]
    net = ResNet(
        block=block,
        layers=layers,
        block_inplanes=get_inplanes(),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=conv1_kernel,
        conv1_t_stride=conv1_stride,
        no_max_pool=no_max_pool,
        feed_forward=False,
    )
    stem = nn.Sequential()
    stem.add_module("conv1", net.conv1)
    stem.add_module("bn1", net.bn1)
    stem.add_module("act", net.act)
    if not no_max_pool:
        stem.add_module("maxpool", net.maxpool)
    expansion = 4 if block is ResNetBottleneck else 1
    channels = [64] + [c * expansion for c in get_inplanes()]
    return Backbone(
        [stem, net.layer1, net.layer2, net.layer3, net.layer4],
        ["stem", "layer1", "layer2", "layer3", "layer4"],
        channels,
        name,
        spatial_dims,
        in_channels,
    )


def _densenet_backbone(spatial_dims: int, in_channels: int) -> Backbone:
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    f = net.features
    stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
    blocks: list[nn.Module] = [stem]
    names = ["stem"]
    channels = [f.conv0.out_channels]
    for i in (1, 2, 3):
        blocks.append(nn.Sequential(getattr(f, f"denseblock{i}"), getattr(f, f"transition{i}")))
        names.append(f"dense{i}")
        channels.append(_out_channels(getattr(f, f"transition{i}")))
    blocks.append(nn.Sequential(f.denseblock4, f.norm5, nn.ReLU(inplace=False)))
    names.append("dense4")
    channels.append(f.norm5.num_features)
    return Backbone(blocks, names, channels, "densenet121", spatial_dims, in_channels)


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return convs[-1].out_channels


def build_backbone(
    name: str = "resnet18",
    spatial_dims: int = 2,
    in_channels: int = 1,
    conv1_kernel: int = 7,
    conv1_stride: int = 2,
    no_max_pool: bool = False,
) -> Backbone:
    """Build a MONAI backbone as a :class:`Backbone` of blocks.

    Args:
        name: one of ``resnet10``, ``resnet18``, ``resnet34``, ``resnet50``, ``densenet121``.
        spatial_dims: 2 for images, 3 for volumes (3D convolutions).
        in_channels: input channels (1 for grayscale X-ray, OCT, MRI/CT).
        conv1_kernel, conv1_stride, no_max_pool: ResNet stem; defaults match torchvision's ResNet. For very small
            inputs (28 px) ``conv1_kernel=3, conv1_stride=1, no_max_pool=True`` keeps more resolution at a higher cost.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}; set the `spatial_dims` config key.")
    if name in RESNET_LAYOUTS:
        return _resnet_backbone(name, spatial_dims, in_channels, conv1_kernel, conv1_stride, no_max_pool)
    if name == "densenet121":
        return _densenet_backbone(spatial_dims, in_channels)
    raise ValueError(f"unknown backbone {name!r}; set the `backbone` config key to one of {BACKBONES}.")


def as_backbone(network: nn.Module) -> Backbone:
    """The :class:`Backbone` inside ``network``: itself, its ``.backbone``, or either inside a DDP / DataParallel /
    ``torch.compile`` wrapper.

    Raises:
        TypeError: for a network without a project backbone, naming how to build one.
    """
    net = unwrap_module(network)
    if isinstance(net, Backbone):
        return net
    bb = getattr(net, "backbone", None)
    if isinstance(bb, Backbone):
        return bb
    raise TypeError(
        f"expected a ffcl_monai Backbone (with .blocks) or a model with .backbone, got {type(net).__name__}; "
        "build the network with ffcl_monai.networks.backbones.build_backbone or Classifier."
    )
