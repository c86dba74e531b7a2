"""``volumes``: a folder of NIfTI volumes or of DICOM series (one folder per series) plus a labels CSV (3D CT/MR).

DICOM series are converted to NIfTI (``<stem>_images/<hash>.nii.gz`` next to the datalist). The converter reads only
geometry and pixel tags (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, RescaleSlope,
RescaleIntercept, pixel data) and builds the NIfTI header from scratch, so no DICOM text (PatientName, PatientID,
dates, institution ...) reaches the output. Converted files are named by a salted hash of the series folder, because
hospital exports often name folders after the patient; that salt is always a secret one (see :mod:`data_prep.phi`).
Patient grouping uses the CSV's patient column, else the DICOM PatientID tag, both salted-hashed. All slices of a
series must carry the same PatientID: a folder that mixes patients is an error (the message never shows the IDs).

Geometry: voxels are stored as (column, row, slice), with the DICOM LPS affine converted to NIfTI's RAS.

The header's ``volumes`` entry records what the training's 3D preset (``volume_preset``, docs/3d_presets.md) needs:
the orientation codes seen (nibabel axis codes, with counts), the voxel spacing per RAS axis (min/median/max, mm),
the shapes, the stored dtypes, the modality as ``mri``/``ct``/``unknown`` (``--modality``, else the DICOM Modality
tag) and a ``suggested_volume_preset``. Only geometry and types: no DICOM text reaches it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..common import ID_FROM_CSV, ID_FROM_DICOM, LayoutError, Record, Scan, log, natural_key, parse_class_map
from ..dicomtags import patient_id_of
from ..phi import SaltResolver, patient_hash, quiet_dicom, redact
from ..writer import StagingDir, gzip_deterministic
from ._csvutil import read_csv
from .tabular import SPLIT_VALUES, labels_to_ints

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the ``volumes`` subcommand."""
    p = sub.add_parser(
        "volumes", parents=[common], help="3D CT/MR: NIfTI files or DICOM series folders + labels CSV",
        description="SRC holds NIfTI files (*.nii, *.nii.gz) or one subfolder per DICOM series; a CSV maps each "
                    "file/series (its name without extension, or its relative path) to a label.",
        epilog="example: python -m data_prep volumes ~/data/mri --labels ~/data/mri_labels.csv --out mri/mri.json "
               "--id-column series --label-column diagnosis",
    )
    p.add_argument("--labels", default=None, help="labels CSV (default: SRC/labels.csv)")
    p.add_argument("--id-column", default="image", help="CSV column naming the file or series folder (default image)")
    p.add_argument("--label-column", default="label", help="CSV column with labels (default label)")
    p.add_argument("--patient-column", default=None, help="CSV column with patient IDs (default: DICOM PatientID)")
    p.add_argument("--split-column", default=None, help="optional CSV column with train/val/test")
    p.add_argument("--class-names", default=None, help="comma-separated class names in label order")
    p.add_argument("--dicom-reader", choices=("pydicom", "itk"), default="pydicom",
                   help="how DICOM series are read (itk decodes more compressed transfer syntaxes)")
    p.add_argument("--modality", default=None, help="modality (default: DICOM Modality tag, else 'unknown')")
    p.add_argument("--val-count", type=int, default=None, help="volumes carved for validation")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction for validation (default 0.1)")
    p.add_argument("--test-count", type=int, default=None, help="volumes carved for test")
    p.add_argument("--test-fraction", type=float, default=None, help="fraction for test (default 0.2)")
    p.set_defaults(scan=scan)


# ----------------------------------------------------------------------------------------------------------- DICOM
def _read_series_pydicom(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one series with pydicom; return (data[c, r, k], RAS affine, info) - info holds only non-PHI fields."""
    import pydicom

    slices = []
    with quiet_dicom():
        for f in sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                        key=lambda p: natural_key(p.name)):
            try:
                ds = pydicom.dcmread(str(f))
            except pydicom.errors.InvalidDicomError:
                continue  # not DICOM (README, DICOMDIR index ...): ignored
            if "PixelData" not in ds:
                continue
            slices.append((f, ds))
    if not slices:
        raise LayoutError(f"{folder}: no DICOM images with pixel data")
    patient = _one_patient(folder, [ds for _, ds in slices])
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(uids) > 1:
        raise LayoutError(f"{folder}: holds {len(uids)} DICOM series; put each series in its own folder")
    ds0 = slices[0][1]
    iop = np.array([float(x) for x in getattr(ds0, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ps = [float(x) for x in getattr(ds0, "PixelSpacing", [1.0, 1.0])]
    frames = int(getattr(ds0, "NumberOfFrames", 1) or 1)

    def pos(ds: Any) -> np.ndarray:
        return np.array([float(x) for x in getattr(ds, "ImagePositionPatient", [0, 0, 0])])

    try:
        if frames > 1 and len(slices) == 1:
            arr = ds0.pixel_array.astype(np.float32 if _needs_float(ds0) else ds0.pixel_array.dtype)  # (k, r, c)
            stack = arr * float(getattr(ds0, "RescaleSlope", 1) or 1) + float(getattr(ds0, "RescaleIntercept", 0) or 0)
            spacing_k = float(getattr(ds0, "SpacingBetweenSlices", getattr(ds0, "SliceThickness", 1.0)) or 1.0)
            slice_vec = normal * spacing_k
            origin = pos(ds0)
        else:
            slices.sort(key=lambda t: (float(np.dot(pos(t[1]), normal)), int(getattr(t[1], "InstanceNumber", 0) or 0)))
            planes = []
            for f, ds in slices:
                a = ds.pixel_array
                if a.ndim != 2:
                    raise LayoutError(f"{f}: expected a single-frame greyscale slice, got pixel array {a.shape}")
                slope = float(getattr(ds, "RescaleSlope", 1) or 1)
                inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
                planes.append(a.astype(np.float32) * slope + inter if (slope != 1 or inter != 0) else a)
            shapes = {p.shape for p in planes}
            if len(shapes) > 1:
                raise LayoutError(f"{folder}: slices have different sizes {sorted(shapes)}")
            stack = np.stack(planes)
            origin = pos(slices[0][1])
            if len(slices) > 1:
                slice_vec = (pos(slices[-1][1]) - origin) / (len(slices) - 1)
                if not np.any(slice_vec):
                    slice_vec = normal * float(getattr(ds0, "SliceThickness", 1.0) or 1.0)
            else:
                slice_vec = normal * float(getattr(ds0, "SliceThickness", 1.0) or 1.0)
    except LayoutError:
        raise
    except Exception as exc:  # the decoder's message may quote tag values: redact them
        raise LayoutError(f"{folder}: cannot decode the pixel data ({type(exc).__name__}: "
                          f"{redact(str(exc), ds0)}); try --dicom-reader itk") from None
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]  # column index runs along the row direction, spaced by column spacing
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = slice_vec
    lps[:3, 3] = origin
    data = np.ascontiguousarray(np.transpose(stack, (2, 1, 0)))  # (k, r, c) -> (c, r, k)
    info = {"modality": str(getattr(ds0, "Modality", "") or ""), "patient": patient}
    return data, _lps_to_ras(lps), info


def _needs_float(ds: Any) -> bool:
    return float(getattr(ds, "RescaleSlope", 1) or 1) != 1 or float(getattr(ds, "RescaleIntercept", 0) or 0) != 0


def _one_patient(folder: Path, datasets: list[Any]) -> str | None:
    """The PatientID shared by all files of a series (in memory only; hashed before any output).

    A folder whose files carry different PatientIDs mixes patients in one volume: an error that names the folder and
    the number of patients, never the IDs.
    """
    ids = {patient_id_of(ds) for ds in datasets}
    if len(ids) > 1:
        raise LayoutError(
            f"{folder}: its DICOM files belong to {len(ids)} different patients (the PatientID tags differ; values "
            "not shown). One series folder must hold one patient's series; split the folder in a copy of SRC."
        )
    return next(iter(ids))


def _lps_to_ras(lps: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_series_itk(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read one series with ITK (GDCM); only the pixel array and geometry are kept."""
    import itk

    try:
        img = itk.imread(str(folder))
    except Exception as exc:
        raise LayoutError(f"{folder}: ITK cannot read this DICOM series ({type(exc).__name__}: {exc})") from exc
    arr = itk.array_from_image(img)  # (k, r, c)
    if arr.ndim == 2:
        arr = arr[None]
    spacing = np.array(list(img.GetSpacing()), dtype=float)
    origin = np.array(list(img.GetOrigin()), dtype=float)
    direction = np.array(itk.array_from_matrix(img.GetDirection()), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(spacing)
    lps[:3, 3] = origin
    data = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
    # the PatientID for grouping is read with pydicom (ITK's metadata dictionary is not kept), from every file
    import pydicom

    headers = []
    with quiet_dicom():
        for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                headers.append(pydicom.dcmread(str(f), stop_before_pixels=True))
            except Exception:
                continue  # not DICOM: ITK ignored it too
    modality = str(getattr(headers[0], "Modality", "") or "") if headers else ""
    info: dict[str, Any] = {"modality": modality, "patient": _one_patient(folder, headers) if headers else None}
    return data, _lps_to_ras(lps), info


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 with a fresh header: geometry and data only, no text from the source."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b""
    img.header["aux_file"] = b""
    img.header["intent_name"] = b""
    img.header["db_name"] = b""
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return gzip_deterministic(img.to_bytes())


#: ``--modality`` / DICOM Modality values -> the ``volume_preset`` family.
_MODALITY_FAMILY = {"mr": "mri", "mri": "mri", "ct": "ct"}


def preset_modality(modality: str | None) -> str:
    """``mri``, ``ct`` or ``unknown`` from a ``--modality`` value or DICOM Modality tag(s) such as ``MR`` or ``CT``."""
    families = {_MODALITY_FAMILY.get(m.strip().lower(), "unknown") for m in str(modality or "").split("/") if m.strip()}
    return families.pop() if len(families) == 1 else "unknown"


def geometry_of(affine: np.ndarray, shape: tuple[int, ...], dtype: Any) -> dict[str, Any]:
    """One volume's orientation codes, voxel spacing (mm) and shape per RAS axis, and stored dtype."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)
    spacing, size = [0.0, 0.0, 0.0], [1, 1, 1]
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        if not np.isnan(world_axis):
            spacing[int(world_axis)] = float(zooms[voxel_axis])
            size[int(world_axis)] = int(shape[voxel_axis]) if voxel_axis < len(shape) else 1
    return {"orientation": "".join(str(c) for c in nib.aff2axcodes(affine)), "spacing": spacing, "shape": size,
            "dtype": np.dtype(dtype).name}


def _nifti_geometry(path: Path) -> dict[str, Any] | None:
    """Geometry of a NIfTI file from its header alone (no voxel data is read); None for an unreadable header (the
    file check reports the file, and ``--drop-bad`` can drop it)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return geometry_of(img.affine, img.shape, img.get_data_dtype())
    except Exception:
        return None


def volume_summary(geometries: list[dict[str, Any]], modality: str) -> dict[str, Any]:
    """The header's ``volumes`` entry: what ``volume_preset`` needs, summed over a dataset's volumes."""
    from collections import Counter

    family = preset_modality(modality)
    spacing = np.array([g["spacing"] for g in geometries], dtype=float).reshape(-1, 3)
    shapes = np.array([g["shape"] for g in geometries], dtype=float).reshape(-1, 3)

    def stats(a: np.ndarray, digits: int) -> dict[str, list[float]]:
        if not len(a):
            return {"min": [], "median": [], "max": []}
        def num(v: float) -> float | int:
            r = round(float(v), digits)
            return int(r) if digits <= 1 and r.is_integer() else r

        return {k: [num(v) for v in f(a, axis=0)] for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}

    return {
        "modality": family,
        "orientations": dict(sorted(Counter(g["orientation"] for g in geometries).items())),
        "spacing_mm": stats(spacing, 4),  # per RAS axis: the axes volume_preset resamples after reorienting
        "shape": stats(shapes, 1),  # voxels per RAS axis
        "dtypes": dict(sorted(Counter(g["dtype"] for g in geometries).items())),
        "suggested_volume_preset": family if family in ("mri", "ct") else "none",
    }


def _is_dicom_folder(folder: Path) -> bool:
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM" or f.name.lower().endswith(".dcm"):
                return True
    return False


def _strip(name: str) -> str:
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def scan(args: argparse.Namespace) -> Scan:
    """Scan NIfTI files or DICOM series folders plus a labels CSV."""
    src = Path(args.src)
    if not src.is_dir():
        raise LayoutError(f"SRC {src} is not a folder of NIfTI files or DICOM series folders")
    labels_csv = Path(args.labels) if args.labels else src / "labels.csv"
    required = [args.id_column, args.label_column] + [c for c in (args.patient_column, args.split_column) if c]
    rows = read_csv(labels_csv, required, "volumes --labels")
    niftis = sorted((p for p in src.rglob("*") if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)
                     and not any(part.startswith(".") for part in p.relative_to(src).parts)),
                    key=lambda p: natural_key(str(p)))
    series = []
    if not niftis:
        series = sorted((d for d in src.rglob("*") if d.is_dir() and not any(
            part.startswith(".") for part in d.relative_to(src).parts) and _is_dicom_folder(d)),
            key=lambda p: natural_key(str(p)))
    if not niftis and not series:
        raise LayoutError(f"SRC {src} is not a volumes layout: no *.nii/*.nii.gz files and no folders of DICOM files")
    # ids: relative path without extension, and bare name without extension
    items: dict[str, Path] = {}
    for p in niftis or series:
        rel = p.relative_to(src).as_posix()
        for key in {_strip(rel), _strip(p.name), rel, p.name}:
            items.setdefault(key, p)
    ids = [r[args.id_column] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise LayoutError(f"{labels_csv}: column '{args.id_column}' lists {dup[0]!r} more than once")
    missing = [i for i in ids if i not in items]
    if missing:
        raise LayoutError(f"{labels_csv}: {len(missing)} id(s) in column '{args.id_column}' match no file or series "
                          f"folder in {src}, e.g. {missing[0]!r}")
    used = {items[i] for i in ids}
    unlabeled = [p for p in (niftis or series) if p not in used]
    if unlabeled:
        # DICOM series folders are often named after the patient: name only NIfTI files in this log line
        example = (f", e.g. {unlabeled[0].relative_to(src)}"
                   if niftis and not getattr(args, "pseudonymize_paths", False) else "")
        log.warning(f"volumes: {len(unlabeled)} volume(s) have no row in {labels_csv.name} and are left out{example}")
    labels, names = labels_to_ints([r[args.label_column] for r in rows], parse_class_map(args.class_names),
                                   str(labels_csv), args.label_column)
    out = Path(args.out).absolute()
    # converted series are named by a salted hash of their folder (often the patient's name): a secret salt
    resolver = getattr(args, "salt_resolver", None) or SaltResolver(args.salt, out_dir=out.parent, src_root=src)
    salt = resolver.get(need_secret=True).value if series else None
    staging = StagingDir(out.parent / f"{out.stem}_images") if series else None
    modalities: set[str] = set()
    geometries: list[dict[str, Any]] = []
    official: set[str] = set()
    records: list[Record] = []
    try:
        from tqdm.auto import tqdm

        for i, (row, lab) in enumerate(tqdm(list(zip(rows, labels)), desc="volumes", unit="vol",
                                            disable=not args.progress, leave=False)):
            p = items[row[args.id_column]]
            patient = row[args.patient_column] if args.patient_column and row[args.patient_column] else None
            source = ID_FROM_CSV if patient is not None else None
            split = None
            if args.split_column:
                v = row[args.split_column].lower()
                if v not in SPLIT_VALUES:
                    raise LayoutError(f"{labels_csv} row {i + 2}: '{args.split_column}' is {v!r}; use train/val/test")
                split = SPLIT_VALUES[v]
                official.add(split)
            if staging is None:
                geometry = _nifti_geometry(p)
                if geometry is not None:
                    geometries.append(geometry)
                records.append(Record(path=p.absolute(), label=lab, patient=patient, split=split,
                                      patient_source=source))
                continue
            reader = _read_series_itk if args.dicom_reader == "itk" else _read_series_pydicom
            data, affine, info = reader(p)
            geometries.append(geometry_of(affine, data.shape, data.dtype))
            if info["modality"]:
                modalities.add(info["modality"])
            name = "series_" + patient_hash(p.relative_to(src).as_posix(), salt) + ".nii.gz"
            (staging.path / name).write_bytes(nifti_bytes(data, affine))
            if patient is None and info["patient"] is not None:
                patient, source = info["patient"], ID_FROM_DICOM
            records.append(Record(path=staging.final / name, read_path=staging.path / name, label=lab,
                                  patient=patient, split=split, patient_source=source))
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    if "test" not in official and args.test_count is None and args.test_fraction is None:
        args.test_fraction = 0.2
    if "validation" not in official and args.val_count is None and args.val_fraction is None:
        args.val_fraction = 0.1
    modality = args.modality or ("/".join(sorted(modalities)) if modalities else "unknown")
    summary = volume_summary(geometries, modality)
    sp = summary["spacing_mm"]
    log.info(f"volumes: {len(geometries)} {summary['modality'].upper()} volume(s), orientations "
             f"{summary['orientations']}, spacing (RAS, mm) min {sp['min']} median {sp['median']} max {sp['max']}, "
             f"dtypes {summary['dtypes']}")
    if summary["modality"] == "unknown":
        log.info("volumes: modality unknown: pass --modality MR or --modality CT to record the 3D preset to train with "
                 "(--volume_preset mri | ct; docs/3d_presets.md)")
    else:
        log.info(f"volumes: suggested preset: train with --volume_preset {summary['suggested_volume_preset']} "
                 "(reorient to RAS, resample, normalise, crop; docs/3d_presets.md); recorded in the header's `volumes`")
    return Scan(
        layout="volumes", records=records, class_names=names, task="binary" if len(names) == 2 else "multiclass",
        spatial_dims=3, modality=modality,
        description=f"3D volumes ({'DICOM series converted to NIfTI' if series else 'NIfTI'}) labelled by "
                    f"{'a CSV' if getattr(args, 'pseudonymize_paths', False) else labels_csv.name}",
        options={"labels": labels_csv.name, "id_column": args.id_column, "label_column": args.label_column,
                 "patient_column": args.patient_column, "split_column": args.split_column,
                 "class_names": args.class_names, "source_format": "dicom" if series else "nifti",
                 "dicom_reader": args.dicom_reader if series else None},
        header_extra={"volumes": summary}, staging=staging, official=official,
    )
