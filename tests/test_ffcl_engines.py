"""FFCL local and global stages: gradient isolation between blocks, single pass vs greedy, per-block metrics,
checkpoints that the next stage loads."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ffcl_monai.engines.ffcl import GlobalContrastiveTrainer, LocalContrastiveTrainer, local_step_per_block
from ffcl_monai.handlers.checkpoint import BackboneSaver
from ffcl_monai.losses.ffcl_pair import FFCLPairLoss
from ffcl_monai.networks.backbones import build_backbone
from ffcl_monai.networks.checkpoints import init_backbone, load_backbone
from ffcl_monai.networks.classifier import Classifier
from ffcl_monai.networks.projection import GlobalContrastModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n=8, size=16, spatial_dims=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1,) + (size,) * spatial_dims
    items = [{"image": torch.rand(shape, generator=g), "label": i % 2} for i in range(n)]
    return DataLoader(items, batch_size=4, shuffle=False)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("name", ["resnet10", "densenet121"])
def test_block_loss_gradient_is_zero_on_every_other_block(name):
    torch.manual_seed(0)
    bb = build_backbone(name, spatial_dims=2, in_channels=1)
    x = torch.rand(3, 1, 32, 32)
    y = torch.tensor([0, 1, 0])
    loss_fn = FFCLPairLoss()
    embs = bb.block_embeddings(x, detach_inputs=True)
    for k, e in enumerate(embs):
        bb.zero_grad(set_to_none=True)
        loss_fn(e, y).backward(retain_graph=True)
        for j, block in enumerate(bb.blocks):
            grads = [p.grad for p in block.parameters()]
            if j == k:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), f"block {k} got no gradient"
            else:
                assert all(g is None or g.abs().sum() == 0 for g in grads), f"loss of block {k} reached block {j}"
    # The single-pass sum gives each block exactly its own loss's gradient.
    bb.zero_grad(set_to_none=True)
    embs = bb.block_embeddings(x, detach_inputs=True)
    torch.stack([loss_fn(e, y) for e in embs]).sum().backward()
    summed = {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}
    k = 1
    bb.zero_grad(set_to_none=True)
    loss_fn(bb.block_embeddings(x, detach_inputs=True)[k], y).backward()
    for n, p in bb.blocks[k].named_parameters():
        torch.testing.assert_close(summed[f"blocks.{k}.{n}"], p.grad)


def test_local_single_pass_trains_all_blocks_logs_per_block_and_saves(tmp_path):
    torch.manual_seed(0)
    net = Classifier("resnet10", num_classes=2, spatial_dims=2, in_channels=1)
    opt = torch.optim.Adam(net.backbone.parameters(), lr=1e-3)
    before = [_params(b) for b in net.backbone.blocks]
    trainer = LocalContrastiveTrainer("cpu", 1, _data(), net, opt, amp=False, train_handlers=[])
    BackboneSaver(tmp_path / "local.pt", net, {"stage": "local"}).attach(trainer)
    trainer.run()
    m = trainer.state.metrics
    assert set(m) == {"local_loss", "lr", "skipped_steps"} | {f"local_loss_{n}" for n in net.backbone.block_names}
    assert m["skipped_steps"] == 0 and m["lr"] == 1e-3
    # MONAI's keys (image, label, pred) and the loss with its parts per block
    assert set(trainer.state.output) == {"image", "label", "pred", "loss"} | {
        f"loss_{n}" for n in net.backbone.block_names
    }
    for b, old in zip(net.backbone.blocks, before):
        assert any(not torch.equal(p, q) for p, q in zip(_params(b), old))
    fresh = build_backbone("resnet10")
    load_backbone(fresh, tmp_path / "local.pt")
    for p, q in zip(fresh.parameters(), net.backbone.parameters()):
        assert torch.equal(p, q)


def test_local_greedy_trains_one_block_per_epoch_range():
    torch.manual_seed(0)
    bb = build_backbone("resnet10")
    opt = torch.optim.Adam(bb.parameters(), lr=1e-3)
    trainer = LocalContrastiveTrainer("cpu", 5, _data(), bb, opt, schedule="greedy", amp=False)
    snaps = []

    @trainer.on(__import__("ignite").engine.Events.EPOCH_COMPLETED)
    def _snap(engine):
        snaps.append([_params(b) for b in bb.blocks])

    start = [_params(b) for b in bb.blocks]
    trainer.run()
    for epoch, snap in enumerate(snaps):
        prev = start if epoch == 0 else snaps[epoch - 1]
        changed = [any(not torch.equal(p, q) for p, q in zip(a, b)) for a, b in zip(snap, prev)]
        assert changed == [i == epoch for i in range(5)], (epoch, changed)
    assert "local_loss_layer4" in trainer.state.metrics and "local_loss_stem" not in trainer.state.metrics
    with pytest.raises(ValueError, match="local#max_epochs"):
        LocalContrastiveTrainer("cpu", 2, _data(), bb, opt, schedule="greedy")


def test_global_stage_end_to_end_with_projection_and_3d(tmp_path):
    torch.manual_seed(0)
    bb = build_backbone("resnet10", spatial_dims=3)
    model = GlobalContrastModel(bb, projection="mlp", proj_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = GlobalContrastiveTrainer("cpu", 1, _data(n=4, size=12, spatial_dims=3), model, opt, amp=False)
    before = _params(bb.blocks[0])
    trainer.run()
    assert "global_loss" in trainer.state.metrics
    assert any(not torch.equal(p, q) for p, q in zip(_params(bb.blocks[0]), before))


def test_local_stage_3d_and_bf16_autocast():
    torch.manual_seed(0)
    bb = build_backbone("resnet10", spatial_dims=3)
    opt = torch.optim.Adam(bb.parameters(), lr=1e-3)
    LocalContrastiveTrainer("cpu", 1, _data(n=4, size=12, spatial_dims=3), bb, opt, amp=False).run()
    bb = build_backbone("resnet10")
    opt = torch.optim.Adam(bb.parameters(), lr=1e-3)
    trainer = LocalContrastiveTrainer("cpu", 1, _data(n=4), bb, opt, amp=True)
    assert trainer.bf16
    trainer.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.state.metrics.values())
    assert LocalContrastiveTrainer("cpu", 1, _data(), build_backbone("resnet10"), opt).bf16 is False  # CPU default


def test_notebook_style_reference_updates_every_block():
    torch.manual_seed(0)
    bb = build_backbone("resnet10")
    opt = torch.optim.Adam(bb.parameters(), lr=1e-3)
    before = [_params(b) for b in bb.blocks]
    losses = local_step_per_block(bb, opt, FFCLPairLoss(), torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 0, 1]))
    assert len(losses) == len(bb.blocks)
    assert all(any(not torch.equal(p, q) for p, q in zip(_params(b), old)) for b, old in zip(bb.blocks, before))


def test_init_backbone_from_project_checkpoint(tmp_path):
    from ffcl_monai.networks.checkpoints import save_backbone

    src = build_backbone("resnet10")
    save_backbone(tmp_path / "b.pt", src)
    net = init_backbone(Classifier("resnet10"), str(tmp_path / "b.pt"))
    assert torch.equal(net.backbone.blocks[0].conv1.weight, src.blocks[0].conv1.weight)
    assert init_backbone(net, "random") is net
