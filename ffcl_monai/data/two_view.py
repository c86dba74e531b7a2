"""Two independently augmented views per image, on top of the cached deterministic prefix.

Pipeline (what :func:`two_view_dataset` builds)::

    deterministic_transforms (train.yaml: load, grayscale, scale, resize)   <- cached once by CacheDataset
    TwoViewd: CopyItemsd(image -> view1, view2)                              <- first random transform: cache stops here
              augment(view1)   one Compose call, its own random draws
              augment(view2)   another Compose call, other random draws

MONAI applies ONE random draw to all keys of a single transform call (a ``RandFlipd(keys=["view1", "view2"])`` flips
both or neither), so each view gets its own transform instances and its own call. ``TwoViewd`` is ``Randomizable``,
which makes CacheDataset stop caching right before it: the cache holds the base image once, never the views.

Augmentations come from the config as an ordered mapping ``{name: {transform: <MONAI class>, **kwargs} | null}``
(``augment_2d`` / ``augment_3d`` in ``bundle/configs/pretrain_simclr.yaml``), so each one can be changed or turned
off from the command line (``--augment_2d#noise#prob 0``, ``--augment_2d#dropout null``). Defaults per modality are
in :data:`DEFAULT_AUGMENT_2D` / :data:`DEFAULT_AUGMENT_3D` below.

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
from monai.utils.module import locate

from ffcl_monai.data.transforms import cached_dataset


NOISE = "ffcl_monai.data.transforms.RandGaussianNoiseTorchd"  # RandGaussianNoised drawn by torch, on the device


def _size(image_size: Sequence[int], frac: float) -> list[int]:
    return [max(1, int(round(frac * s))) for s in image_size]


def default_augment(spatial_dims: int, image_size: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per-modality default augmentations (the YAML ``augment_2d`` / ``augment_3d`` keys carry the same values).

    2D X-ray/OCT: random resized crop, horizontal flip, small affine, contrast/gamma, brightness, Gaussian noise,
    Gaussian blur, coarse dropout. No colour: images are grayscale. 3D: random resized crop, flips on every axis,
    3D affine, intensity scale/shift and noise.
    """
    # The views arrive at image_size (resized prefix, crop then resize): with a fixed output size RandAffined
    # keeps its identity grid instead of rebuilding it for every view.
    fixed_grid = {"spatial_size": list(image_size), "cache_grid": True}
    if spatial_dims == 2:
        return {
            "crop": {"transform": "RandScaleCropd", "roi_scale": 0.4, "max_roi_scale": 1.0, "random_size": True},
            "resize": {"transform": "Resized", "spatial_size": list(image_size), "mode": "area"},
            "flip": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 1},
            "affine": {"transform": "RandAffined", "prob": 0.5, "rotate_range": 0.17, "scale_range": 0.1,
                       "padding_mode": "zeros", **fixed_grid},
            "contrast": {"transform": "RandAdjustContrastd", "prob": 0.8, "gamma": [0.6, 1.6]},
            "brightness": {"transform": "RandScaleIntensityd", "prob": 0.8, "factors": 0.3},
            "noise": {"transform": NOISE, "prob": 0.3, "std": 0.05},
            "blur": {"transform": "RandGaussianSmoothd", "prob": 0.3, "sigma_x": [0.2, 1.0], "sigma_y": [0.2, 1.0]},
            "dropout": {"transform": "RandCoarseDropoutd", "prob": 0.5, "holes": 1, "max_holes": 3,
                        "spatial_size": _size(image_size, 0.125), "max_spatial_size": _size(image_size, 0.25),
                        "fill_value": 0.0},
        }
    if spatial_dims == 3:
        return {
            "crop": {"transform": "RandScaleCropd", "roi_scale": 0.6, "max_roi_scale": 1.0, "random_size": True},
            "resize": {"transform": "Resized", "spatial_size": list(image_size), "mode": "trilinear"},
            "flip0": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 0},
            "flip1": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 1},
            "flip2": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 2},
            "affine": {"transform": "RandAffined", "prob": 0.5, "rotate_range": [0.17, 0.17, 0.17],
                       "scale_range": [0.1, 0.1, 0.1], "padding_mode": "zeros", **fixed_grid},
            "scale_intensity": {"transform": "RandScaleIntensityd", "prob": 0.8, "factors": 0.2},
            "shift_intensity": {"transform": "RandShiftIntensityd", "prob": 0.8, "offsets": 0.1},
            "noise": {"transform": NOISE, "prob": 0.3, "std": 0.03},
        }
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}; set the `spatial_dims` config key.")


def build_augmentations(augment: Mapping[str, Mapping[str, Any] | None], key: str) -> Compose:
    """Fresh MONAI transform instances for one view, in the mapping's order. ``None`` entries are skipped.

    Each entry is ``{"transform": <MONAI dictionary transform name or dotted path>, **kwargs}``; ``keys`` is set to
    ``key``. Errors name the entry and the config key to change.
    """
    transforms = []
    for name, spec in (augment or {}).items():
        if spec is None or spec is False:
            continue
        spec = dict(spec)
        target = spec.pop("transform", None)
        if not target:
            raise ValueError(f"augmentation {name!r} has no `transform` entry; e.g. {{transform: RandFlipd, prob: 0.5}}.")
        cls = locate(target) if "." in target else getattr(__import__("monai.transforms", fromlist=[target]), target, None)
        if cls is None:
            raise ValueError(f"augmentation {name!r}: unknown transform {target!r}; use a monai.transforms dictionary "
                             "transform name (e.g. RandGaussianNoised) or a dotted path.")
        try:
            transforms.append(cls(keys=key, **spec))
        except TypeError as e:
            raise ValueError(f"augmentation {name!r} ({target}): {e}. Fix its arguments in the `augment_*` config key.") from e
    return Compose(transforms)


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
) -> Dataset:
    """CacheDataset of the deterministic prefix (+ ``extra_transforms``), followed by :class:`TwoViewd`.

    ``copy_cache=False``: TwoViewd deep-copies the image itself, so MONAI's per-item deep copy of the cache entry
    would only double the work.
    """
    if not data:
        raise ValueError("the pretraining datalist is empty; check `datalist` (its `training` split).")
    transform = Compose([*deterministic_transforms, *extra_transforms, TwoViewd(augment, key, view_keys)])
    return cached_dataset(list(data), transform, cache_rate, copy_cache=False)


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

