"""``folder`` (class-per-subfolder) and ``csv`` (path,label columns): generic layouts for any image type.

``folder``: ``SRC/<CLASS>/**/<image>`` or, with official splits, ``SRC/{train,val,test}/<CLASS>/**/<image>``.
``csv``: SRC is a CSV file with a path column (relative to the CSV's folder, or absolute) and a label column; an
optional patient column groups images and an optional split column gives official splits.

Images may be PNG/JPEG/BMP/TIFF, DICOM (``.dcm``) or NIfTI; one datalist must not mix 2D and 3D (the check says so).

Patients: ``--patient-regex`` (folder) or ``--patient-column`` (csv) when given; DICOM files without such an ID are
grouped by their PatientID tag (read with ``stop_before_pixels``, held in memory only). Without any patient identity
the split is image-level, which the pipeline announces and records as ``"grouping": "image"``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..common import (
    ID_FROM_CSV, ID_FROM_DICOM, ID_FROM_NAME, LayoutError, Record, Scan, list_files, log, parse_class_map, relpath,
)
from ..dicomtags import is_dicom_name, read_identities
from ._csvutil import read_csv
from ._split_folders import find_split_dirs, scan_split_tree

SPLIT_VALUES = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
                "validation": "validation", "test": "test", "testing": "test"}


def _split_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-count", type=int, default=None, help="images carved from training for validation")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction carved for validation (default 0.1)")
    p.add_argument("--test-count", type=int, default=None, help="images carved for test (no official test)")
    p.add_argument("--test-fraction", type=float, default=None, help="fraction carved for test (default 0.2)")
    p.add_argument("--modality", default="unknown", help="modality string for the header")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None,
                   help="2 or 3 (default: 3 for NIfTI files, else 2)")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the ``folder`` and ``csv`` subcommands."""
    p = sub.add_parser(
        "folder", parents=[common], help="class-per-subfolder tree (optionally under train/val/test)",
        description="SRC/<CLASS>/... or SRC/{train,val,test}/<CLASS>/... -> datalist; classes are the folder names "
                    "in sorted order unless --class-names gives the order.",
        epilog="example: python -m data_prep folder ~/data/skin --out skin/skin.json --patient-regex '^(P\\d+)_'",
    )
    p.add_argument("--class-names", default=None, help="comma-separated class folder names, in label order")
    p.add_argument("--patient-regex", default=None,
                   help="regular expression applied to the file name; its first group is the patient ID")
    _split_opts(p)
    p.set_defaults(scan=scan_folder)

    q = sub.add_parser(
        "csv", parents=[common], help="CSV with a path column and a label column",
        description="SRC is a CSV; image paths are relative to the CSV's folder (or absolute). Labels may be ints "
                    "0..K-1 or class names.",
        epilog="example: python -m data_prep csv ~/data/labels.csv --out ds/ds.json --path-column file "
               "--label-column diagnosis --patient-column patient_id",
    )
    q.add_argument("--path-column", default="image", help="column with image paths (default: image)")
    q.add_argument("--label-column", default="label", help="column with labels (default: label)")
    q.add_argument("--patient-column", default=None, help="optional column with patient IDs (hashed)")
    q.add_argument("--split-column", default=None, help="optional column with train/val/test")
    q.add_argument("--class-names", default=None,
                   help="comma-separated class names in label order (required to accept names absent from the CSV)")
    _split_opts(q)
    q.set_defaults(scan=scan_csv)


def _dims(paths: list[Path], override: int | None) -> int:
    if override:
        return override
    return 3 if any(p.name.lower().endswith((".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")) for p in paths) else 2


def add_dicom_patients(records: list[Record], args: argparse.Namespace, src: Path) -> int:
    """Give DICOM records without a patient ID the PatientID tag of their file; return how many got one.

    Also warns when DICOM file or folder names spell out an identifier of the file (PatientID, PatientName, UIDs,
    AccessionNumber): without ``--pseudonymize-paths`` the datalist would carry it.
    """
    dicom = [r for r in records if is_dicom_name(r.path)]
    ids = read_identities([r.path for r in dicom], getattr(args, "workers", None))
    n = 0
    for r in dicom:
        ident = ids.get(str(r.path))
        if r.patient is None and ident is not None and ident.patient_id is not None:
            r.patient, r.patient_source = ident.patient_id, ID_FROM_DICOM
            n += 1
    named = [r.path for r in dicom if ids.get(str(r.path)) and ids[str(r.path)].identifier_in_path]
    if named and not getattr(args, "pseudonymize_paths", False):
        log.warning(
            f"{len(named)} DICOM file(s) have one of their own identifiers (PatientID, PatientName, a UID or the "
            f"AccessionNumber) in their file or folder name, e.g. {relpath(named[0], src)}; the datalist would carry "
            "it. Re-run with --pseudonymize-paths (see data_prep/README.md)."
        )
    return n


def _source_name(args: argparse.Namespace, src: Path) -> str:
    """SRC's name for the header description, unless paths are pseudonymised (the name may carry a patient's)."""
    return "SRC" if getattr(args, "pseudonymize_paths", False) else src.name


def _defaults(args: argparse.Namespace, official: set[str]) -> None:
    if "test" not in official and args.test_count is None and args.test_fraction is None:
        args.test_fraction = 0.2
    if "validation" not in official and args.val_count is None and args.val_fraction is None:
        args.val_fraction = 0.1


def scan_folder(args: argparse.Namespace) -> Scan:
    """Scan a class-per-subfolder tree."""
    src = Path(args.src)
    if not src.is_dir():
        raise LayoutError(f"SRC {src} is not a folder")
    given = parse_class_map(args.class_names)
    rx = re.compile(args.patient_regex) if args.patient_regex else None
    if rx is not None and rx.groups < 1:
        raise LayoutError(f"--patient-regex {args.patient_regex!r} needs a capturing group, e.g. '^(P\\d+)_'")
    splits = find_split_dirs(src)
    if splits:
        items, _, names = scan_split_tree(src, given, "folder", "SRC/{train,val,test}/<CLASS>/<images>")
        official = set(splits)
    else:
        cdirs = {p.name: p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith((".", "__"))}
        if not cdirs:
            raise LayoutError(f"SRC {src} is not a folder layout: expected one subfolder per class, found none")
        names = given or sorted(cdirs)
        missing = [n for n in names if n not in cdirs]
        extra = [n for n in cdirs if n not in names]
        if missing or extra:
            raise LayoutError(f"--class-names {names} do not match the class folders {sorted(cdirs)} in {src}")
        items = [(None, n, f) for n in names for f in list_files(cdirs[n])]
        official = set()
    _defaults(args, official)
    records = []
    for split, cname, f in items:
        pid = None
        if rx is not None:
            m = rx.search(f.name)
            pid = m.group(1) if m else None
        records.append(Record(path=f.absolute(), label=names.index(cname), patient=pid, split=split,
                              patient_source=ID_FROM_NAME if pid is not None else None))
    empty = [n for n in names if not any(it[1] == n for it in items)]
    if empty:
        raise LayoutError(f"class folder(s) {', '.join(empty)} contain no images")
    n_dicom = add_dicom_patients(records, args, src)
    return Scan(
        layout="folder", records=records, class_names=list(names),
        task="binary" if len(names) == 2 else "multiclass",
        spatial_dims=_dims([it[2] for it in items], args.spatial_dims), modality=args.modality,
        description=f"class-per-folder images from {_source_name(args, src)}",
        options={"class_names": args.class_names, "patient_regex": args.patient_regex,
                 "dicom_patient_ids": n_dicom},
        official=official,
    )


def labels_to_ints(values: list[str], given: list[str] | None, where: str, column: str) -> tuple[list[int], list[str]]:
    """Map CSV label cells to ints. Integers 0..K-1 stay; names map to ``given`` order or sorted order."""
    if given is not None:
        unknown = sorted({v for v in values if v not in given and not (v.isdigit() and int(v) < len(given))})
        if unknown:
            raise LayoutError(f"{where}: column '{column}' has unknown label value(s) {unknown[:10]}; "
                              f"--class-names lists {given}")
        return [given.index(v) if v in given else int(v) for v in values], given
    if all(re.fullmatch(r"\d+", v) for v in values):
        ints = [int(v) for v in values]
        return ints, [str(i) for i in range(max(ints) + 1)]
    if any(v == "" for v in values):
        raise LayoutError(f"{where}: column '{column}' has empty label cell(s)")
    names = sorted(set(values))
    return [names.index(v) for v in values], names


def scan_csv(args: argparse.Namespace) -> Scan:
    """Scan a CSV of paths and labels."""
    src = Path(args.src)
    if not src.is_file():
        raise LayoutError(f"SRC {src} is not a CSV file")
    required = [args.path_column, args.label_column] + [c for c in (args.patient_column, args.split_column) if c]
    rows = read_csv(src, required, "csv")
    if not rows:
        raise LayoutError(f"{src} has no rows")
    labels, names = labels_to_ints([r[args.label_column] for r in rows], parse_class_map(args.class_names),
                                   str(src), args.label_column)
    official: set[str] = set()
    records = []
    for i, (row, lab) in enumerate(zip(rows, labels)):
        p = Path(row[args.path_column])
        if not row[args.path_column]:
            raise LayoutError(f"{src} row {i + 2}: empty '{args.path_column}'")
        path = p if p.is_absolute() else src.parent / p
        split = None
        if args.split_column:
            v = row[args.split_column].lower()
            if v not in SPLIT_VALUES:
                raise LayoutError(f"{src} row {i + 2}: column '{args.split_column}' has {v!r}; use train/val/test")
            split = SPLIT_VALUES[v]
            official.add(split)
        pid = row[args.patient_column] if args.patient_column and row[args.patient_column] else None
        records.append(Record(path=path.absolute(), label=lab, patient=pid, split=split,
                              patient_source=ID_FROM_CSV if pid is not None else None))
    n_dicom = add_dicom_patients(records, args, src if src.is_dir() else src.parent)
    _defaults(args, official)
    return Scan(
        layout="csv", records=records, class_names=names, task="binary" if len(names) == 2 else "multiclass",
        spatial_dims=_dims([r.path for r in records], args.spatial_dims), modality=args.modality,
        description=f"images listed in {_source_name(args, src)}",
        options={"path_column": args.path_column, "label_column": args.label_column,
                 "patient_column": args.patient_column, "split_column": args.split_column,
                 "class_names": args.class_names, "dicom_patient_ids": n_dicom},
        official=official,
    )
