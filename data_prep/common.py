"""Shared data structures for the layout scanners."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("training", "validation", "test")

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
    ``split`` is the official split when the source defines one, else ``None`` (the pool splits are carved from).
    ``stratum`` overrides the stratification key (default: the label).
    """

    path: Path
    label: int | list[int] | None
    patient: str | None = None
    split: str | None = None
    stratum: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    read_path: Path | None = None

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
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()


def parse_class_map(text: str | None) -> list[str] | None:
    """Parse ``--class-names a,b,c``."""
    if not text:
        return None
    names = [t.strip() for t in text.split(",")]
    if any(not n for n in names):
        raise LayoutError(f"--class-names {text!r} has an empty name")
    return names
