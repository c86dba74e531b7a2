"""Where the cached deterministic prefix lives: RAM, RAM + disk, disk, or nowhere (``cache`` in train.yaml).

The deterministic prefix (load, channels, scale, resize) is cached once per image. A ``CacheDataset`` holds it in RAM
as float32 (and with ``cache_on_device`` on the GPU), which for NIH ChestX-ray14 (112k) or CheXpert (224k) at 224 px
is 22-45 GB. :func:`plan_cache` decides, from counts and configured sizes only (it never opens an image), where the
cache goes:

========== ===================================================================================================
``ram``     everything in RAM, float32 (MONAI ``CacheDataset``, ``cache_rate`` of it): the behaviour before
            ``cache`` existed. On CUDA also on the GPU (``cache_on_device``) when ``cache: auto`` finds room there.
``partial`` the fraction that fits the budget in RAM (float32, as ``ram``), the rest in the disk cache.
``disk``    MONAI ``PersistentDataset`` in ``cache_dir``, stored compactly (uint8 for 8-bit sources, uint16 for
            other integer sources, float32 otherwise; :mod:`ffcl_monai.data.disk_cache`).
``none``    no cache: every image is decoded and resized every epoch.
========== ===================================================================================================

``cache: auto`` picks ``ram`` when the float32 cache fits ``memory_budget_gb`` (default: half the RAM available at
start), ``partial`` when at least :data:`MIN_PARTIAL_FRACTION` of it fits, ``disk`` otherwise, and logs one line with
the numbers. ``cache: ram`` is exactly the old behaviour (``cache_rate``, and ``cache_on_device`` on CUDA).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: The choices of the ``cache`` key.
CACHE_MODES = ("auto", "ram", "disk", "none")
#: ``cache: auto`` uses this fraction of the RAM available at start when ``memory_budget_gb`` is not set.
DEFAULT_RAM_FRACTION = 0.5
#: Below this fraction of the dataset fitting in the budget, ``auto`` uses the disk cache alone (a RAM part that small
#: saves little and costs a second code path).
MIN_PARTIAL_FRACTION = 0.1
#: With CUDA, ``auto`` caches on the GPU only when the float32 cache fits in the GPU's free memory minus this fraction
#: of its total memory (kept for the model, its activations, optimizer state and the augmentations).
GPU_RESERVE_FRACTION = 0.5


def available_memory_bytes() -> int:
    """RAM available to new allocations now: psutil when installed, else ``MemAvailable`` of /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown platform: assume a modest 8 GiB


def gpu_memory_bytes(device: Any = None) -> tuple[int, int] | None:
    """(free, total) bytes of the CUDA ``device``, or None without CUDA (or for a CPU device)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), int(total)
    except Exception:  # a broken driver must not stop training: no GPU caching then
        return None


def bytes_per_item(image_size: Sequence[int] | int, channels: int = 1, dtype_bytes: int = 4,
                   spatial_dims: int | None = None) -> int:
    """Bytes of one cached image: channels x prod(image_size) x dtype_bytes (labels and metadata are negligible)."""
    if isinstance(image_size, int):
        image_size = [image_size] * int(spatial_dims or 2)
    return int(channels) * math.prod(int(s) for s in image_size) * int(dtype_bytes)


def count_items(datalist: str | os.PathLike, splits: Sequence[str] = ("training", "validation")) -> int:
    """The number of entries of ``splits`` in a Decathlon datalist (JSON only: no image is opened; absent splits
    count 0). All ranks of a multi-GPU run get the same number, so they all choose the same cache."""
    with open(datalist) as f:
        content = json.load(f)
    return sum(len(content.get(s) or []) for s in splits)


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass(frozen=True)
class CachePlan:
    """What :func:`plan_cache` chose, and the numbers it chose it from (logged as one line by ``str()``)."""

    mode: str                     # ram | partial | disk | none
    cache_rate: float             # of each dataset in RAM (ram, partial); 0 for disk and none
    on_device: bool               # the RAM cache also on the GPU (cache_on_device)
    cache_dir: str | None = None  # the disk cache's parent folder (partial, disk)
    compact: bool = True          # the disk cache stores uint8/uint16 where the source allows
    n_items: int = 0
    item_bytes: int = 0           # float32 bytes per image
    budget_bytes: int = 0
    reason: str = ""
    requested: str = "auto"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def needed_bytes(self) -> int:
        return self.n_items * self.item_bytes

    @property
    def uses_disk(self) -> bool:
        return self.mode in ("partial", "disk")

    def __str__(self) -> str:
        where = f", disk cache under {self.cache_dir}" if self.uses_disk else ""
        return (f"cache: {self.mode} (requested {self.requested}; cache_rate {self.cache_rate:.3g}, on device "
                f"{self.on_device}{where}): {self.n_items} images x {self.item_bytes / 2**20:.3g} MiB float32 = "
                f"{_gb(self.needed_bytes)} vs budget {_gb(self.budget_bytes)}; {self.reason}")


def plan_cache(
    cache: str = "auto",
    n_items: int = 0,
    image_size: Sequence[int] | int = (224, 224),
    channels: int = 1,
    cache_rate: float = 1.0,
    memory_budget_gb: float | None = None,
    device: Any = None,
    cache_on_device: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    compact: bool = True,
    dtype_bytes: int = 4,
    spatial_dims: int | None = None,
    gpu_reserve_fraction: float = GPU_RESERVE_FRACTION,
    log: bool = True,
) -> CachePlan:
    """Choose where the cached deterministic prefix goes, from counts and configured sizes only.

    Args:
        cache: ``auto`` | ``ram`` | ``disk`` | ``none`` (see the module docstring).
        n_items: images to cache (training + validation: both caches share the budget).
        image_size, channels, dtype_bytes: the cached image (after the resize): float32 is 4 bytes.
        cache_rate: ``ram``: the CacheDataset fraction, as before; ``auto``: the most it may use.
        memory_budget_gb: RAM the caches may take; None = :data:`DEFAULT_RAM_FRACTION` of the RAM available now.
        device: the training device; with CUDA, ``auto`` also caches on it when the data fits its free memory minus
            ``gpu_reserve_fraction`` of its total (room for the model).
        cache_on_device: force the GPU cache on/off (``ram``: default = CUDA available, the old behaviour).
        cache_dir: the disk cache's folder (None: :func:`ffcl_monai.data.disk_cache.default_cache_dir`).
        compact: store the disk cache as uint8/uint16 where the source allows.
        log: log the decision (one line, INFO) .
    """
    cache = str(cache).lower()
    if cache not in CACHE_MODES:
        raise ValueError(f"cache: {cache!r} is not one of {', '.join(CACHE_MODES)}.")
    if not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be within [0, 1], got {cache_rate}.")
    item = bytes_per_item(image_size, channels, dtype_bytes, spatial_dims)
    needed = int(n_items) * item
    if memory_budget_gb is not None and float(memory_budget_gb) > 0:
        budget, budget_from = int(float(memory_budget_gb) * 2**30), "memory_budget_gb"
    else:
        avail = available_memory_bytes()
        budget, budget_from = int(avail * DEFAULT_RAM_FRACTION), f"{DEFAULT_RAM_FRACTION:g} x {_gb(avail)} available RAM"
    if cache_dir is None:
        from ffcl_monai.data.disk_cache import default_cache_dir

        cache_dir = default_cache_dir()
    cache_dir = str(cache_dir)
    gpu = gpu_memory_bytes(device)

    def fits_gpu() -> tuple[bool, str]:
        if gpu is None:
            return False, "no CUDA device"
        free, total = gpu
        room = free - int(gpu_reserve_fraction * total)
        ok = needed <= room
        return ok, (f"GPU {_gb(free)} free - {gpu_reserve_fraction:g} x {_gb(total)} kept for the model = {_gb(room)}"
                    f" {'>=' if ok else '<'} {_gb(needed)}")

    common = dict(cache_dir=cache_dir, compact=bool(compact), n_items=int(n_items), item_bytes=item,
                  budget_bytes=budget, requested=cache)
    if cache == "ram":
        on_device = (gpu is not None) if cache_on_device is None else bool(cache_on_device)
        plan = CachePlan("ram" if cache_rate > 0 else "none", float(cache_rate), on_device,
                         reason=f"as configured (cache: ram, cache_rate {cache_rate:g})", **common)
    elif cache == "none":
        plan = CachePlan("none", 0.0, bool(cache_on_device) if cache_on_device is not None else gpu is not None,
                         reason="as configured (cache: none): every image is decoded every epoch", **common)
    elif cache == "disk":
        plan = CachePlan("disk", 0.0, bool(cache_on_device or False),
                         reason=f"as configured (cache: disk; budget from {budget_from})", **common)
    elif needed * cache_rate <= budget:
        gpu_ok, gpu_why = fits_gpu()
        on_device = gpu_ok if cache_on_device is None else bool(cache_on_device)
        plan = CachePlan("ram", float(cache_rate), on_device,
                         reason=f"fits the budget ({budget_from}); {gpu_why}", **common)
    else:
        fraction = budget / needed if needed else 1.0
        if fraction >= MIN_PARTIAL_FRACTION:
            plan = CachePlan("partial", float(min(cache_rate, math.floor(fraction * 1000) / 1000)),
                             bool(cache_on_device or False),
                             reason=f"{fraction:.0%} fits the budget ({budget_from}): that part in RAM, the rest on disk",
                             **common)
        else:
            plan = CachePlan("disk", 0.0, bool(cache_on_device or False),
                             reason=f"only {fraction:.1%} would fit the budget ({budget_from}): disk cache", **common)
    if log:
        logger.info("%s", plan)
    return plan
