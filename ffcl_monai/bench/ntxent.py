"""NT-Xent bench: the project's loss against ``monai.losses.ContrastiveLoss``, forward + backward, side by side.

``python -m ffcl_monai.bench ntxent [--quick] [--device cpu|cuda]``. For each batch size B (D = 128) both losses are
timed in interleaved order on the same inputs and their peak extra memory is measured; the values of the two losses
are checked to agree before anything is timed. Target: >= 100x faster at B = 256 on CPU.
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.losses import ContrastiveLoss

from ffcl_monai.bench.common import BenchResult, peak_memory, time_interleaved
from ffcl_monai.losses.ntxent import NTXentLoss

DIM = 128
TEMPERATURE = 0.5


def _step(loss_fn: Callable, z1: torch.Tensor, z2: torch.Tensor) -> Callable[[], None]:
    def fn() -> None:
        a = z1.detach().requires_grad_(True)
        b = z2.detach().requires_grad_(True)
        loss_fn(a, b).backward()

    return fn


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Time forward+backward of both losses at B in {64, 256, 1024} (quick: {64, 256}), D = 128."""
    del data_root  # synthetic embeddings only
    sizes = [64, 256] if quick else [64, 256, 1024]
    repeats = 3 if quick else 5
    ours_fn = NTXentLoss(temperature=TEMPERATURE)
    monai_fn = ContrastiveLoss(temperature=TEMPERATURE)
    result = BenchResult(name="ntxent", targets={"speedup_B256": ">= 100 (CPU)"})
    gen = torch.Generator().manual_seed(0)
    for b in sizes:
        z1 = torch.randn(b, DIM, generator=gen).to(device)
        z2 = torch.randn(b, DIM, generator=gen).to(device)
        v_ours, v_monai = float(ours_fn(z1, z2)), float(monai_fn(z1, z2))
        if abs(v_ours - v_monai) > 1e-4 * max(1.0, abs(v_monai)):
            raise AssertionError(f"NT-Xent and ContrastiveLoss disagree at B={b}: {v_ours} vs {v_monai}")
        # ContrastiveLoss at B=1024 materialises (2048, 2048, 128) float tensors (~2 GiB each): fewer repeats.
        reps = 2 if b >= 1024 and torch.device(device).type == "cpu" else repeats
        times = time_interleaved(
            {"ffcl_ntxent": _step(ours_fn, z1, z2), "monai_contrastive": _step(monai_fn, z1, z2)},
            warmup=1,
            repeats=reps,
            device=device,
        )
        mem_ours = peak_memory(_step(ours_fn, z1, z2), device)
        mem_monai = peak_memory(_step(monai_fn, z1, z2), device)
        t_ours, t_monai = times["ffcl_ntxent"]["median_s"], times["monai_contrastive"]["median_s"]
        result.rows.append(
            {
                "B": b,
                "D": DIM,
                "ours_ms": t_ours * 1e3,
                "monai_ms": t_monai * 1e3,
                "speedup": t_monai / t_ours,
                "ours_peak_MiB": mem_ours,
                "monai_peak_MiB": mem_monai,
                "memory_ratio": (mem_monai / mem_ours) if mem_ours else float("nan"),
                "loss": v_ours,
                "abs_diff": abs(v_ours - v_monai),
            }
        )
        result.ratios[f"speedup_B{b}"] = t_monai / t_ours
    result.notes.append(
        f"forward+backward, tau={TEMPERATURE}, median of interleaved repeats; torch threads={torch.get_num_threads()}"
    )
    return result
