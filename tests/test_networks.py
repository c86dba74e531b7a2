"""Backbones as block sequences (2D/3D, ResNet/DenseNet) and safe backbone checkpoints."""

import pytest
import torch

from ffcl_monai.networks.backbones import build_backbone
from ffcl_monai.networks.checkpoints import load_backbone, save_backbone
from ffcl_monai.networks.classifier import Classifier


@pytest.mark.parametrize("name,channels", [("resnet18", [64, 64, 128, 256, 512]), ("resnet50", [64, 256, 512, 1024, 2048]),
                                           ("densenet121", [64, 128, 256, 512, 1024])])
@pytest.mark.parametrize("dims", [2, 3])
def test_blocks_compose_to_the_backbone(name, channels, dims):
    bb = build_backbone(name, dims, 1).eval()
    x = torch.rand(2, 1, *([32] * dims))
    embeddings = bb.block_embeddings(x)
    assert [e.shape[1] for e in embeddings] == channels == bb.block_channels
    assert all((e >= 0).all() for e in embeddings)  # after ReLU
    torch.testing.assert_close(bb(x), embeddings[-1])  # the last block's embedding is the backbone's feature


def test_backbone_checkpoint_roundtrip_and_mismatch(tmp_path):
    src = Classifier("resnet10", 2, 2, 1)
    path = save_backbone(tmp_path / "bb.pt", src.backbone)
    dst = Classifier("resnet10", 5, 2, 1)
    report = load_backbone(dst, path)
    assert report == {"missing": [], "unexpected": []}
    for a, b in zip(src.backbone.state_dict().values(), dst.backbone.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="resnet18"):
        load_backbone(Classifier("resnet18", 2, 2, 1), path)
    with pytest.raises(ValueError, match="spatial_dims"):
        load_backbone(Classifier("resnet10", 2, 3, 1), path)


def test_linear_probe_freezes_backbone_and_batchnorm():
    net = Classifier("resnet10", 2, 2, 1, freeze_backbone=True).train()
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    before = net.backbone.blocks[0].bn1.running_mean.clone()
    net(torch.rand(4, 1, 32, 32) * 5)
    torch.testing.assert_close(net.backbone.blocks[0].bn1.running_mean, before)
