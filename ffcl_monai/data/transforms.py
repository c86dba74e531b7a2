"""The few transforms MONAI does not have, and the cached dataset builder.

The bundle configs list MONAI transforms explicitly (so users can change them); this module adds only:
- :class:`LoadImageNamedd`: MONAI's LoadImaged that reads single-frame DICOM files as a viewer shows them
  (:mod:`ffcl_monai.data.dicom`: VOI window, MONOCHROME1 inverted, [0, 1]), whose errors name the file and the fix,
  which refuses NIfTI files whose header declares more than :data:`MAX_IMAGE_VOXELS` voxels or :data:`MAX_IMAGE_DIM`
  along an axis (before decoding: a few-KB ``.nii.gz`` can declare terabytes), and images with NaN or infinite pixel
  values.
- :class:`EnsureChannelsd`: grayscale conversion of RGB-stored images and a dimensionality check that catches 2D
  data given to a 3D config (and vice versa) while the cache is built, before training.
- :class:`NormalizeInputd`: the input normalisation a pretrained initialisation expects (config key ``input_norm``):
  ``imagenet`` = ``(x - mean_c) / std_c`` with torchvision's ImageNet statistics, applied after the intensity scaling
  to [0, 1] (the FFCL paper, seed 000 §3: "ImageNet normalized (training from ImageNet weight)").
- :class:`LabelToTensord`: integer labels -> long tensors, multi-label lists -> float tensors (batchable).
- :class:`MetadataToTensord`: auxiliary-target metadata fields -> float32 scalars, ``None`` -> NaN (batchable; the
  auxiliary loss masks the NaNs).
- :class:`RandGaussianNoiseTorchd`: MONAI's RandGaussianNoised with the noise drawn by torch on the image's device
  (MONAI draws float64 numpy noise on the CPU: 5.9 ms vs 1.0 ms per 64^3 volume on 2 CPU cores, and on a GPU a
  host-to-device copy per view; ``python -m ffcl_monai.bench simclr_epoch`` prints the side-by-side timing).
- :func:`cached_dataset`: MONAI CacheDataset that re-raises read errors with their clear message (or, by the
  ``cache`` plan of :mod:`ffcl_monai.data.cache_planner`, the disk cache of :mod:`ffcl_monai.data.disk_cache`).
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, LoadImaged, MapTransform, RandomizableTransform
from monai.utils import MAX_SEED, TransformBackends

from data_prep.check import MAX_DIM, MAX_VOXELS
from ffcl_monai.errors import ImageReadError  # defined there, imported from here by most of the code


#: Largest image a NIfTI header may declare, in voxels (all axes, channels and time points multiplied): 2**31, i.e.
#: 8 GiB as float32, far above any CT/MR volume (512 x 512 x 2000 is 0.5 * 2**30); and the largest size along any one
#: axis (8192). Checked from the header alone. The same limits as ``python -m data_prep check`` (one definition).
MAX_IMAGE_VOXELS = MAX_VOXELS
MAX_IMAGE_DIM = MAX_DIM
#: File name endings whose header :func:`check_nifti_header` reads (NIfTI-1/-2, plain or compressed).
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".nii.bz2", ".nii.zst")


class ImageTooLargeError(ImageReadError):
    """A file's header declares an image larger than :data:`MAX_IMAGE_VOXELS` / :data:`MAX_IMAGE_DIM`."""


class NonFiniteImageError(ImageReadError):
    """An image holds NaN or infinite pixel values."""


def _nifti_shape(path: str) -> tuple[int, ...]:
    """The data shape a NIfTI-1/-2 header declares, reading only the header bytes (no extensions, no data)."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as f:  # decompresses only the bytes asked for
        raw = f.read(540)
    if len(raw) < 348:
        raise ImageReadError(
            f"{path}: {len(raw)} bytes, too short for a NIfTI header; the file is truncated or not NIfTI. Replace it or "
            "remove it from the datalist."
        )
    size_le, size_be = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")
    klass = nib.Nifti2Header if 540 in (size_le, size_be) else nib.Nifti1Header
    try:
        header = klass.from_fileobj(io.BytesIO(raw[: klass.template_dtype.itemsize]), check=False)
        return tuple(int(n) for n in header.get_data_shape())
    except Exception as e:
        raise ImageReadError(f"{path}: invalid NIfTI header ({type(e).__name__}: {e}). Re-export the file.") from None


def check_nifti_header(path: str | os.PathLike) -> tuple[int, ...] | None:
    """Refuse a NIfTI file whose header declares more than :data:`MAX_IMAGE_VOXELS` voxels or :data:`MAX_IMAGE_DIM`
    along an axis, before anything is decoded (a compressed file of a few KB can declare terabytes).

    Returns:
        the declared shape, or None for a file that is not NIfTI (by name).

    Raises:
        ImageTooLargeError: naming the file, its shape and the limits.
    """
    name = str(path)
    if not name.lower().endswith(NIFTI_SUFFIXES):
        return None
    shape = _nifti_shape(name)
    voxels = math.prod(shape)
    if voxels > MAX_IMAGE_VOXELS or any(n > MAX_IMAGE_DIM for n in shape):
        raise ImageTooLargeError(
            f"image {name}: its header declares shape {shape} ({voxels:,} voxels), above the limit of "
            f"{MAX_IMAGE_VOXELS:,} voxels and {MAX_IMAGE_DIM} per axis (ffcl_monai.data.transforms.MAX_IMAGE_VOXELS / "
            "MAX_IMAGE_DIM); it was not decoded. The file is corrupt or hostile, or needs cropping/resampling before "
            "use: replace it or remove it from the datalist."
        )
    return shape


def check_finite(img: Any, source: str) -> None:
    """Raise :class:`NonFiniteImageError` naming ``source`` if the floating image ``img`` holds NaN or +-Inf values."""
    t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    raise NonFiniteImageError(
        f"image {source} has {n_nan} NaN and {n_inf} infinite pixel value(s) out of {t.numel()}; they would make the "
        "loss, the metrics or the predicted probabilities NaN. Fix the file (e.g. replace NaN by the background value "
        "where it was converted) or remove it from the datalist."
    )


def _paths(value: Any) -> list[str]:
    """The file name(s) of one datalist value (a path or a list of paths)."""
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if isinstance(v, (str, os.PathLike))]
    return []


class _DicomDisplayFirst:
    """The loader of :class:`LoadImageNamedd`: one single-frame DICOM file goes to
    :class:`~ffcl_monai.data.dicom.DicomDisplayReader`, everything else (other formats, DICOM series folders,
    multi-frame files, lists of files) to the wrapped MONAI ``LoadImage`` and its readers, as before."""

    def __init__(self, loader: Any, dicom_reader: Any) -> None:
        self.loader = loader
        self.dicom_reader = dicom_reader

    @property
    def image_only(self) -> bool:
        return self.loader.image_only

    @image_only.setter
    def image_only(self, value: bool) -> None:  # MONAI Label's infer task switches it on the dict transform's loader
        self.loader.image_only = value

    def __getattr__(self, name: str) -> Any:  # anything else MONAI reads from LoadImage (readers, dtype, ...)
        loader = self.__dict__.get("loader")
        if loader is None:  # copy/pickle probe before __init__: the AttributeError they expect, not a KeyError
            raise AttributeError(name)
        return getattr(loader, name)

    def register(self, reader: Any) -> None:
        self.loader.register(reader)

    def __call__(self, filename: Any, reader: Any = None) -> Any:
        if self.dicom_reader.verify_suffix(filename):
            return self.loader(filename, self.dicom_reader)
        return self.loader(filename, reader)


class LoadImageNamedd(LoadImaged):
    """``LoadImaged`` that reads 2D DICOM as a viewer shows it and names the file and the fix in every failure.

    - a single-frame DICOM file (``.dcm``/``.dicom``, or no suffix / a UID name and the ``DICM`` preamble) is read by
      :func:`ffcl_monai.data.dicom.read_dicom_display` whichever MONAI reader is installed: BitsStored, Modality LUT,
      VOI LUT or window (``dicom_window``: ``"auto"``, ``"none"`` or ``[center, width]``), MONOCHROME1 inverted,
      scaled to [0, 1]; the image has MONAI's layout for 2D (channel first with ``ensure_channel_first``, axes
      (x, y)) and no DICOM tags in its metadata. DICOM series (folders) and multi-frame files keep MONAI's reader;
    - NIfTI headers are checked first (:func:`check_nifti_header`): a declared shape above :data:`MAX_IMAGE_VOXELS` /
      :data:`MAX_IMAGE_DIM` raises :class:`ImageTooLargeError` without decoding the data;
    - missing, unreadable or truncated files raise :class:`ImageReadError`;
    - a loaded image with NaN or infinite values raises :class:`NonFiniteImageError`.
    """

    def __init__(self, keys: KeysCollection, *args: Any, dicom_window: Any = "auto", **kwargs: Any) -> None:
        from ffcl_monai.data.dicom import DicomDisplayReader

        super().__init__(keys, *args, **kwargs)
        self._loader = _DicomDisplayFirst(self._loader, DicomDisplayReader(dicom_window))

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        files = {k: _paths(data[k]) for k in self.keys if k in data}
        for names in files.values():
            for name in names:
                check_nifti_header(name)
        try:
            d = super().__call__(data, reader)
        except ImageReadError:
            raise  # already names the file and the fix (DICOM reader)
        except Exception as e:
            shown = [n for names in files.values() for n in names] or [str(data.get(k)) for k in self.keys]
            raise ImageReadError(
                f"cannot read image {', '.join(shown)}: {type(e).__name__}: {e}. The file is missing, truncated or "
                "not an image. Replace or remove it from the datalist (`python -m data_prep check DATALIST` lists "
                "every bad file)."
            ) from e
        for key in self.key_iterator(d):
            check_finite(d[key], ", ".join(files.get(key, [])) or str(key))
        return d


class EnsureChannelsd(MapTransform):
    """Make images ``channels``-channel and check their number of spatial dims.

    RGB(A)-stored grayscale images (Kermany JPEGs are RGB with equal channels) are averaged to one channel when
    ``channels == 1``; with ``channels == 3`` grey images are repeated to three channels and RGBA drops its alpha, so
    a release that mixes grey and RGB files (Kermany OCT) loads as one kind. A trailing singleton axis of 2D
    DICOM/NIfTI slices is dropped. Anything else that does not match raises :class:`ImageReadError` naming the file and the config key to change.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, spatial_dims: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source = getattr(img, "meta", {}).get("filename_or_obj", key)
            if self.spatial_dims == 2 and img.ndim == 4 and img.shape[-1] == 1:
                img = img[..., 0]
            if img.ndim - 1 != self.spatial_dims:
                raise ImageReadError(
                    f"{source} has {img.ndim - 1} spatial dims (shape {tuple(img.shape[1:])}) but the config has "
                    f"spatial_dims={self.spatial_dims}. Use the 3d.yaml overlay for volumes and leave it out for 2D "
                    "images, or fix the datalist."
                )
            c = img.shape[0]
            if c != self.channels:
                if self.channels == 1 and c in (3, 4):
                    img = img[:3].mean(dim=0, keepdim=True)
                elif self.channels == 3 and c == 1:  # grey sources (DICOM, most PNGs) for a 3-channel network
                    img = img.repeat(3, *([1] * (img.ndim - 1)))
                elif self.channels == 3 and c == 4:  # RGBA: the alpha channel is not image content
                    img = img[:3]
                else:
                    raise ImageReadError(
                        f"{source} has {c} channels but the config has in_channels={self.channels}; "
                        "set `--in_channels` to match the images."
                    )
            d[key] = img
        return d


#: Per-channel (R, G, B) mean and standard deviation of ImageNet training images in [0, 1], as torchvision's
#: ``transforms.Normalize`` for its pretrained ResNets uses them (torchvision.models.ResNet18_Weights.IMAGENET1K_V1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Values of the ``input_norm`` config key.
INPUT_NORMS = ("none", "imagenet")


def input_norm_stats(input_norm: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` per channel for ``input_norm`` and an image of ``channels`` channels; None for ``none``.

    ``imagenet`` with 3 channels: :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`. With 1 channel (a grey image for a
    network whose conv1 was summed over R, G, B, ``in_channels: 1``): the mean of the three means and of the three
    standard deviations (0.449, 0.226), the usual single-channel choice; only 3 channels reproduce the ImageNet
    network's input exactly.

    Raises:
        ValueError: an unknown ``input_norm`` or a channel count ImageNet statistics do not exist for, naming the key.
    """
    name = str(input_norm).strip().lower()
    if name in ("none", "null", ""):
        return None
    if name != "imagenet":
        raise ValueError(f"unknown `input_norm` {input_norm!r}; use one of {list(INPUT_NORMS)}.")
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ValueError(
        f"`input_norm: imagenet` needs images of 3 (or 1) channels, got {channels}; set `in_channels` to 3 (grey "
        "images are repeated to R, G, B) or `input_norm` to none."
    )


class NormalizeInputd(MapTransform):
    """``(x - mean_c) / std_c`` per channel with the statistics of ``input_norm`` (:func:`input_norm_stats`).

    Listed after the intensity scaling to [0, 1] in the deterministic preprocessing of ``train.yaml`` and
    ``inference.yaml``, so that training, validation, evaluation, the embedding monitor, inference and the MLflow
    model all feed the network the same values. ``input_norm: none`` leaves the image unchanged (the configs also
    disable the entry then, so caches and ``preprocessing.json`` stay as they were).

    MONAI's ``NormalizeIntensityd(subtrahend, divisor, channel_wise=True)`` computes the same but writes into its
    input tensor channel by channel; this one returns a new float32 tensor and checks the channel count against the
    statistics, naming the config keys.
    """

    def __init__(self, keys: KeysCollection, input_norm: str = "none", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        input_norm_stats(input_norm, 3)  # an unknown name fails when the config is built, not at the first image
        self.input_norm = str(input_norm).strip().lower()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            stats = input_norm_stats(self.input_norm, int(t.shape[0]))
            if stats is None:
                continue
            shape = (-1,) + (1,) * (t.ndim - 1)  # (C, 1, ..., 1): broadcasts over every spatial axis
            mean = torch.as_tensor(stats[0], dtype=torch.float32, device=t.device).reshape(shape)
            std = torch.as_tensor(stats[1], dtype=torch.float32, device=t.device).reshape(shape)
            d[key] = (t.to(torch.float32) - mean) / std
        return d


class LabelToTensord(MapTransform):
    """Integer class labels become long scalars; multi-label lists (with -1 = ignore) become float vectors."""

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (list, tuple)):
                d[key] = torch.as_tensor(value, dtype=torch.float32)
            else:
                d[key] = torch.as_tensor(int(value), dtype=torch.long)
        return d


class MetadataToTensord(MapTransform):
    """Metadata fields -> float32 scalars, ``None``/missing -> NaN (masked by
    :class:`~ffcl_monai.losses.auxiliary.MaskedMultiHeadLoss`), so batches of entries with partial metadata collate
    (auxiliary-target pretraining, seed 004)."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            value = d.get(key)
            try:
                v = float("nan") if value is None else float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"metadata field {key!r} of {d.get('image')} is {value!r}; auxiliary targets must be numbers or "
                    "null (view as a class index, sex as 0/1, age in years)."
                ) from None
            d[key] = torch.tensor(v, dtype=torch.float32)
        return d


class RandGaussianNoiseTorchd(RandomizableTransform, MapTransform):
    """Add Gaussian noise N(mean, std) with probability ``prob``, drawn with torch on the image's device.

    Same arguments and draws per call as ``monai.transforms.RandGaussianNoised`` (one std, uniform in ``[0, std]``
    when ``sample_std``, and one noise field shared by all ``keys``), but the noise is generated by a
    ``torch.Generator`` seeded from this transform's random state, so ``set_random_state`` still makes it
    reproducible. Floating inputs keep their dtype; integer inputs become float32. The input is not modified.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        mean: float = 0.0,
        std: float = 0.1,
        sample_std: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if std < 0:
            raise ValueError(f"RandGaussianNoiseTorchd: std must be >= 0, got {std}.")
        self.mean = float(mean)
        self.std = float(std)
        self.sample_std = sample_std
        self._draw_std = 0.0
        self._draw_seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._draw_std = float(self.R.uniform(0, self.std)) if self.sample_std else self.std
        self._draw_seed = int(self.R.randint(MAX_SEED, dtype="uint32"))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if not img.is_floating_point():
                img = img.float()
            generator = torch.Generator(device=img.device).manual_seed(self._draw_seed)
            noise = torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype)
            d[key] = img + (noise * self._draw_std + self.mean)
        return d


def _find_read_error(exc: BaseException | None) -> ImageReadError | None:
    while exc is not None:
        if isinstance(exc, ImageReadError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def cached_dataset(
    data: Sequence[dict],
    transform: Compose | Sequence[Any],
    cache_rate: float = 1.0,
    num_workers: int | None = None,
    copy_cache: bool = True,
    runtime_cache: bool | str = False,
    plan: Any = None,
) -> Dataset:
    """A MONAI ``CacheDataset`` (deterministic prefix cached once) whose build errors are readable.

    MONAI wraps transform errors in ``RuntimeError("applying transform ...")``; the user needs the file name and the
    fix, so the underlying :class:`ImageReadError` is re-raised on its own. ``cache_rate=0`` gives a plain Dataset
    (for debugging or data larger than RAM).

    ``plan``: a :class:`ffcl_monai.data.cache_planner.CachePlan` (train.yaml's ``cache_plan``). Its ``ram`` mode is
    the CacheDataset above with the plan's ``cache_rate``; ``partial`` and ``disk`` use the disk cache of
    :mod:`ffcl_monai.data.disk_cache`, ``none`` a plain Dataset. None: ``cache_rate`` alone, as before plans existed.
    """
    if not isinstance(transform, Compose):
        transform = Compose(list(transform))
    mode = getattr(plan, "mode", "ram")
    if plan is not None:
        cache_rate = plan.cache_rate if mode in ("ram", "partial") else 0.0
    if mode == "none" or (mode == "ram" and cache_rate <= 0):
        return Dataset(data=list(data), transform=transform)
    try:
        if mode in ("partial", "disk"):
            from ffcl_monai.data.disk_cache import PartialCacheDataset, disk_dataset

            if mode == "disk" or cache_rate <= 0:
                return disk_dataset(data, transform, plan.cache_dir, plan.compact, num_workers)
            return PartialCacheDataset(data, transform, cache_rate, plan.cache_dir, plan.compact, num_workers,
                                       copy_cache, runtime_cache)
        return CacheDataset(
            data=list(data),
            transform=transform,
            cache_rate=cache_rate,
            num_workers=num_workers,
            copy_cache=copy_cache,
            runtime_cache=runtime_cache,
            progress=sys.stderr.isatty(),  # progress bars on terminals only, not in CI logs
        )
    except Exception as e:
        read_error = _find_read_error(e)
        if read_error is not None:
            raise type(read_error)(str(read_error)) from None  # the subclass too (too large, NaN, ...)
        raise
