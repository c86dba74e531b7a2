"""The disk cache of the deterministic prefix (``cache: disk`` / ``partial``): MONAI ``PersistentDataset``, compact.

Pipeline of one item (what :func:`disk_dataset` builds from the workflow's transform list)::

    load (LoadImageNamedd) -> SourceBitsd -> channels, scale, resize, label -> ToCompactd   <- computed once, saved
    CacheBoundary                                                                           <- PersistentDataset stops
    FromCompactd -> [to_device] -> random augmentations                                     <- every epoch

- :class:`SourceBitsd` looks at the image right after loading: integer pixel values within 0..255 mean an 8-bit
  source (JPEG, 8-bit PNG), other integers spanning at most 65535 values a 16-bit one (DICOM, CT NIfTI).
- :class:`ToCompactd` stores the float image of the prefix (normally [0, 1]) as uint8 / uint16 over its own
  min..max range (``q = round((x - lo) / (hi - lo) * L)``, L = 255 / 65535; float sources stay float32), and
  :class:`FromCompactd` restores ``lo + q * (hi - lo) / L`` as float32. The result differs from the in-RAM (float32)
  cache by at most half a step of the stored type: 0.5/255 of the image range for 8-bit sources, whose own pixel step
  is 1/255 of the range, i.e. at the source's quantisation level. ``cache_compact: false`` stores float32: bit-exact.
- The folder of a cache is ``<cache_dir>/<hash>``, the hash covering every setting of the cached transforms (class,
  arguments: ``image_size``, ``resize_mode``, ``in_channels``, ...), the storage format and the MONAI version: a changed
  preprocessing writes a new folder and never reads a stale one. Inside, an item's file name hashes its datalist entry
  and each image file's size and modification time (a replaced image is recomputed).
- Nothing is ever deleted: remove ``cache_dir`` (or one of its hash folders) to reclaim the space.

Cache files are read with ``torch.load(weights_only=True)`` (MONAI's default): tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, LoadImaged, MapTransform, Randomizable, Transform
from monai.transforms.transform import RandomizableTrait

logger = logging.getLogger(__name__)

#: Bumped when the stored format changes: old caches are then simply not found (a new hash folder).
FORMAT_VERSION = 1
#: Key under which :class:`SourceBitsd` passes the source bit depth to :class:`ToCompactd` (never stored).
BITS_KEY = "__source_bits__"
#: Key of the stored (lo, hi, levels) of a compact image.
COMPACT_KEY = "__compact__"
_LEVELS = {8: 255, 16: 65535}
_DTYPES = {8: torch.uint8, 16: torch.uint16}


def default_cache_dir() -> str:
    """``$FFCL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ffcl_monai``, else ``~/.cache/ffcl_monai``: one folder that every
    run of this user shares (runs on the same data and preprocessing reuse each other's cache)."""
    env = os.environ.get("FFCL_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ffcl_monai")


# --------------------------------------------------------------------------------------------------------------------
# the cache key of the preprocessing


#: Attribute values that are run-time state, not settings: random states, and MONAI's per-thread tracing switch (an
#: attribute that appears once a transform has run).
_RUNTIME_STATE = (np.random.RandomState, np.random.Generator, torch.Generator, threading.local)
#: Attributes that MONAI objects set while they run: random draws, and the image readers' last file names
#: (NibabelReader, PydicomReader). Left out so that the key is the same before and after the transforms ran.
_RUNTIME_ATTRS = frozenset({"R", "_do_transform", "filenames", "has_series", "_tracing"})


def describe(obj: Any, depth: int = 0, _seen: set | None = None) -> Any:
    """A stable, JSON-able description of ``obj`` (a transform and everything it holds): class names, numbers,
    strings, arrays by their bytes; random states and memory addresses left out."""
    seen = set() if _seen is None else _seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return hashlib.sha256(bytes(obj)).hexdigest()
    if isinstance(obj, (torch.dtype, torch.device, np.dtype)) or (isinstance(obj, type) and issubclass(obj, np.generic)):
        return str(obj)
    if isinstance(obj, type) or inspect.isroutine(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    if isinstance(obj, _RUNTIME_STATE):
        return "<runtime state>"
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        a = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        return {"array": str(a.dtype), "shape": list(a.shape), "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "value") and hasattr(type(obj), "__members__"):  # enums (MONAI's InterpolateMode, ...)
        return str(obj.value)
    if depth > 8 or id(obj) in seen:
        return type(obj).__qualname__
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        return {str(k): describe(v, depth + 1, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [describe(v, depth + 1, seen) for v in items]
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    state = getattr(obj, "__dict__", None)
    if state is None:
        return name
    return {"class": name, **{k: describe(v, depth + 1, seen) for k, v in sorted(state.items())
                              if k not in _RUNTIME_ATTRS and not isinstance(v, _RUNTIME_STATE)}}


def prefix_hash(transforms: Sequence[Any], compact: bool) -> str:
    """16 hex digits naming the cache folder of ``transforms`` (the cached part) stored ``compact`` or not."""
    import monai

    import ffcl_monai

    desc = {"format": FORMAT_VERSION, "monai": monai.__version__, "ffcl_monai": ffcl_monai.__version__, "compact": bool(compact),
            "transforms": [describe(t) for t in transforms]}
    import json

    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_with_stat(item: Any) -> bytes:
    """PersistentDataset's item hash: the datalist entry plus each image file's size and modification time (a
    ``stat``, no read), so that replacing an image recomputes its cache entry."""
    import json

    stats = {}
    if isinstance(item, Mapping):
        for k, v in item.items():
            for p in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(p, (str, os.PathLike)):
                    try:
                        st = os.stat(p)
                        stats[f"{k}:{p}"] = [st.st_size, st.st_mtime_ns]
                    except OSError:
                        pass
    text = json.dumps({"item": item, "stat": stats}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest().encode()


# --------------------------------------------------------------------------------------------------------------------
# compact storage


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class SourceBitsd(MapTransform):
    """Record the bit depth of the just-loaded image (8, 16, or 32 for float data) under :data:`BITS_KEY`."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        bits = {}
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                continue  # not loaded yet: unknown
            x = _plain(d[key])
            if x.numel() == 0:
                continue
            if not x.is_floating_point():
                lo, hi, integral = int(x.min()), int(x.max()), True
            else:
                lo, hi = float(x.min()), float(x.max())
                integral = bool(torch.equal(x, torch.round(x)))
            if integral and lo >= 0 and hi <= 255:
                bits[key] = 8
            elif integral and hi - lo <= 65535:
                bits[key] = 16
            else:
                bits[key] = 32
        d[BITS_KEY] = bits
        return d


class ToCompactd(MapTransform):
    """The last cached step: the float image as uint8 / uint16 over its min..max range, by the source's bit depth
    (:class:`SourceBitsd`); float sources, or ``compact=False``, stay float32."""

    def __init__(self, keys: KeysCollection = "image", compact: bool = True, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.compact = compact

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        bits = d.pop(BITS_KEY, None) or {}
        ranges = {}
        for key in self.key_iterator(d):
            b = bits.get(key, 32)
            if not self.compact or b not in _LEVELS or not isinstance(d[key], torch.Tensor) \
                    or not d[key].is_floating_point():
                continue
            x = _plain(d[key]).float()
            lo, hi = float(x.min()), float(x.max())
            levels = _LEVELS[b]
            scale = (hi - lo) / levels if hi > lo else 1.0
            q = torch.round((x - lo) / scale).clamp_(0, levels)
            d[key] = q.to(torch.int32).to(_DTYPES[b]) if b == 16 else q.to(torch.uint8)
            ranges[str(key)] = torch.tensor([lo, scale], dtype=torch.float64)
        if ranges:
            d[COMPACT_KEY] = ranges
        return d


class CacheBoundary:
    """Not a MONAI ``Transform``: ``PersistentDataset`` caches everything before it and runs the rest every time."""

    def __call__(self, data: Any) -> Any:
        return data


class FromCompactd(Transform):
    """The first step after the disk cache: the stored uint8 / uint16 images back to float32 (``lo + q * step``)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ranges = d.pop(COMPACT_KEY, None)
        if ranges:
            for key, r in ranges.items():
                lo, scale = float(r[0]), float(r[1])
                k = key if key in d else next((kk for kk in d if str(kk) == key), key)
                d[k] = d[k].to(torch.float32).mul_(scale).add_(lo)
        return d


# --------------------------------------------------------------------------------------------------------------------
# the datasets


def _moves_to_device(t: Any) -> bool:
    """An EnsureTyped-like transform that puts tensors on a non-CPU device (train.yaml's ``to_device``)."""
    for holder in (t, getattr(t, "converter", None)):
        dev = getattr(holder, "device", None)
        if dev is not None:
            try:
                return torch.device(dev).type != "cpu"
            except (TypeError, RuntimeError):
                return False
    return False


def split_prefix(transform: Compose | Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(cached part, rest): the transforms before the first random one (as CacheDataset), minus a trailing move to
    the GPU (kept out of the disk cache: it would store CUDA tensors)."""
    ts = list(transform.transforms if isinstance(transform, Compose) else transform)
    end = next((i for i, t in enumerate(ts) if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
                or _moves_to_device(t)), len(ts))
    return ts[:end], ts[end:]


def compact_pipeline(transform: Compose | Sequence[Any], compact: bool = True, key: str = "image") -> tuple[Compose, list[Any]]:
    """(the disk pipeline as one Compose, its cached part) for a workflow transform list (see the module docstring)."""
    cached, rest = split_prefix(transform)
    if compact:
        where = next((i + 1 for i, t in enumerate(cached) if isinstance(t, LoadImaged)), 1 if cached else 0)
        cached = [*cached[:where], SourceBitsd(key), *cached[where:]]
    cached.append(ToCompactd(key, compact=compact))
    return Compose([*cached, CacheBoundary(), FromCompactd(), *rest]), cached


class DiskCacheDataset(PersistentDataset):
    """``PersistentDataset`` that can fill its cache up front (:meth:`build`) and names the failing file."""

    def hashfile(self, index: int) -> Path:
        return self.cache_dir / f"{self.hash_func(self.data[index]).decode('utf-8')}{self.transform_hash}.pt"

    def build(self, num_workers: int | None = None, progress: bool = False) -> int:
        """Compute every missing cache file (threads, as CacheDataset); returns how many were computed."""
        missing = [i for i in range(len(self.data)) if not self.hashfile(i).is_file()]
        if not missing:
            return 0
        workers = num_workers if num_workers and num_workers > 0 else min(len(missing), os.cpu_count() or 1)

        def one(i: int) -> None:
            self._cachecheck(self.data[i])

        if progress:
            logger.info("disk cache: computing %d of %d items into %s", len(missing), len(self.data), self.cache_dir)
        if workers <= 1:
            for i in missing:
                one(i)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, missing))
        return len(missing)


def _readable(e: BaseException) -> BaseException | None:
    from ffcl_monai.data.transforms import _find_read_error

    read_error = _find_read_error(e)
    return type(read_error)(str(read_error)) if read_error is not None else None


def disk_dataset(
    data: Sequence[dict],
    transform: Compose | Sequence[Any],
    cache_dir: str | os.PathLike | None = None,
    compact: bool = True,
    num_workers: int | None = None,
    build: bool = True,
) -> DiskCacheDataset:
    """The disk-cached dataset of ``data`` (see the module docstring); ``build`` fills the cache now, so that a bad
    image stops the run at start (as the RAM cache does) and the first epoch reads from the cache."""
    pipeline, cached = compact_pipeline(transform, compact)
    root = Path(cache_dir or default_cache_dir())
    if not root.exists():
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
    folder = root / prefix_hash(cached, compact)
    ds = DiskCacheDataset(data=list(data), transform=pipeline, cache_dir=folder, hash_func=hash_with_stat)
    if build and len(ds.data):
        try:
            n = ds.build(num_workers, progress=True)
        except Exception as e:
            readable = _readable(e)
            if readable is not None:
                raise readable from None
            raise
        logger.info("disk cache %s: %d of %d items computed now, %d reused", folder, n, len(ds.data), len(ds.data) - n)
    return ds


class PartialCacheDataset(Dataset):
    """The first ``cache_rate`` of the items in RAM (a float32 CacheDataset, exactly as ``cache: ram``), the rest in
    the disk cache; both share the random transforms (``set_rnd`` reaches them through either part)."""

    def __init__(self, data: Sequence[dict], transform: Compose, cache_rate: float, cache_dir: str | os.PathLike | None,
                 compact: bool = True, num_workers: int | None = None, copy_cache: bool = True,
                 runtime_cache: bool | str = False) -> None:
        data = list(data)
        super().__init__(data=data, transform=transform)
        self.n_ram = int(len(data) * cache_rate)
        self.ram = CacheDataset(data=data[: self.n_ram], transform=transform, cache_rate=1.0, num_workers=num_workers,
                                copy_cache=copy_cache, runtime_cache=runtime_cache, progress=sys.stderr.isatty())
        self.disk = disk_dataset(data[self.n_ram:], transform, cache_dir, compact, num_workers)

    def _transform(self, index: int) -> Any:
        return self.ram[index] if index < self.n_ram else self.disk[index - self.n_ram]
