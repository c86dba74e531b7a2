"""``nih``: NIH ChestX-ray14 / ChestX-ray8 (Wang et al. 2017) -> multi-label datalist.

``SRC/Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``) lists ``Image Index``, pipe-separated
``Finding Labels`` (14 findings or ``No Finding``), ``Patient ID``, ``Patient Age``, ``Patient Gender`` and
``View Position``. Images are found anywhere under SRC by file name (the download spreads them over
``images_001/images`` ... ``images_012/images``). The official patient-wise ``train_val_list.txt``/``test_list.txt``
are used when present; validation is always carved from train_val, grouped by patient.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..common import ID_FROM_CSV, LayoutError, Record, Scan, log
from ._csvutil import SEX_NAMES, VIEW_NAMES, parse_float, parse_sex, read_csv, view_code, warn_if_frontal_only

FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the ``nih`` subcommand."""
    p = sub.add_parser(
        "nih", parents=[common], help="NIH ChestX-ray14 Data_Entry_2017.csv (+ official train_val/test lists)",
        description="NIH ChestX-ray14: SRC/Data_Entry_2017.csv plus the PNGs anywhere under SRC -> multi-label "
                    "datalist (14 findings; 'No Finding' = all zeros unless --no-finding-label).",
        epilog="example: python -m data_prep nih ~/data/ChestXray-NIHCC --out nih/nih.json --metadata",
    )
    p.add_argument("--no-finding-label", action="store_true", help="add 'No Finding' as a 15th label")
    p.add_argument("--metadata", action="store_true",
                   help="add sex (0/1), age (years) and view (0 AP / 1 PA, the codes of chexpert's 0 AP / 1 PA / "
                        "2 LATERAL) to each entry for auxiliary tasks; NIH is frontal-only: train the view as AP vs PA "
                        "(--view_target ap_pa)")
    p.add_argument("--frontal-only", action="store_true", help="accepted for symmetry with chexpert (NIH is frontal)")
    p.add_argument("--val-count", type=int, default=None, help="images carved from train_val for validation")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction carved (default 0.1)")
    p.add_argument("--test-count", type=int, default=None, help="without test_list.txt: images carved for test")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="without test_list.txt: fraction carved for test (default 0.2)")
    p.set_defaults(scan=scan)


def _read_list(path: Path) -> set[str]:
    return {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}


def scan(args: argparse.Namespace) -> Scan:
    """Scan an NIH ChestX-ray14 folder."""
    src = Path(args.src)
    csv_path = next((src / n for n in CSV_NAMES if (src / n).is_file()), None)
    if csv_path is None:
        raise LayoutError(f"SRC {src} is not an NIH ChestX-ray folder: none of {', '.join(CSV_NAMES)} found")
    rows = read_csv(csv_path, ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender",
                               "View Position"], "nih")
    # index the PNGs once by file name
    index: dict[str, Path] = {}
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if f.lower().endswith(".png"):
                index.setdefault(f, Path(root) / f)
    train_list, test_list = src / "train_val_list.txt", src / "test_list.txt"
    official: set[str] = set()
    test_names: set[str] | None = None
    if train_list.is_file() and test_list.is_file():
        test_names = _read_list(test_list)
        train_names = _read_list(train_list)
        official = {"training", "test"}
        both = train_names & test_names
        if both:
            raise LayoutError(f"{test_list} and {train_list} share {len(both)} image(s), e.g. {sorted(both)[0]}")
    else:
        if args.test_count is None and args.test_fraction is None:
            args.test_fraction = 0.2
    if args.val_count is None and args.val_fraction is None:
        args.val_fraction = 0.1
    names = FINDINGS + (["No Finding"] if args.no_finding_label else [])
    records: list[Record] = []
    not_listed = 0
    for i, row in enumerate(rows):
        where = f"{csv_path} row {i + 2}"
        found = [t.strip() for t in row["Finding Labels"].split("|") if t.strip()]
        unknown = [t for t in found if t not in FINDINGS and t != "No Finding"]
        if unknown or not found:
            raise LayoutError(f"{where}: unknown finding label(s) {unknown or ['(empty)']}; known: "
                              f"{', '.join(FINDINGS)}, No Finding")
        if "No Finding" in found and len(found) > 1:
            raise LayoutError(f"{where}: 'No Finding' combined with findings {found}")
        label = [1 if f in found else 0 for f in FINDINGS]
        if args.no_finding_label:
            label.append(1 if "No Finding" in found else 0)
        img = row["Image Index"]
        path = index.get(img, src / "images" / img)  # a missing file is reported by the check
        split = None
        if test_names is not None:
            if img not in test_names and img not in train_names:
                not_listed += 1  # neither official list names it: leave it out rather than guess
                continue
            split = "test" if img in test_names else "training"
        meta = {}
        if args.metadata:
            meta = {"sex": parse_sex(row["Patient Gender"]), "age": parse_float(row["Patient Age"]),
                    "view": view_code(None, row["View Position"])}
        if not row["Patient ID"]:
            raise LayoutError(f"{where}: empty 'Patient ID'")
        records.append(Record(path=path.absolute(), label=label, patient=row["Patient ID"], split=split, meta=meta,
                              patient_source=ID_FROM_CSV))
    if not_listed:
        log.warning(f"nih: {not_listed} CSV row(s) are in neither train_val_list.txt nor test_list.txt and were left "
                    "out")
    extra = {"sex_names": SEX_NAMES, "view_names": VIEW_NAMES} if args.metadata else {}
    if args.metadata:
        warn_if_frontal_only(records, "nih")
    return Scan(
        layout="nih", records=records, class_names=names, task="multilabel", spatial_dims=2, modality="CXR",
        description="NIH ChestX-ray14 (Wang et al., CVPR 2017), NIH Clinical Center; cite the dataset when used",
        options={"csv": csv_path.name, "official_lists": test_names is not None,
                 "no_finding_label": args.no_finding_label, "metadata": args.metadata, "not_listed": not_listed},
        header_extra=extra, official=official,
    )
