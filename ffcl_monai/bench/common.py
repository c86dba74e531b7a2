"""Shared timing and reporting helpers for the benchmark suite.

Every figure the suite reports is a ratio of two (or more) contenders measured side by side in the same process:
each contender is warmed up, then timed ``repeats`` times in interleaved order, and the median is reported. Timings
on shared machines are noisy, so absolute seconds are printed for context only; the ratios are the result.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    contenders: dict[str, Callable[[], Any]], warmup: int = 2, repeats: int = 5, device: str | None = None
) -> dict[str, dict[str, float]]:
    """Time several callables side by side.

    Each callable is warmed up ``warmup`` times, then the callables are run round-robin ``repeats`` times so that
    slow drifts of the machine (other processes, thermal throttling) hit all contenders alike.

    Returns:
        ``{name: {"median_s": ..., "min_s": ..., "all_s": [...]}}``
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
            sync(device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "all_s": s} for name, s in samples.items()
    }


def peak_memory(fn: Callable[[], Any], device: str = "cpu") -> float | None:
    """Peak extra memory in MiB used while running ``fn``.

    On CUDA this is ``torch.cuda.max_memory_allocated``. On CPU, torch has no allocator statistics, so the torch
    profiler's allocation records are replayed in order and their running peak is taken.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Running sum of allocations/frees in event order gives the peak live CPU memory of the call.
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0) != 0), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a core dependency
        pass
    return info


@dataclass
class BenchResult:
    """One benchmark's table: rows of dicts with the same keys, plus named headline ratios and their targets."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # "ExceptionType: message" when the bench raised instead of finishing

    def table(self) -> str:
        """Markdown table of the rows followed by the headline ratios."""
        lines = [f"## {self.name}"]
        if self.error:
            lines.append(f"- FAILED: {self.error}")
        if self.rows:
            keys = list(self.rows[0].keys())
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for r in self.rows:
                lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
        for k, v in self.ratios.items():
            target = f"  (target {self.targets[k]})" if k in self.targets else ""
            lines.append(f"- {k}: {_fmt(v)}{target}")
        lines.extend(f"- note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_report(results: list[BenchResult], device: str, out_dir: str | Path) -> Path:
    """Print every table and write one JSON file with the machine description and all results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "results": [r.__dict__ for r in results],
    }
    stamp = time.strftime("%Y%m%d_%H%M%S")
    names = "_".join(r.name for r in results) if len(results) < 4 else "all"
    path = out_dir / f"bench_{names}_{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
