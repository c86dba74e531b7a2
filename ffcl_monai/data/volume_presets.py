"""Intensity and geometry presets for 3D volumes: ``volume_preset: none | mri | ct``.

The deterministic preprocessing of ``train.yaml`` / ``inference.yaml`` loads an image, makes it single-channel and
then runs the intensity/geometry step built here (config keys in brackets):

- ``none`` (default): per-volume min-max to [0, 1] (``ScaleIntensityd``) and ``Resized`` to ``image_size`` with
  ``resize_mode``: exactly the transforms the bundle always used (2D images, MedMNIST 28^3 / 64^3 volumes that are
  already cropped, centred and isotropic).
- ``mri``: ``Orientationd`` to RAS, then a robust intensity scaling: the 0.5th and 99.5th percentiles of the
  volume's nonzero voxels map to 0 and 1, clipped (:class:`ScaleIntensityPercentilesNonzerod`), then ``Spacingd``
  to ``target_spacing`` mm (bilinear; the full extent is kept: n voxels of s mm become n * s / t),
  ``CropForegroundd`` (normalised intensity > :data:`MRI_FOREGROUND_THRESHOLD`, margin :data:`FOREGROUND_MARGIN`
  voxels) and the fit to ``image_size`` (``volume_fit``).
- ``ct``: ``Orientationd`` to RAS, the HU window ``ct_window = [center, width]`` mapped to [0, 1] and clipped
  (``ScaleIntensityRanged``), then the same spacing, foreground crop (> 0, i.e. above the window's lower edge) and fit.

Why this order and these statistics:

- Orientation first, so that one head stored LPS, RAS or PSR gives one tensor (the voxel axes become R, A, S).
- Intensity before resampling: interpolation is linear, so the result is the same, and the statistics are taken on
  the original voxels (no interpolated border).
- MRI percentiles on the **nonzero** voxels: skull-stripped and padded volumes hold large, variable amounts of exact
  zero background; percentiles of the whole volume would then depend on the field of view. The 99.5th percentile of
  the foreground ignores a few hot voxels (flow artefacts, a bright vessel), which min-max does not.
- ``volume_fit: resize`` (default) stretches the foreground box to ``image_size`` per axis: it never cuts anatomy
  whatever the field of view, and it works for the small ``image_size`` of CPU runs (28^3, 64^3: a whole head at
  1.5 mm is ~110 x 140 x 120 voxels). ``pad_crop`` keeps the physical scale (one voxel = ``target_spacing`` mm) and
  centre-pads/crops to ``image_size``: choose it when ``image_size * target_spacing`` covers the anatomy (e.g.
  ``image_size [128, 128, 128]`` with ``target_spacing [1.5, 1.5, 1.5]`` for a brain).
- ``target_spacing`` default 1.5 mm isotropic: finer than any final grid the bundle uses (a 64^3 brain crop has
  ~2.7 mm voxels), so the resize afterwards only averages; and 3.4x fewer voxels to resample and crop than 1 mm.

The same function builds the list for the config (:class:`VolumePresetd`, one ``_target_`` entry, so the MLflow model
can rebuild it from plain data) and for tests (:func:`intensity_and_geometry`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)

from ffcl_monai.errors import UserInputError

PRESETS = ("none", "mri", "ct")
VOLUME_FITS = ("resize", "pad_crop")
#: Defaults of the config keys (train.yaml, inference.yaml).
DEFAULT_TARGET_SPACING = (1.5, 1.5, 1.5)
DEFAULT_CT_WINDOW = (40.0, 400.0)  # soft tissue: [-160, 240] HU
DEFAULT_VOLUME_FIT = "resize"
#: MRI intensity percentiles (of the nonzero voxels) mapped to 0 and 1.
MRI_PERCENTILES = (0.5, 99.5)
#: Foreground of the normalised MRI volume (0-1 after the percentile scaling): above the background noise of raw scans.
MRI_FOREGROUND_THRESHOLD = 0.05
#: Axis labels of ``Orientationd`` (NIfTI world axes, as nibabel's ``aff2axcodes``), stated so that MONAI's change of
#: default (``labels=None``: the MetaTensor's ``space``) cannot change what "RAS" means here.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: Voxels of margin (at ``target_spacing``) kept around the foreground box.
FOREGROUND_MARGIN = 4


class VolumePresetError(UserInputError):
    """A ``volume_preset`` / ``target_spacing`` / ``ct_window`` / ``volume_fit`` value that cannot be used."""


def preset_name(volume_preset: Any) -> str:
    """The checked preset name (``none``, ``mri`` or ``ct``; case and spaces ignored).

    Raises:
        VolumePresetError: naming the key ``volume_preset`` and the accepted values.
    """
    name = volume_preset.strip().lower() if isinstance(volume_preset, str) else volume_preset
    if name not in PRESETS:
        raise VolumePresetError(
            f"config key `volume_preset` is {volume_preset!r}; use one of {list(PRESETS)} (`--volume_preset mri` for "
            "MR volumes, `ct` for CT in Hounsfield units, `none` for the plain min-max + resize)."
        )
    return name


def _numbers(value: Any, key: str, n: int) -> tuple[float, ...]:
    """``n`` finite floats from a number or a sequence of ``n`` numbers; errors name ``key``."""
    seq = [value] * n if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        out = tuple(float(v) for v in seq)  # type: ignore[union-attr]
        if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in seq):  # type: ignore[union-attr]
            raise TypeError
    except (TypeError, ValueError):
        out = ()
    if len(out) != n or not all(np.isfinite(out)):
        raise VolumePresetError(f"config key `{key}` is {value!r}; expected {n} numbers.")
    return out


def check_target_spacing(target_spacing: Any, spatial_dims: int = 3) -> tuple[float, ...]:
    """``target_spacing`` as ``spatial_dims`` positive millimetres (a single number means isotropic)."""
    spacing = _numbers(target_spacing, "target_spacing", spatial_dims)
    if not all(0.01 <= s <= 100 for s in spacing):
        raise VolumePresetError(
            f"config key `target_spacing` is {target_spacing!r}; voxel spacings are millimetres in [0.01, 100], "
            "e.g. [1.5, 1.5, 1.5]."
        )
    return spacing


def check_ct_window(ct_window: Any) -> tuple[float, float]:
    """``ct_window`` as ``(center, width)`` in HU, width > 0."""
    center, width = _numbers(ct_window, "ct_window", 2)
    if width <= 0:
        raise VolumePresetError(f"config key `ct_window` is {ct_window!r}; it is [center, width] in HU with width > 0, "
                                "e.g. [40, 400] (soft tissue), [600, 1500] (bone), [-600, 1500] (lung).")
    return center, width


def check_volume_fit(volume_fit: Any) -> str:
    """``volume_fit`` as ``resize`` or ``pad_crop``."""
    fit = volume_fit.strip().lower() if isinstance(volume_fit, str) else volume_fit
    if fit not in VOLUME_FITS:
        raise VolumePresetError(f"config key `volume_fit` is {volume_fit!r}; use one of {list(VOLUME_FITS)}.")
    return fit


class ScaleIntensityPercentilesNonzerod(MapTransform):
    """Map the ``lower``/``upper`` percentiles of an image's nonzero voxels to ``b_min``/``b_max`` (clipped).

    MONAI's ``ScaleIntensityRangePercentilesd`` takes the percentiles of every voxel, so the exact-zero background of
    skull-stripped or padded volumes shifts them with the field of view; here it is left out. When the two
    percentiles are equal (a binary mask, a constant foreground) the whole volume's min and max are used instead; a
    constant image becomes all ``b_min``. Keeps the MetaTensor (and its affine).
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = MRI_PERCENTILES[0],
        upper: float = MRI_PERCENTILES[1],
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.b_min, self.b_max, self.clip = lower, upper, b_min, b_max, clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, torch.Tensor):
                img = torch.as_tensor(np.asarray(img))
            img = img.float()
            values = img.detach().cpu().numpy().ravel()
            nonzero = values[values != 0]
            lo, hi = (float(v) for v in np.percentile(nonzero, [self.lower, self.upper])) if nonzero.size else (0, 0)
            if hi <= lo:
                lo, hi = float(values.min()), float(values.max())
            if hi <= lo:
                d[key] = torch.zeros_like(img) + self.b_min
                continue
            out = (img - lo) / (hi - lo) * (self.b_max - self.b_min) + self.b_min
            d[key] = out.clamp(self.b_min, self.b_max) if self.clip else out
        return d


class _Above:
    """``select_fn`` for ``CropForegroundd``: voxels above a threshold, or every voxel when none is (no empty crop).
    A class, so the transform stays picklable for DataLoader workers."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: Any) -> Any:
        mask = x > self.threshold
        return mask if bool(mask.any()) else mask | True


def intensity_and_geometry(
    volume_preset: str = "none",
    image_size: Sequence[int] = (28, 28, 28),
    resize_mode: str = "trilinear",
    target_spacing: Any = DEFAULT_TARGET_SPACING,
    ct_window: Any = DEFAULT_CT_WINDOW,
    volume_fit: str = DEFAULT_VOLUME_FIT,
    keys: KeysCollection = "image",
    spatial_dims: int | None = None,
) -> list[MapTransform]:
    """The intensity and geometry transforms of one preset, in order (a flat list of MONAI dictionary transforms).

    Args:
        volume_preset: ``none`` | ``mri`` | ``ct`` (module docstring).
        image_size: the output grid (``image_size``).
        resize_mode: interpolation of the final ``Resized`` (``resize_mode``: ``area`` in 2D, ``trilinear`` in 3D).
        target_spacing: voxel spacing in mm the ``mri``/``ct`` presets resample to.
        ct_window: ``[center, width]`` in HU (``ct`` preset).
        volume_fit: ``resize`` | ``pad_crop``: how the cropped foreground becomes ``image_size`` (``mri``/``ct``).
        keys: the image key(s).
        spatial_dims: the config's ``spatial_dims``; the ``mri``/``ct`` presets need 3. Default: ``len(image_size)``.

    Returns:
        for ``none``: ``[ScaleIntensityd(minv=0, maxv=1), Resized(image_size, resize_mode)]``, the bundle's transforms
        before presets existed; for ``mri``/``ct``: orientation, intensity, spacing, foreground crop and fit.

    Raises:
        VolumePresetError: naming the config key whose value is wrong.
    """
    name = preset_name(volume_preset)
    size = [int(s) for s in image_size]
    if name == "none":
        return [
            ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0),
            Resized(keys=keys, spatial_size=size, mode=resize_mode),
        ]
    dims = len(size) if spatial_dims is None else int(spatial_dims)
    if dims != 3 or len(size) != 3:
        raise VolumePresetError(
            f"config key `volume_preset` is {name!r}, a preset for 3D volumes, but spatial_dims={dims} and image_size="
            f"{size}; add the 3d.yaml overlay, or use `--volume_preset none` for 2D images."
        )
    spacing = check_target_spacing(target_spacing, 3)
    fit = check_volume_fit(volume_fit)
    if name == "mri":
        intensity: MapTransform = ScaleIntensityPercentilesNonzerod(keys, *MRI_PERCENTILES, b_min=0.0, b_max=1.0)
        threshold = MRI_FOREGROUND_THRESHOLD
    else:
        center, width = check_ct_window(ct_window)
        intensity = ScaleIntensityRanged(keys=keys, a_min=center - width / 2, a_max=center + width / 2, b_min=0.0,
                                         b_max=1.0, clip=True)
        threshold = 0.0
    source = keys if isinstance(keys, str) else next(iter(keys))
    fitting: MapTransform = (
        Resized(keys=keys, spatial_size=size, mode=resize_mode) if fit == "resize"
        else ResizeWithPadOrCropd(keys=keys, spatial_size=size, mode="constant")
    )
    return [
        Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS),
        intensity,
        Spacingd(keys=keys, pixdim=spacing, mode="bilinear", dtype=np.float32, scale_extent=True, align_corners=True),
        CropForegroundd(keys=keys, source_key=source, select_fn=_Above(threshold), margin=FOREGROUND_MARGIN,
                        allow_smaller=True),
        fitting,
    ]


class VolumePresetd(MapTransform):
    """The ``mri``/``ct`` preset as one dictionary transform (a ``Compose`` of :func:`intensity_and_geometry`).

    One ``_target_`` entry of ``deterministic_transforms`` with plain arguments, so the list stays flat and the MLflow
    model rebuilds it from ``preprocessing.json``. The arguments are the config keys of the same names.
    """

    def __init__(
        self,
        keys: KeysCollection,
        volume_preset: str,
        image_size: Sequence[int],
        resize_mode: str = "trilinear",
        target_spacing: Any = DEFAULT_TARGET_SPACING,
        ct_window: Any = DEFAULT_CT_WINDOW,
        volume_fit: str = DEFAULT_VOLUME_FIT,
        spatial_dims: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.volume_preset = preset_name(volume_preset)
        self.transform = Compose(intensity_and_geometry(
            self.volume_preset, image_size, resize_mode, target_spacing, ct_window, volume_fit, keys, spatial_dims))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return dict(self.transform(dict(data)))
