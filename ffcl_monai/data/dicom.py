"""Single-frame 2D DICOM (radiographs) read as a radiologist's viewer shows them, whichever MONAI reader is installed.

MONAI picks a DICOM reader by what is installed: ITK inverts MONOCHROME1 images, pydicom does not, and neither applies
the file's VOI LUT or window; the configs' per-image min-max ``ScaleIntensityd`` then lets a burnt-in marker at the top
of a 12-bit range crush the lungs into a few grey levels. :func:`read_dicom_display` reads the file with pydicom and
applies the display pipeline of DICOM PS3.3 C.11 ("Look Up Tables and Presentation States"), in the standard's order:

1. **Stored values**: the decoded pixels, masked to ``BitsStored`` bits (sign-extended when ``PixelRepresentation``
   is 1), so bits above ``HighBit`` (old overlay planes, garbage) never reach the LUTs.
2. **Modality LUT** (PS3.3 C.11.1): ``RescaleSlope``/``RescaleIntercept``, or a Modality LUT Sequence
   (``pydicom.pixels.apply_modality_lut``).
3. **VOI LUT** (PS3.3 C.11.2), chosen by ``window`` (the bundle key ``dicom_window``):
   ``"auto"`` (default) the file's first VOI LUT Sequence item if it has one (the vendor's display curve, as pydicom
   prefers it), else its first ``WindowCenter``/``WindowWidth`` pair with its ``VOILUTFunction`` (LINEAR,
   LINEAR_EXACT or SIGMOID, C.11.2.1.2-3), else none; ``"none"`` skips the VOI step; ``[center, width]`` applies that
   LINEAR window to the Modality LUT output (rescaled units, e.g. HU).
4. **Scaling to [0, 1]**: with a VOI step, its output range is mapped to [0, 1] (the window's lower edge -> 0, upper
   edge -> 1, values outside clipped): this is what the viewer displays, and a burnt-in marker above the window
   saturates at 1 without moving any other pixel. Without one, robust min-max: the :data:`PERCENTILES` (0.5 and 99.5)
   go to 0 and 1 and values outside are clipped, so fewer than 0.5 % of the pixels (markers, text, collimator edges)
   cannot compress the rest. The clip makes the output reach exactly 0 and 1, so the configs' min-max
   ``ScaleIntensityd`` that follows leaves it unchanged (for JPEG/PNG it still scales as before). A window wider than
   the image's values leaves the output inside (0, 1); ``ScaleIntensityd`` then stretches it linearly (monotone,
   markers stay clipped), exactly as it stretches an under-exposed JPEG.
5. **Presentation**: MONOCHROME1 (0 = white) is inverted, ``1 - x``, so every output is MONOCHROME2-like (bright bone).

Colour images (RGB, YBR_*, PALETTE COLOR: secondary captures of radiographs, screenshots) are converted to RGB by
pydicom (PALETTE COLOR through its palette), then to grey as the mean of the three channels (what
:class:`~ffcl_monai.data.transforms.EnsureChannelsd` does for RGB JPEGs), then scaled as in step 4 (no LUTs: the
Modality and VOI LUTs apply to monochrome data; an explicit ``[center, width]`` window is applied to the grey values).

Refused, with :class:`DicomReadError` naming the file and the fix: files that are not DICOM, DICOM without pixel data
(structured reports, presentation states, key-object notes), multi-frame files (``NumberOfFrames > 1``: volumes, cine,
tomosynthesis; :class:`~ffcl_monai.data.transforms.LoadImageNamedd` leaves those to MONAI's reader, for 3D configs),
sizes above ``data_prep.check.MAX_DIM``/``MAX_VOXELS`` (checked from the header, before decoding), unknown
photometric interpretations, and compressed pixel data that no installed pydicom decoder handles. Messages and logs
never quote tag values other than technical ones (sizes, bit depths, photometric interpretation, transfer syntax):
decoder messages go through :func:`data_prep.phi.redact` and pydicom's value validation is off while reading
(:class:`data_prep.phi.quiet_dicom`), since its warnings quote values.

The output is a float32 ``(rows, columns)`` numpy array and nothing else from the file (:class:`DicomDisplay` adds
only the technical facts above). :class:`DicomDisplayReader` wraps it as a MONAI ``ImageReader`` (MONAI's axis order,
no DICOM tags in the metadata); the loader and ``python -m data_prep check`` both use this one function,
so training, evaluation, inference, MONAI Label and data preparation read a file identically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import numpy as np
from monai.data.image_reader import ImageReader

from data_prep.common import DICOM_SUFFIXES as _DATA_PREP_DICOM_SUFFIXES
from ffcl_monai.errors import ImageReadError, UserInputError

log = logging.getLogger(__name__)

#: File name endings treated as DICOM: ``data_prep.common.DICOM_SUFFIXES`` (``.dcm``, ``.dicom``; one definition).
#: Files without a suffix, or named by a UID, are DICOM when they carry the 128-byte preamble + ``DICM`` (PS3.10 7.1).
DICOM_SUFFIXES = _DATA_PREP_DICOM_SUFFIXES
#: Percentiles mapped to 0 and 1 when no VOI LUT or window is applied.
PERCENTILES = (0.5, 99.5)
#: ``dicom_window`` values besides an explicit ``[center, width]``.
WINDOW_MODES = ("auto", "none")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Photometric interpretations converted to grey (pydicom returns YBR_* as RGB; PALETTE COLOR goes through its LUT).
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")

WindowSpec = Union[str, Sequence[float], None]


class DicomReadError(ImageReadError):
    """A DICOM file cannot be read as a 2D display image; the message names the file and the fix (never tag values)."""


class DicomDisplay(NamedTuple):
    """A file's display image and the technical facts of how it was made (nothing identifying)."""

    pixels: np.ndarray  #: float32 (rows, columns) in [0, 1], MONOCHROME2-like
    photometric: str  #: PhotometricInterpretation of the file
    bits_stored: int
    voi: str  #: "lut" (VOI LUT Sequence), "window" (the file's window), "explicit" (dicom_window), or "none"
    window: tuple[float, float] | None  #: (center, width) applied, if a window was
    pixel_spacing: tuple[float, float]  #: (row, column) spacing in mm (PixelSpacing or ImagerPixelSpacing), else 1


def parse_window(value: WindowSpec) -> str | tuple[float, float]:
    """``dicom_window`` as ``"auto"``, ``"none"`` or ``(center, width)``; ``None`` means ``"none"``.

    Raises:
        UserInputError: naming the key and the accepted values.
    """
    if value is None:
        return "none"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in WINDOW_MODES:
            return v
    elif isinstance(value, Sequence) and len(value) == 2:
        try:
            center, width = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(center) and math.isfinite(width) and width >= 1:
                return center, width
    raise UserInputError(
        f"dicom_window is {value!r}; use 'auto' (the file's own VOI LUT or first window, else none), 'none' (no "
        "window: robust percentile scaling) or [center, width] with width >= 1 in the image's rescaled units, e.g. "
        "--dicom_window \"[2048, 4096]\"."
    )


def has_dicom_preamble(path: str | os.PathLike) -> bool:
    """True when the file starts with the PS3.10 preamble: 128 bytes, then ``DICM`` (reads 132 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a regular file named ``*.dcm``/``*.dicom``, or without a suffix (or named by a UID, ending in digits)
    and with the DICOM preamble."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        return False
    if name.lower().endswith(DICOM_SUFFIXES):
        return True
    ext = os.path.splitext(os.path.basename(name))[1]
    return (not ext or ext[1:].isdigit()) and has_dicom_preamble(name)  # "IM0001", "1.2.840.113619.2.55.3.604"


def frame_count(path: str | os.PathLike) -> int:
    """``NumberOfFrames`` from the header (1 when absent); 1 as well when the header cannot be parsed (the full read
    then reports the file)."""
    import pydicom

    from data_prep.phi import quiet_dicom

    try:
        with quiet_dicom():
            ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=["NumberOfFrames"])
            return int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        return 1


def is_single_frame_dicom(path: Any) -> bool:
    """True when ``path`` is one DICOM file (see :func:`is_dicom_file`) that is not multi-frame: what
    :class:`~ffcl_monai.data.transforms.LoadImageNamedd` reads with :func:`read_dicom_display`."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    return is_dicom_file(path) and frame_count(path) <= 1


def _fail(path: str, what: str, fix: str) -> DicomReadError:
    return DicomReadError(f"DICOM {path}: {what}. {fix}")


def _spacing(ds: Any) -> tuple[float, float]:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        try:
            if v is not None and len(v) == 2 and float(v[0]) > 0 and float(v[1]) > 0:
                return float(v[0]), float(v[1])
        except (TypeError, ValueError):
            continue
    return 1.0, 1.0


def _stored_values(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored values restricted to ``bits_stored`` bits (two's complement sign extension when ``signed``)."""
    if not np.issubdtype(arr.dtype, np.integer) or bits_stored <= 0 or bits_stored >= arr.dtype.itemsize * 8:
        return arr
    a = arr.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        a = np.where(a >= 1 << (bits_stored - 1), a - (1 << bits_stored), a)
    return a


def _first(value: Any) -> float:
    """The first of a possibly multi-valued numeric element (WindowCenter/WindowWidth)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def window_to_unit(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI window (PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.2 LINEAR_EXACT, C.11.2.1.3.1 SIGMOID) with output range
    [0, 1]: the standard's formulas with ``y_min = 0`` and ``y_max = 1``."""
    x = np.asarray(x, dtype=np.float64)
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        width = 1.0  # PS3.3 C.11.2.1.2: Window Width >= 1 for LINEAR
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def robust_unit(x: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Map the ``percentiles`` of ``x`` to 0 and 1 and clip: the output reaches exactly 0 and 1 unless ``x`` is
    constant (then all zeros, as MONAI's min-max ``ScaleIntensity`` gives)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(x, percentiles))
    if hi <= lo:  # more than the top/bottom percentiles share one value: plain min-max
        lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _pixel_luts() -> Any:
    """pydicom's LUT functions: ``pydicom.pixels`` (pydicom 3), else ``pydicom.pixel_data_handlers.util`` (pydicom 2,
    which MONAI Label 0.8.5's environment pins); same names and behaviour."""
    try:
        import pydicom.pixels as luts
    except ImportError:
        import pydicom.pixel_data_handlers.util as luts
    return luts


def _voi_lut(values: np.ndarray, ds: Any) -> np.ndarray:
    """The first VOI LUT Sequence item applied, scaled by the LUT's own output range to [0, 1]."""
    apply_voi = _pixel_luts().apply_voi

    iv = np.rint(values).astype(np.int64) if not np.issubdtype(values.dtype, np.integer) else values
    out = apply_voi(iv, ds, index=0).astype(np.float64)
    table = apply_voi(np.arange(-(2**16), 2**16, dtype=np.int64), ds, index=0)  # every output the LUT can give
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return np.zeros(out.shape, dtype=np.float64)
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def load_dicom_display(path: str | os.PathLike, window: WindowSpec = "auto") -> DicomDisplay:
    """Read one single-frame 2D DICOM file as its display image (module docstring: the steps and what is refused).

    Args:
        path: the file.
        window: ``"auto"``, ``"none"`` or ``[center, width]`` (:func:`parse_window`; the bundle key ``dicom_window``).

    Raises:
        DicomReadError: naming the file, the problem and the fix; never a tag value such as PatientName.
        UserInputError: an invalid ``window``.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from data_prep.check import MAX_DIM, MAX_VOXELS
    from data_prep.phi import quiet_dicom, redact

    mode = parse_window(window)
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise _fail(name, "file not found (or a folder: DICOM series are 3D, read by MONAI's reader)",
                    "Fix the path in the datalist or remove the entry")
    ds = None
    try:
        with quiet_dicom():
            ds = pydicom.dcmread(name)
            if "PixelData" not in ds:
                kind = "float pixel data (a parametric map)" if ("FloatPixelData" in ds or "DoubleFloatPixelData"
                                                                 in ds) else "no pixel data"
                sop = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
                raise _fail(name, f"{kind} ({sop}, Modality {str(ds.get('Modality', '?'))[:16]}): not an image (a "
                            "structured report, presentation state, key-object note...), or truncated before its "
                            "pixels", "Remove it from the datalist, or replace a truncated file")
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if frames > 1:
                raise _fail(name, f"multi-frame ({frames} frames); the 2D reader reads single-frame images",
                            "For a volume use a 3D config (3d.yaml) or convert it to NIfTI (python -m data_prep "
                            "volumes); for cine or tomosynthesis export the frame you want as its own file")
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            spp = int(ds.get("SamplesPerPixel", 1) or 1)
            if rows > MAX_DIM or cols > MAX_DIM or rows * cols * spp > MAX_VOXELS:
                raise _fail(name, f"declares {rows} x {cols} x {spp} samples, above the limit of {MAX_DIM} per axis "
                            f"(data_prep.check.MAX_DIM); it was not decoded",
                            "The file is corrupt, or needs downsampling before use: replace or remove it")
            photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
            if photometric not in MONOCHROME + COLOUR:
                raise _fail(name, f"photometric interpretation {photometric or 'missing'!r} is not supported",
                            f"Convert it to one of {', '.join(MONOCHROME + COLOUR)}, or remove it")
            try:
                arr = ds.pixel_array
            except Exception as e:
                syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
                raise _fail(name, f"pydicom cannot decode its pixel data (transfer syntax "
                            f"{getattr(syntax, 'name', None) or syntax or 'unknown'}: {type(e).__name__}: "
                            f"{redact(str(e), ds).splitlines()[0][:200] if str(e) else ''})",
                            "ffcl-monai installs python-gdcm for JPEG / JPEG Lossless / JPEG-LS / JPEG 2000: check "
                            "that `import gdcm` works in this environment (`pip install python-gdcm`), or install the "
                            "decoder pydicom names, or decompress the file (dcmtk `dcmdjpeg`, gdcm `gdcmconv --raw`)"
                            ) from None
            bits_stored = int(ds.get("BitsStored", 0) or arr.dtype.itemsize * 8)
            spacing = _spacing(ds)
            voi, applied = "none", None
            if photometric in MONOCHROME:
                if arr.ndim != 2:
                    raise _fail(name, f"monochrome pixel data of shape {tuple(arr.shape)}, not 2D",
                                "Export a single-frame 2D image, or remove it")
                apply_modality_lut = _pixel_luts().apply_modality_lut

                values = _stored_values(arr, bits_stored, int(ds.get("PixelRepresentation", 0) or 0) == 1)
                values = apply_modality_lut(values, ds)
                if isinstance(mode, tuple):
                    out, voi, applied = window_to_unit(values, *mode), "explicit", mode
                elif mode == "auto" and ds.get("VOILUTSequence"):
                    out, voi = _voi_lut(values, ds), "lut"
                elif mode == "auto" and ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
                    applied = (_first(ds.WindowCenter), _first(ds.WindowWidth))
                    out = window_to_unit(values, *applied, str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"))
                    voi = "window"
                else:
                    out = robust_unit(values)
                if photometric == "MONOCHROME1":
                    out = 1.0 - out
            else:
                if photometric == "PALETTE COLOR":
                    apply_color_lut = _pixel_luts().apply_color_lut

                    arr = apply_color_lut(arr, ds)
                if arr.ndim != 3 or arr.shape[-1] != 3:
                    raise _fail(name, f"colour pixel data of shape {tuple(arr.shape)}, not one RGB frame",
                                "Export a single-frame 2D image, or remove it")
                grey = arr.astype(np.float64).mean(axis=-1)
                if isinstance(mode, tuple):
                    out, voi, applied = window_to_unit(grey, *mode), "explicit", mode
                else:
                    out = robust_unit(grey)
    except (DicomReadError, UserInputError):
        raise
    except InvalidDicomError:
        raise _fail(name, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
                    "Replace it with the DICOM export, or give the file its real suffix (.png, .jpeg, ...)") from None
    except Exception as e:  # a truncated or malformed file: the decoder's message, without tag values
        text = redact(str(e), ds).splitlines()[0][:200] if str(e) else ""
        raise _fail(name, f"cannot be read ({type(e).__name__}: {text})",
                    "The file is truncated or malformed: replace it or remove it from the datalist") from None
    pixels = np.ascontiguousarray(out, dtype=np.float32)
    if not np.isfinite(pixels).all():  # cannot happen for finite inputs; kept as a guard for odd LUTs
        raise _fail(name, "non-finite values after the Modality/VOI LUTs", "Replace the file or remove it")
    log.debug("DICOM %s: %s, BitsStored %d, VOI %s", name, photometric, bits_stored, voi)
    return DicomDisplay(pixels, photometric, bits_stored, voi, applied, spacing)


def read_dicom_display(path: str | os.PathLike, window: WindowSpec = "auto") -> np.ndarray:
    """The float32 ``(rows, columns)`` display image of one single-frame DICOM file, in [0, 1], MONOCHROME2-like
    (:func:`load_dicom_display`)."""
    return load_dicom_display(path, window).pixels


class DicomDisplayReader(ImageReader):
    """MONAI ``ImageReader`` around :func:`load_dicom_display` for single-frame DICOM files.

    ``get_data`` gives MONAI's axis order for 2D images, ``(x, y)`` = ``(columns, rows)`` (the transpose of the numpy
    array, as MONAI's ITK and pydicom readers give), and metadata without any DICOM tag: ``affine`` (the ITK reader's
    LPS -> RAS flip with the pixel spacing), ``spacing``, ``spatial_shape``, ``original_channel_dim`` (no channel),
    ``space``; LoadImage adds ``filename_or_obj``.
    """

    def __init__(self, window: WindowSpec = "auto") -> None:
        super().__init__()
        parse_window(window)  # fail at construction (config load), not at the first DICOM
        self.window = window

    def verify_suffix(self, filename: Sequence[Any] | Any) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and is_single_frame_dicom(names[0])

    def read(self, data: Sequence[Any] | Any, **kwargs: Any) -> DicomDisplay:
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        if len(names) != 1:
            raise DicomReadError(f"DicomDisplayReader reads one file at a time, got {len(names)}: {names[:3]}")
        return load_dicom_display(names[0], self.window)

    def get_data(self, img: DicomDisplay) -> tuple[np.ndarray, dict]:
        from monai.utils import SpaceKeys

        data = np.ascontiguousarray(img.pixels.T)  # (columns, rows): MONAI's (x, y)
        row_sp, col_sp = img.pixel_spacing
        affine = np.diag([-col_sp, -row_sp, 1.0, 1.0])
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spacing": np.array([col_sp, row_sp]),
            "spatial_shape": np.array(data.shape),
            "original_channel_dim": float("nan"),
            "space": SpaceKeys.RAS,
        }
        return data, meta
