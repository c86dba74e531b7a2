"""Two independently augmented views per image, on top of the cached deterministic prefix.

Pipeline (what :func:`two_view_dataset` builds)::

    deterministic_transforms (train.yaml: load, grayscale, scale, resize)   <- cached once by CacheDataset
    TwoViewd: CopyItemsd(image -> view1, view2)                              <- first random transform: cache stops here
              augment(view1)   one Compose call, its own random draws
              augment(view2)   another Compose call, other random draws

MONAI applies ONE random draw to all keys of a single transform call (a ``RandFlipd(keys=["view1", "view2"])`` flips
both or neither), so each view gets its own transform instances and its own call. ``TwoViewd`` is ``Randomizable``,
which makes CacheDataset stop caching right before it: the cache holds the base image once, never the views.

Each view's augmentations are built from the same named mapping as every workflow's
(:mod:`ffcl_monai.data.augmentations`; ``augment_2d`` / ``augment_3d`` in ``bundle/configs/pretrain_simclr.yaml``).

Also the datalist helpers of the pretraining workflows: :func:`check_pretrain_datalist` (header check),
:func:`strip_labels`, :func:`first_n` (the ``overfit`` switch) and :func:`check_metadata` (auxiliary targets).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, CopyItemsd, MapTransform, Randomizable
from monai.utils import MAX_SEED

from ffcl_monai.data.augmentations import build_augmentations
from ffcl_monai.data.transforms import cached_dataset


class TwoViewd(Randomizable, MapTransform):
    """Copy ``key`` into two view keys and augment each with its own transform instances and random draws.

    Args:
        augment: the augmentation mapping (see module docstring), or two mappings (one per view) for asymmetric
            augmentations as in BYOL/Barlow Twins.
        key: the image key produced by the deterministic prefix.
        view_keys: names of the two views in the output dict.
        keep_original: keep ``key`` next to the views (off: saves memory in the batch).
    """

    def __init__(
        self,
        augment: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        key: str = "image",
        view_keys: Sequence[str] = ("view1", "view2"),
        keep_original: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys=key)
        if len(view_keys) != 2:
            raise ValueError(f"view_keys must name 2 views, got {view_keys}.")
        per_view = list(augment) if isinstance(augment, (list, tuple)) else [augment, augment]
        self.key = key
        self.view_keys = tuple(view_keys)
        self.keep_original = keep_original
        self.copy = CopyItemsd(keys=key, times=2, names=list(self.view_keys))
        # Separate instances per view: separate random states, separate calls, separate draws.
        self.views = [build_augmentations(per_view[i], self.view_keys[i]) for i in range(2)]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "TwoViewd":
        super().set_random_state(seed, state)
        for view in self.views:
            # Different seeds per view, derived from ours: reproducible, and never the same draws for both views.
            view.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:  # the per-view Composes draw their own numbers
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = self.copy(data)  # deep copies: the cached base image is never modified
        for view in self.views:
            d = view(d)
        if not self.keep_original:
            d.pop(self.key, None)
        return d


def two_view_dataset(
    data: Sequence[dict],
    deterministic_transforms: Sequence[Any],
    augment: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    cache_rate: float = 1.0,
    key: str = "image",
    view_keys: Sequence[str] = ("view1", "view2"),
    extra_transforms: Sequence[Any] = (),
    plan: Any = None,
) -> Dataset:
    """CacheDataset of the deterministic prefix (+ ``extra_transforms``), followed by :class:`TwoViewd`.

    ``copy_cache=False``: TwoViewd deep-copies the image itself, so MONAI's per-item deep copy of the cache entry
    would only double the work. ``plan``: where the prefix is cached (:func:`~ffcl_monai.data.transforms.cached_dataset`;
    on disk, TwoViewd runs after the cached prefix is read back, as after the RAM cache).
    """
    if not data:
        raise ValueError("the pretraining datalist is empty; check `datalist` (its `training` split).")
    transform = Compose([*deterministic_transforms, *extra_transforms, TwoViewd(augment, key, view_keys)])
    return cached_dataset(list(data), transform, cache_rate, copy_cache=False, plan=plan)


def strip_labels(items: Sequence[Mapping[str, Any]], keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Entries with only ``image`` (and the ``keep`` fields): labels are not used by self-supervised pretraining,
    and dropping them proves it (and lets entries with or without ``label`` be batched together)."""
    return [{"image": d["image"], **{k: d[k] for k in keep if k in d}} for d in items]


def check_pretrain_datalist(datalist: str, spatial_dims: int) -> dict[str, Any]:
    """Header check for pretraining: only the dimensionality matters (labels, classes and task are unused)."""
    from ffcl_monai.data.datalist import check_header, read_header

    header = read_header(datalist)
    return check_header(datalist, int(header.get("num_classes") or 2), spatial_dims, header.get("task") or "binary")


def check_metadata(items: Sequence[Mapping[str, Any]], heads: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The datalist entries of auxiliary-target pretraining, after failing early when an ``aux_heads`` field is absent
    from every entry (a typo, or the wrong datalist)."""
    items = [dict(d) for d in items]
    for field in heads:
        known = sum(1 for d in items if d.get(field) is not None)
        if known == 0:
            raise ValueError(
                f"no entry of the datalist has a value for auxiliary target {field!r}. Add it to the datalist "
                f"(e.g. data_prep's metadata columns) or remove it from `aux_heads`."
            )
    return items


def first_n(items: Sequence[dict], n: int) -> list[dict]:
    """The first ``n`` entries (the `overfit` switch trains on a handful of images)."""
    if n < 2:
        raise ValueError(f"`overfit_n` must be >= 2 (contrastive losses need negatives), got {n}.")
    return list(items)[:n]


def to_display(x: torch.Tensor) -> np.ndarray:
    """A (C, *spatial) image or volume as a 2D float array in [0, 1] for plotting (middle slice for 3D)."""
    a = x.detach().float().cpu()
    a = a[0] if a.ndim >= 3 else a
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    a = a.numpy()
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if hi - lo > 1e-8 and math.isfinite(hi - lo) else np.zeros_like(a)

