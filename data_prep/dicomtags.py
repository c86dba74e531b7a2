"""Reading the one identifying DICOM tag data_prep uses: PatientID, for patient-grouped splits.

The value is held in memory only (:class:`data_prep.common.Record` ``patient``); what is written is a salted digest
(:func:`data_prep.phi.patient_hash`). Tags are read with ``stop_before_pixels`` (and only the tags needed), so this is
cheap even for large files; a file that cannot be parsed yields ``None`` here and is reported by the image check.

The same read tells whether the file's *path* spells out one of its identifiers (exports often name files by their
SOPInstanceUID, folders by PatientID or PatientName): the layouts then warn that the datalist would carry it, and
point to ``--pseudonymize-paths``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from .common import DICOM_SUFFIXES, file_key
from .phi import quiet_dicom


def is_dicom_name(path: str | os.PathLike) -> bool:
    """True for ``.dcm``/``.dicom`` file names (the suffixes the 2D layouts list as DICOM)."""
    return os.fspath(path).lower().endswith(DICOM_SUFFIXES)


def patient_id_of(ds: Any) -> str | None:
    """The PatientID of a parsed dataset, stripped; ``None`` when absent or empty."""
    try:
        v = ds.get("PatientID", None)
    except Exception:
        return None
    s = str(v).strip() if v is not None else ""
    return s or None


#: Tags whose value, spelled out in a file or folder name, identifies the patient or the study.
PATH_IDENTIFIER_TAGS = ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID")


class DicomIdentity(NamedTuple):
    """What data_prep reads from a DICOM header: the PatientID (in memory only) and whether the path names an ID."""

    patient_id: str | None
    identifier_in_path: bool


def _spellings(value: str) -> set[str]:
    """A tag value as it may appear in a file name (``DOE^JANE`` -> ``DOE^JANE``, ``DOE_JANE``, ``DOE JANE`` ...)."""
    v = value.strip()
    out = {v} | {v.replace("^", sep).strip(sep) for sep in ("_", " ", "-", ".", "")}
    return {s for s in out if len(s) >= 6}  # short values (PatientID "12") would match any number in a path


def read_identity(path: str | os.PathLike) -> DicomIdentity:
    """PatientID of one DICOM file (``None`` when missing, empty or unreadable), and whether the path spells out one
    of its :data:`PATH_IDENTIFIER_TAGS` values (case-insensitive)."""
    import pydicom

    try:
        with quiet_dicom():
            ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=list(PATH_IDENTIFIER_TAGS))
            pid = patient_id_of(ds)
            text = os.fspath(path).lower()
            values = [str(ds.get(kw, "") or "") for kw in PATH_IDENTIFIER_TAGS]
    except Exception:  # unreadable files are reported (by name) by the image check
        return DicomIdentity(None, False)
    named = any(s.lower() in text for v in values if v for s in _spellings(v))
    return DicomIdentity(pid, named)


def read_identities(paths: list[Path], workers: int | None = None) -> dict[str, DicomIdentity]:
    """:func:`read_identity` of many DICOM files in a thread pool; keyed by :func:`data_prep.common.file_key`."""
    from .check import default_workers

    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        ids = list(pool.map(read_identity, paths, chunksize=8))
    return {file_key(p): i for p, i in zip(paths, ids)}
