"""Random augmentations as configuration: one named entry per transform, so that each can be changed or turned off
from the command line.

Every workflow reads its augmentations in one format, an ordered mapping
``{name: {transform: <MONAI dictionary transform name or dotted path>, **kwargs} | null}``: ``augment_2d`` /
``augment_3d`` in ``bundle/configs/train.yaml`` (supervised training, auxiliary pretraining, the FFCL stages) and the
stronger contrastive views of ``bundle/configs/pretrain_simclr.yaml``; ``augment`` picks one by ``spatial_dims``.
``--augment_2d#noise#prob 0`` changes an argument, ``--augment_2d#dropout null`` drops an entry.
:func:`default_augment` holds the contrastive defaults per modality (a test keeps the SimCLR YAML equal to it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import Compose
from monai.utils.module import locate

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
