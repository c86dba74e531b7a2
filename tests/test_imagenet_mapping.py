"""torchvision ResNet ImageNet state dict -> MONAI ResNet backbone, with a file written here (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from ffcl_monai.networks.backbones import build_backbone
from ffcl_monai.networks.checkpoints import init_backbone
from ffcl_monai.networks.classifier import Classifier
from ffcl_monai.networks.imagenet import load_imagenet_resnet, torchvision_resnet_to_backbone


def torchvision_resnet_state(layers: list[int], bottleneck: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet key names and shapes (torchvision.models.resnet), random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, out_c, in_c, k):
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=g)

    def bn(name, c):
        sd[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    expansion = 4 if bottleneck else 1
    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers), start=1):
        for b in range(n):
            p = f"layer{i}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            if b == 0 and (i > 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1), bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = torch.randn(1000, 512 * expansion, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resnet18_file_grayscale_and_rgb(tmp_path):
    tv = torchvision_resnet_state([2, 2, 2, 2], bottleneck=False)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv, path)

    gray = build_backbone("resnet18", in_channels=1)
    report = load_imagenet_resnet(gray, path)
    sd = gray.state_dict()
    assert report["loaded"] == len(sd)
    torch.testing.assert_close(sd["blocks.0.conv1.weight"], tv["conv1.weight"].mean(dim=1, keepdim=True))
    torch.testing.assert_close(sd["blocks.0.bn1.running_var"], tv["bn1.running_var"])
    torch.testing.assert_close(sd["blocks.1.1.conv2.weight"], tv["layer1.1.conv2.weight"])
    torch.testing.assert_close(sd["blocks.3.0.downsample.0.weight"], tv["layer3.0.downsample.0.weight"])
    torch.testing.assert_close(sd["blocks.4.1.bn2.bias"], tv["layer4.1.bn2.bias"])
    assert torch.count_nonzero(sd["blocks.2.0.downsample.0.bias"]) == 0  # torchvision has no shortcut bias
    # Every tensor of the file except fc lands somewhere, and the mapped net runs.
    mapped = {k for k in sd if not k.endswith("downsample.0.bias")}
    assert len(mapped) == len([k for k in tv if not k.startswith("fc.")])
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 512)

    rgb = build_backbone("resnet18", in_channels=3)
    load_imagenet_resnet(rgb, path)
    torch.testing.assert_close(rgb.state_dict()["blocks.0.conv1.weight"], tv["conv1.weight"])

    # Through the pipeline's `init` key, wrapped the way users may save it ({"state_dict": ..., "module." keys}).
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.items()}}, wrapped)
    net = init_backbone(Classifier("resnet18"), f"imagenet:{wrapped}")
    torch.testing.assert_close(net.backbone.blocks[2][1].conv1.weight, tv["layer2.1.conv1.weight"])


def test_resnet50_bottleneck_mapping():
    tv = torchvision_resnet_state([3, 4, 6, 3], bottleneck=True, seed=1)
    bb = build_backbone("resnet50")
    mapped = torchvision_resnet_to_backbone(tv, bb)
    bb.load_state_dict(mapped, strict=True)
    torch.testing.assert_close(bb.state_dict()["blocks.1.0.downsample.1.weight"], tv["layer1.0.downsample.1.weight"])
    torch.testing.assert_close(bb.state_dict()["blocks.3.5.conv3.weight"], tv["layer3.5.conv3.weight"])


def test_refusals_name_the_config_key():
    tv = torchvision_resnet_state([2, 2, 2, 2], bottleneck=False)
    with pytest.raises(ValueError, match="spatial_dims"):
        torchvision_resnet_to_backbone(tv, build_backbone("resnet18", spatial_dims=3))
    with pytest.raises(ValueError, match="backbone"):
        torchvision_resnet_to_backbone(tv, build_backbone("resnet34"))  # depth mismatch
    with pytest.raises(ValueError, match="conv1_kernel"):
        torchvision_resnet_to_backbone(tv, build_backbone("resnet18", conv1_kernel=3, conv1_stride=1))
