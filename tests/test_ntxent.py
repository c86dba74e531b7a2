"""NT-Xent: formula, equality with monai.losses.ContrastiveLoss, stability at low temperature, DDP gathering."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss

from ffcl_monai.losses.ntxent import NTXentLoss, nt_xent


def _reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR Eq. (1) written as literally as possible: loops over anchors, positive included in the denominator."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n, b = z.shape[0], z1.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        j = (i + b) % n
        sims = torch.stack([z[i] @ z[k] for k in range(n) if k != i]) / tau
        total = total - (z[i] @ z[j] / tau - torch.logsumexp(sims, 0))
    return total / n


@pytest.mark.parametrize("b,d,tau", [(2, 3, 0.5), (7, 16, 0.1), (16, 128, 0.5), (32, 8, 1.0)])
def test_equals_monai_contrastive_loss(b: int, d: int, tau: float) -> None:
    g = torch.Generator().manual_seed(b * 100 + d)
    z1 = torch.randn(b, d, generator=g, requires_grad=True)
    z2 = torch.randn(b, d, generator=g, requires_grad=True)
    ours = NTXentLoss(temperature=tau)(z1, z2)
    theirs = ContrastiveLoss(temperature=tau)(z1, z2)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours.item(), theirs.item())
    g_ours = torch.autograd.grad(ours, (z1, z2))
    g_theirs = torch.autograd.grad(theirs, (z1, z2))
    for a, c in zip(g_ours, g_theirs):
        assert torch.allclose(a, c, atol=1e-5)


def test_matches_literal_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose(nt_xent(z1, z2, 0.2).double(), _reference(z1, z2, 0.2), atol=1e-5)


def test_perfect_alignment_gives_low_loss() -> None:
    z = torch.eye(8)
    aligned = nt_xent(z, z, 0.1)
    shuffled = nt_xent(z, z.roll(1, 0), 0.1)
    assert aligned < 0.01 < shuffled


def test_finite_at_low_temperature_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    z1 = torch.randn(64, 128, requires_grad=True)
    z2 = z1.detach() + 0.01 * torch.randn(64, 128)  # nearly aligned views: similarities close to 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = NTXentLoss(temperature=0.01)(z1, z2)
        theirs = ContrastiveLoss(temperature=0.01)(z1, z2)
    assert ours.dtype == torch.float32
    assert torch.isfinite(ours)
    ours.backward()
    assert torch.isfinite(z1.grad).all()
    assert not torch.isfinite(theirs), "ContrastiveLoss was expected to overflow at tau=0.01 (exp(1/0.01))"


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))


def test_gather_flag_is_noop_without_distributed() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.equal(nt_xent(z1, z2, 0.5, gather_distributed=True), nt_xent(z1, z2, 0.5))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = z1.shape[0] // world
        a1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        a2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = nt_xent(a1, a2, 0.3, gather_distributed=True)
        loss.backward()
        out[rank] = (loss.detach(), a1.grad / world, a2.grad / world)  # DDP averages gradients over ranks
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 processes (~25 s on 2 cores); `make test-slow`
def test_gather_distributed_two_ranks_equals_global_batch() -> None:
    """2 CPU processes (gloo): mean of rank losses and the DDP-averaged gradients equal NT-Xent on the full batch."""
    import torch.multiprocessing as mp

    torch.manual_seed(2)
    world, b = 2, 4
    z1, z2 = torch.randn(world * b, 6), torch.randn(world * b, 6)
    manager = mp.Manager()
    out = manager.dict()
    mp.start_processes(_ddp_worker, args=(world, _free_port(), z1, z2, out), nprocs=world, start_method="spawn")
    f1, f2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = nt_xent(f1, f2, 0.3)
    full.backward()
    mean_loss = sum(out[r][0] for r in range(world)) / world
    assert torch.allclose(mean_loss, full.detach(), atol=1e-6)
    for r in range(world):
        assert torch.allclose(out[r][1], f1.grad[r * b : (r + 1) * b], atol=1e-6)
        assert torch.allclose(out[r][2], f2.grad[r * b : (r + 1) * b], atol=1e-6)
