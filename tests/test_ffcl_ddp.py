"""The FFCL local stage (per-block DDP wrappers) and global stage under torch.distributed (gloo, 2 CPU processes):
ranks see different data and their weights stay identical. The torchrun test of the whole bundle comes later."""

from __future__ import annotations

import socket

import pytest
import torch


def _worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from ffcl_monai.engines.ffcl import GlobalContrastiveTrainer, LocalContrastiveTrainer
    from ffcl_monai.networks.backbones import build_backbone
    from ffcl_monai.networks.projection import GlobalContrastModel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bb = build_backbone("resnet10")
    g = torch.Generator().manual_seed(rank)  # different data per rank
    loader = DataLoader([{"image": torch.rand(1, 16, 16, generator=g), "label": i % 2} for i in range(8)], batch_size=4)

    def in_sync(w: torch.Tensor) -> bool:
        ws = [torch.zeros_like(w) for _ in range(2)]
        dist.all_gather(ws, w.detach().contiguous())
        return torch.equal(ws[0], ws[1])

    out = {}
    for schedule, epochs in (("single_pass", 1), ("greedy", 5)):
        LocalContrastiveTrainer("cpu", epochs, loader, bb, torch.optim.Adam(bb.parameters(), 1e-3),
                                schedule=schedule, amp=False).run()
        out[schedule] = all(in_sync(p) for p in bb.parameters())
    model = GlobalContrastModel(bb, "mlp", 8)
    GlobalContrastiveTrainer("cpu", 1, loader, model, torch.optim.Adam(model.parameters(), 1e-3), amp=False).run()
    out["global"] = all(in_sync(p) for p in model.parameters())
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.slow
def test_local_and_global_stage_under_ddp():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(port, results), nprocs=2)
    assert dict(results[0]) == {"single_pass": True, "greedy": True, "global": True}
    assert dict(results[1]) == dict(results[0])
