"""Shared data structures for the layout scanners, path normalisation and the ``data_prep`` logger."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("training", "validation", "test")

#: Library code logs here rather than printing (only check reports go to stdout); ``python -m data_prep`` sends INFO
#: and above to stderr.
log = logging.getLogger("data_prep")

#: Where a record's patient identifier came from (``Record.patient_source``). IDs read from DICOM tags or from a CSV
#: column are treated as private (hospital MRNs): pseudonyms of them need a secret salt (see :mod:`data_prep.phi`).
ID_FROM_NAME = "file name"
ID_FROM_CSV = "CSV column"
ID_FROM_DICOM = "DICOM PatientID"
PRIVATE_ID_SOURCES = (ID_FROM_CSV, ID_FROM_DICOM)

#: File suffixes data_prep knows how to open (lower case; ``.nii.gz`` is handled specially).
IMAGE_SUFFIXES_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
IMAGE_SUFFIXES_3D = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
DICOM_SUFFIXES = (".dcm", ".dicom")


class LayoutError(ValueError):
    """SRC does not look like the layout named on the command line, or its metadata is inconsistent."""


@dataclass
class Record:
    """One image as found in the source.

    ``path`` is the absolute final location (what the datalist will point to). ``read_path`` is where the file can be
    read right now, which differs only for generated images that are still in a staging folder.
    ``patient`` is the *raw* identifier; it stays in memory and is hashed before anything is written.
    ``patient_source`` says where it came from (:data:`ID_FROM_NAME`, :data:`ID_FROM_CSV`, :data:`ID_FROM_DICOM`).
    ``split`` is the official split when the source defines one, else ``None`` (the pool splits are carved from).
    ``stratum`` overrides the stratification key (default: the label).

    Paths are normalised on construction (:func:`norm_path`: absolute, ``..`` and ``.`` collapsed), so every lookup
    keyed by :func:`file_key` finds them, whatever form SRC was given in.
    """

    path: Path
    label: int | list[int] | None
    patient: str | None = None
    split: str | None = None
    stratum: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    read_path: Path | None = None
    patient_source: str | None = None

    def __post_init__(self) -> None:
        self.path = norm_path(self.path)
        if self.read_path is not None:
            self.read_path = norm_path(self.read_path)
        if self.patient is not None and self.patient_source is None:
            self.patient_source = ID_FROM_NAME

    @property
    def generated(self) -> bool:
        """True for images data_prep writes itself (medmnist/npz PNGs, converted DICOM series)."""
        return self.read_path is not None

    @property
    def readable(self) -> Path:
        """Where to open the file now."""
        return self.read_path or self.path


@dataclass
class Scan:
    """What a layout scanner returns: the records plus everything the header needs."""

    layout: str
    records: list[Record]
    class_names: list[str]
    task: str  # "binary" | "multiclass" | "multilabel"
    spatial_dims: int
    modality: str
    description: str
    options: dict[str, Any]
    header_extra: dict[str, Any] = field(default_factory=dict)
    #: optional staging folder of generated images (medmnist, npz, volumes); committed after the checks pass
    staging: Any = None
    #: official split names present in the source, e.g. {"training", "test"}
    official: set[str] = field(default_factory=set)


def norm_path(path: str | os.PathLike) -> Path:
    """The one normal form of a path in data_prep: absolute, with ``..``/``.`` collapsed (lexically; symlinks kept).

    Records, file-check results and datalist entries are all keyed by this form (:func:`file_key`), so a SRC given as
    ``../data/x`` and one given as ``/abs/data/x`` produce the same keys.
    """
    return Path(os.path.abspath(os.fspath(path)))


def file_key(path: str | os.PathLike) -> str:
    """Dictionary key of a file: ``str(norm_path(path))``. Use it for every path -> result lookup."""
    return str(norm_path(path))


def printable(path: str | os.PathLike) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8_path(path: str | os.PathLike) -> bool:
    """False when a file name holds bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` is ``root`` or below it (both taken as given; normalise or resolve them first)."""
    p, r = os.fspath(path), os.fspath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def natural_key(s: str) -> list[Any]:
    """Sort key that orders ``img2`` before ``img10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def is_image_file(name: str) -> bool:
    """True for file names with a supported image suffix (2D, 3D or DICOM)."""
    low = name.lower()
    if low.startswith("."):
        return False
    return low.endswith(IMAGE_SUFFIXES_2D + IMAGE_SUFFIXES_3D + DICOM_SUFFIXES)


def list_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted naturally, hidden files skipped (``.DS_Store``, ``._x.jpeg``)."""
    out: list[Path] = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out.extend(Path(root) / f for f in files if is_image_file(f))
    else:
        out = [p for p in folder.iterdir() if p.is_file() and is_image_file(p.name)]
    return sorted(out, key=lambda p: natural_key(str(p)))


def relpath(path: Path, start: Path) -> str:
    """POSIX relative path from ``start`` (the JSON's folder) to ``path``."""
    return Path(os.path.relpath(norm_path(path), norm_path(start))).as_posix()


def parse_class_map(text: str | None) -> list[str] | None:
    """Parse ``--class-names a,b,c``."""
    if not text:
        return None
    names = [t.strip() for t in text.split(",")]
    if any(not n for n in names):
        raise LayoutError(f"--class-names {text!r} has an empty name")
    return names
