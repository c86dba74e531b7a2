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


def _available_mib(device: str) -> float | None:
    """Free memory for the ContrastiveLoss guard: available RAM on CPU, free GPU memory on CUDA."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free / 2**20
    try:
        import psutil

        return psutil.virtual_memory().available / 2**20
    except ImportError:  # pragma: no cover - psutil comes with monai[psutil]
        return None


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Time forward+backward of both losses at B in {64, 256, 1024} (quick: {64, 256}), D = 128."""
    del data_root  # synthetic embeddings only
    sizes = [64, 256] if quick else [64, 256, 1024]
    repeats = 3 if quick else 5
    ours_fn = NTXentLoss(temperature=TEMPERATURE)
    monai_fn = ContrastiveLoss(temperature=TEMPERATURE)
    result = BenchResult(name="ntxent", targets={"speedup_B256": ">= 100 (CPU)"})
    gen = torch.Generator().manual_seed(0)
    monai_peak: tuple[int, float] | None = None  # (B, MiB) of the last ContrastiveLoss measurement
    for b in sizes:
        z1 = torch.randn(b, DIM, generator=gen).to(device)
        z2 = torch.randn(b, DIM, generator=gen).to(device)
        # ContrastiveLoss needs O(B^2 D) memory: (2B, 2B, D) float tensors, several GiB at B = 1024. Its need is
        # extrapolated from the previous size, and it is skipped (with a note) rather than crash a shared machine.
        need = monai_peak[1] * (b / monai_peak[0]) ** 2 if monai_peak else 0.0
        room = _available_mib(device)
        run_monai = not (room is not None and need > 0.5 * room)
        v_ours = float(ours_fn(z1, z2))
        contenders = {"ffcl_ntxent": _step(ours_fn, z1, z2)}
        v_monai = float("nan")
        if run_monai:
            v_monai = float(monai_fn(z1, z2))
            if abs(v_ours - v_monai) > 1e-4 * max(1.0, abs(v_monai)):
                raise AssertionError(f"NT-Xent and ContrastiveLoss disagree at B={b}: {v_ours} vs {v_monai}")
            contenders["monai_contrastive"] = _step(monai_fn, z1, z2)
        else:
            result.notes.append(
                f"B={b}: ContrastiveLoss skipped, it would need ~{need / 1024:.1f} GiB (extrapolated from "
                f"B={monai_peak[0] if monai_peak else '?'}) and {room / 1024 if room else 0:.1f} GiB are available"
            )
        reps = 2 if b >= 1024 and torch.device(device).type == "cpu" else repeats
        times = time_interleaved(contenders, warmup=1, repeats=reps, device=device)
        mem_ours = peak_memory(_step(ours_fn, z1, z2), device)
        mem_monai = peak_memory(_step(monai_fn, z1, z2), device) if run_monai else None
        if mem_monai:
            monai_peak = (b, mem_monai)
        t_ours = times["ffcl_ntxent"]["median_s"]
        t_monai = times["monai_contrastive"]["median_s"] if run_monai else float("nan")
        result.rows.append(
            {
                "B": b,
                "D": DIM,
                "ours_ms": t_ours * 1e3,
                "monai_ms": t_monai * 1e3,
                "speedup": t_monai / t_ours,
                "ours_peak_MiB": mem_ours,
                "monai_peak_MiB": mem_monai,
                "memory_ratio": (mem_monai / mem_ours) if mem_ours and mem_monai else float("nan"),
                "loss": v_ours,
                "abs_diff": abs(v_ours - v_monai),
            }
        )
        if run_monai:
            result.ratios[f"speedup_B{b}"] = t_monai / t_ours
    result.notes.append(
        f"forward+backward, tau={TEMPERATURE}, median of interleaved repeats; torch threads={torch.get_num_threads()}"
    )
    return result
