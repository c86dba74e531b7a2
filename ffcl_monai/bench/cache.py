"""Datasets larger than memory: the disk cache (``cache: disk``) against the in-RAM float32 cache (``cache: ram``).

``python -m ffcl_monai.bench cache --n 2000 --size 224``: writes N synthetic 8-bit grayscale PNGs of ``size`` px to
a temporary folder (removed at the end; ``--work-dir`` to choose where), runs train.yaml's deterministic prefix
(load, channels, min-max, resize to ``size``) into a disk cache there, and reports:

- bytes per image: float32 (what the RAM cache holds), and the disk cache's files, compact (uint8) and float32
  (``cache_compact: false``, measured on a subset);
- the peak RSS of the process while the disk cache is built and iterated (``resource.getrusage``), against the
  float32 size of the dataset and the ``--budget-gb`` given to the planner (default: 5% of the float32 size, so that
  ``cache: auto`` picks the disk cache). The OS page cache holding recently read cache files is not in the RSS;
- epoch-2 throughput (images/s through a DataLoader, batch 32, no augmentations) of the disk cache as a ratio to the
  RAM cache, on a subset that fits in RAM (``--subset``), and of no cache (decode every epoch) for context;
- the planner's choice for N images at this size and budget.

The issue's real measurement is N >= 100000 at 224 px (the scale of NIH ChestX-ray14); the bench prints the disk space
it needs first and refuses to start when the disk is too small.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffcl_monai.bench.common import BenchResult

#: Approximate bytes of one synthetic source PNG per pixel (smooth content + noise, measured) and of torch.save's
#: per-file overhead in the cache.
PNG_BYTES_PER_PIXEL = 0.75
SAVE_OVERHEAD = 3100


def _rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def _rss_now_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency via monai[psutil]
        return _rss_peak_bytes()


def estimate_disk_bytes(n: int, size: int, source_size: int) -> int:
    """Disk space the bench needs: the source PNGs, the compact (uint8) cache, and a float32 cache of a subset."""
    return int(n * (source_size**2 * PNG_BYTES_PER_PIXEL + size**2 + SAVE_OVERHEAD) + 200 * (size**2 * 4 + SAVE_OVERHEAD))


def write_pngs(root: Path, n: int, size: int, seed: int = 0) -> list[dict]:
    """N synthetic 8-bit grayscale PNGs (a smooth random field plus noise and a disk for label 1)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    items = []
    for i in range(n):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        img = 0.5 + 0.25 * np.sin(2 * np.pi * (a * xx + b * yy + c)) + rng.normal(0, 0.05, (size, size))
        if i % 2:
            img += 0.3 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.04)
        path = root / f"img_{i:06d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        items.append({"image": str(path), "label": i % 2})
    return items


def _prefix(size: int) -> list[Any]:
    from monai.bundle import ConfigParser

    from ffcl_monai import bundle_root

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root(), "configs", "train.yaml"))
    parser["image_size"] = [size, size]
    return parser.get_parsed_content("deterministic_transforms")


def _epoch(ds: Any, batch_size: int = 32) -> int:
    from monai.data import DataLoader

    n = 0
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        n += batch["image"].shape[0]
    return n


def _images_per_s(ds: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = _epoch(ds)
        times.append(time.perf_counter() - t0)
    return n / float(np.median(times))


def run(device: str = "cpu", quick: bool = False, data_root: str | None = None, n: int | None = None,
        size: int | None = None, source_size: int | None = None, subset: int | None = None,
        budget_gb: float | None = None, work_dir: str | None = None, keep: bool = False) -> BenchResult:
    from monai.data import CacheDataset, Dataset

    from ffcl_monai.data.cache_planner import bytes_per_item, plan_cache
    from ffcl_monai.data.disk_cache import disk_dataset

    n = int(n or (200 if quick else 2000))
    size = int(size or (64 if quick else 224))
    source_size = int(source_size or size)
    subset = min(n, int(subset or (200 if quick else 1000)))
    repeats = 1 if quick else 3
    f32 = bytes_per_item([size, size], 1, 4)
    budget_gb = float(budget_gb) if budget_gb else 0.05 * n * f32 / 2**30
    parent = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    need = estimate_disk_bytes(n, size, source_size)
    free = shutil.disk_usage(parent).free
    big = estimate_disk_bytes(100_000, 224, 224)
    print(f"cache bench: {n} PNGs of {source_size} px -> {size} px under {parent}; needs ~{need / 2**30:.2f} GiB of "
          f"{free / 2**30:.1f} GiB free (the 100k x 224 px run needs ~{big / 2**30:.1f} GiB)", flush=True)
    if need > 0.9 * free:
        raise SystemExit(f"not enough disk space under {parent}: ~{need / 2**30:.1f} GiB needed, "
                         f"{free / 2**30:.1f} GiB free; use --work-dir elsewhere or a smaller --n.")
    root = Path(tempfile.mkdtemp(prefix="ffcl_cache_bench_", dir=parent))
    result = BenchResult(name="cache")
    try:
        t0 = time.perf_counter()
        items = write_pngs(root / "img", n, source_size)
        t_write = time.perf_counter() - t0
        plan = plan_cache("auto", n, [size, size], 1, memory_budget_gb=budget_gb, device=device,
                          cache_dir=str(root / "cache"), log=False)
        prefix = _prefix(size)

        # --- disk cache, the whole dataset: build (epoch 1), then epoch 2; RSS before and after
        rss_before, peak_before = _rss_now_bytes(), _rss_peak_bytes()
        t0 = time.perf_counter()
        disk = disk_dataset(items, prefix, root / "cache", compact=True)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _epoch(disk)
        t_epoch2_full = time.perf_counter() - t0
        peak_after = _rss_peak_bytes()
        compact_files = list(Path(disk.cache_dir).glob("*.pt"))
        compact_bytes = sum(p.stat().st_size for p in compact_files) / len(compact_files)

        # --- float32 disk files, on a small subset
        few = items[: min(n, 100)]
        exact = disk_dataset(few, prefix, root / "cache_f32", compact=False)
        f32_files = list(Path(exact.cache_dir).glob("*.pt"))
        f32_file_bytes = sum(p.stat().st_size for p in f32_files) / len(f32_files)

        # --- epoch-2 throughput on a subset that fits in RAM: RAM cache vs disk cache vs no cache
        part = items[:subset]
        ram = CacheDataset(part, prefix, cache_rate=1.0, progress=False)
        disk_part = disk_dataset(part, prefix, root / "cache", compact=True)  # same files as above
        for ds in (ram, disk_part):
            _epoch(ds)  # warm-up (epoch 1)
        ram_ips, disk_ips = [], []
        for _ in range(repeats):  # interleaved
            ram_ips.append(_images_per_s(ram, 1))
            disk_ips.append(_images_per_s(disk_part, 1))
        ram_ips_m, disk_ips_m = float(np.median(ram_ips)), float(np.median(disk_ips))
        decode = Dataset(part[: min(len(part), 200)], prefix)
        none_ips = _images_per_s(decode, 1)
        max_diff = max(float((disk_part[i]["image"] - ram[i]["image"]).abs().max()) for i in range(min(20, subset)))

        result.rows = [
            {"cache": "ram (float32, CacheDataset)", "bytes/image": f32, "epoch-2 images/s": ram_ips_m,
             "images": subset},
            {"cache": "disk compact (uint8 file)", "bytes/image": compact_bytes, "epoch-2 images/s": disk_ips_m,
             "images": subset},
            {"cache": "disk float32 (file)", "bytes/image": f32_file_bytes, "epoch-2 images/s": float("nan"),
             "images": len(few)},
            {"cache": "none (decode + resize)", "bytes/image": 0, "epoch-2 images/s": none_ips,
             "images": len(decode)},
        ]
        result.ratios = {
            "float32_over_compact_bytes": f32 / compact_bytes,
            "float32_file_over_compact_file": f32_file_bytes / compact_bytes,
            "disk_over_ram_epoch2_throughput": disk_ips_m / ram_ips_m,
            "disk_over_none_epoch2_throughput": disk_ips_m / none_ips,
            "peak_rss_growth_over_float32_dataset": max(0, peak_after - peak_before) / (n * f32),
            "peak_rss_growth_over_budget": max(0, peak_after - peak_before) / (budget_gb * 2**30),
        }
        result.notes = [
            f"planner for {n} images of {size} px, budget {budget_gb:.3f} GiB: {plan}",
            f"{n} images: float32 dataset {n * f32 / 2**30:.3f} GiB; compact disk cache "
            f"{n * compact_bytes / 2**30:.3f} GiB; 100k x 224 px: float32 {100_000 * 224 * 224 * 4 / 2**30:.1f} GiB, "
            f"compact ~{100_000 * (224 * 224 + SAVE_OVERHEAD) / 2**30:.1f} GiB",
            f"peak RSS {peak_before / 2**20:.0f} -> {peak_after / 2**20:.0f} MiB while the disk cache of {n} images was "
            f"built and iterated (RSS now {rss_before / 2**20:.0f} -> {_rss_now_bytes() / 2**20:.0f} MiB); budget "
            f"{budget_gb * 1024:.0f} MiB, float32 dataset {n * f32 / 2**20:.0f} MiB",
            f"times: write PNGs {t_write:.1f} s, build disk cache {t_build:.1f} s ({n / t_build:.0f} images/s), "
            f"epoch 2 of all {n} from disk {t_epoch2_full:.1f} s ({n / t_epoch2_full:.0f} images/s)",
            f"largest |disk compact - RAM| over {min(20, subset)} images: {max_diff:.2e} (half an 8-bit step: "
            f"{0.5 / 255:.2e})",
        ]
        result.notes.append("the peak RSS growth is a fixed cost (threads, buffers, one batch), not per image: its "
                            "ratios are only meaningful for a large --n")
        result.targets = {"float32_over_compact_bytes": ">= 3.5 at 224 px (uint8 vs float32, ~3 KB per file)",
                          "peak_rss_growth_over_budget": "< 1 (large --n)",
                          "disk_over_ram_epoch2_throughput": "context: a fraction of RAM, far above no cache"}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)  # only the folder this run created
    return result
