"""``kermany`` and ``oct2017``: ``SRC/{train,test[,val]}/<CLASS>/*.jpeg`` from Kermany et al. (Mendeley v2).

Kermany pediatric chest X-ray: NORMAL / PNEUMONIA, with bacteria/virus and the patient in the file names:
``personN_bacteria_M.jpeg``, ``personN_virus_M.jpeg`` (patient ``personN``), ``IM-XXXX-YYYY.jpeg`` (patient
``IM-XXXX``), ``NORMAL2-IM-XXXX-YYYY.jpeg`` (patient ``NORMAL2-IM-XXXX``).
``--metadata`` adds ``pathogen`` to every Kermany entry (0 NORMAL, 1 BACTERIA, 2 VIRUS, from the folder and the file
name; null for a pneumonia file whose name says neither) and ``pathogen_names`` to the header: an auxiliary target
for seed 004's multi-task fine-tuning (``bundle/configs/multitask.yaml``). The main label and the splits do not
change (validation is stratified by NORMAL/BACTERIA/VIRUS with or without it). It is almost the main label
(PNEUMONIA = BACTERIA or VIRUS): only the bacteria-vs-virus split is information the binary label lacks.
OCT2017: CNV / DME / DRUSEN / NORMAL with ``CLASS-PATIENT-N.jpeg`` names (patient = the middle number, which is
shared across classes: one patient can have a CNV scan and a NORMAL scan).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..common import LayoutError, Record, Scan, log
from ._split_folders import scan_split_tree
from .tabular import add_dicom_patients

#: ``pathogen`` codes of ``--metadata`` (also the classes of ``--classes 3``)
PATHOGEN_NAMES = {"0": "NORMAL", "1": "BACTERIA", "2": "VIRUS"}

KERMANY_PATTERNS = [
    re.compile(r"^(?P<patient>person\d+)_(?P<kind>bacteria|virus)_\d+(?:_\d+)?\.jpe?g$", re.I),
    re.compile(r"^(?P<patient>NORMAL\d*-IM-\d+)-\d+(?:-\d+)?\.jpe?g$", re.I),
    re.compile(r"^(?P<patient>IM-\d+)-\d+(?:-\d+)?\.jpe?g$", re.I),
]
OCT_PATTERN = re.compile(r"^(?P<cls>CNV|DME|DRUSEN|NORMAL)-(?P<patient>\d+)-\d+\.jpe?g$", re.I)


def add_split_options(p: argparse.ArgumentParser, default_val: str) -> None:
    """Options about the official val/ folder and the carved validation split."""
    p.add_argument("--val-count", type=int, default=None,
                   help=f"images carved from train/ for validation (exact; patient-grouped). {default_val}")
    p.add_argument("--val-fraction", type=float, default=None, help="alternatively, a fraction of train/")
    p.add_argument("--official-val", choices=("merge", "keep", "drop"), default="merge",
                   help="what to do with an official val/ folder when present: merge it into the training pool "
                        "before carving (default; Kermany's has only 16 images), keep it as the validation split "
                        "(no carving), or leave it out (recorded in the header)")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the ``kermany`` and ``oct2017`` subcommands."""
    p = sub.add_parser(
        "kermany", parents=[common], help="Kermany pediatric chest X-ray (NORMAL/PNEUMONIA folders)",
        description="Kermany chest X-ray: SRC/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg -> datalist. The official "
                    "test/ folder stays the test split; validation is carved from train/.",
        epilog="example: python -m data_prep kermany ~/data/chest_xray --out kermany/kermany.json --val-count 262",
    )
    p.add_argument("--classes", type=int, choices=(2, 3), default=2,
                   help="2: NORMAL/PNEUMONIA (default); 3: NORMAL/BACTERIA/VIRUS from the file names")
    p.add_argument("--metadata", action="store_true",
                   help="add `pathogen` (0 normal, 1 bacteria, 2 virus, from the file names) to each entry as an "
                        "auxiliary target; the label and the splits stay as they are")
    add_split_options(p, "Default: 262, the FFCL paper's choice.")
    p.set_defaults(scan=scan_kermany, default_val_count=262)

    q = sub.add_parser(
        "oct2017", parents=[common], help="Kermany OCT2017 retinal OCT (CNV/DME/DRUSEN/NORMAL folders)",
        description="OCT2017: SRC/{train,test[,val]}/{CNV,DME,DRUSEN,NORMAL}/*.jpeg -> 4-class datalist.",
        epilog="example: python -m data_prep oct2017 ~/data/OCT2017 --out oct/oct.json --val-fraction 0.05",
    )
    add_split_options(q, "Default: --val-fraction 0.05.")
    q.set_defaults(scan=scan_oct, default_val_fraction=0.05)


def _official(args: argparse.Namespace, items, splits) -> tuple[list, set[str]]:
    official = {"training"} | ({"test"} if "test" in splits else set())
    if "validation" in splits:
        if args.official_val == "keep":
            official.add("validation")
        elif args.official_val == "drop":
            items = [it for it in items if it[0] != "validation"]
        else:
            items = [(("training" if s == "validation" else s), c, f) for s, c, f in items]
    elif args.official_val == "keep":
        raise LayoutError("--official-val keep was given but SRC has no val/ folder")
    return items, official


def _apply_default_val(args: argparse.Namespace, official: set[str]) -> None:
    if "validation" in official:
        return
    if args.val_count is None and args.val_fraction is None:
        if getattr(args, "default_val_count", None) is not None:
            args.val_count = args.default_val_count
        elif getattr(args, "default_val_fraction", None) is not None:
            args.val_fraction = args.default_val_fraction


def scan_kermany(args: argparse.Namespace) -> Scan:
    """Scan a Kermany chest X-ray tree."""
    src = Path(args.src)
    items, splits, _ = scan_split_tree(
        src, ["NORMAL", "PNEUMONIA"], "kermany", "SRC/train/{NORMAL,PNEUMONIA}/*.jpeg (plus test/ and val/ if present)"
    )
    items, official = _official(args, items, splits)
    _apply_default_val(args, official)
    metadata = bool(getattr(args, "metadata", False))
    records: list[Record] = []
    for split, cname, f in items:
        m = next((pat.match(f.name) for pat in KERMANY_PATTERNS if pat.match(f.name)), None)
        kind = (m.group("kind").lower() if m and "kind" in m.groupdict() and m.group("kind") else None)
        if cname == "NORMAL":
            sub = 0
        elif kind is None:
            sub = None
        else:
            sub = 1 if kind == "bacteria" else 2
        if args.classes == 3 and sub is None:
            raise LayoutError(
                f"{f}: cannot tell bacteria from virus (expected personN_bacteria_M.jpeg or personN_virus_M.jpeg); "
                "use --classes 2 or rename the file in a copy of SRC"
            )
        label = (0 if cname == "NORMAL" else 1) if args.classes == 2 else sub
        meta = {"pathogen": sub} if metadata else {}
        records.append(Record(path=f.absolute(), label=label, patient=m.group("patient").lower() if m else None,
                              split=split, stratum=sub if sub is not None else label, meta=meta))
    # DICOM exports are named by UIDs, not like Kermany's files: their PatientID tag groups them (held in memory only)
    add_dicom_patients(records, args, src)
    unknown = [str(r.path) for r in records if r.patient is None]
    if unknown:
        log.warning(f"kermany: {len(unknown)} file name(s) without a recognisable patient ID; each is treated as its "
                    f"own patient, e.g. {unknown[0]}")
    names = ["NORMAL", "PNEUMONIA"] if args.classes == 2 else ["NORMAL", "BACTERIA", "VIRUS"]
    extra: dict = {}
    if metadata:
        extra["pathogen_names"] = dict(PATHOGEN_NAMES)
        unnamed = sum(1 for r in records if r.meta["pathogen"] is None)
        if unnamed:
            log.warning(f"kermany --metadata: {unnamed} PNEUMONIA file name(s) say neither bacteria nor virus; their "
                        "`pathogen` is null (masked out of an auxiliary loss)")
        if args.classes == 3:
            log.warning("kermany --metadata with --classes 3: `pathogen` equals the label; as an auxiliary target it "
                        "would only repeat it")
    return Scan(
        layout="kermany", records=records, class_names=names,
        task="binary" if args.classes == 2 else "multiclass", spatial_dims=2, modality="CXR",
        description="Kermany pediatric chest X-ray (Kermany, Zhang, Goldbaum, Mendeley Data v2, "
                    "doi:10.17632/rscbjbr9sj.2, CC BY 4.0)",
        options={"classes": args.classes, "official_val": args.official_val, "metadata": metadata,
                 "stratified_by": "NORMAL/BACTERIA/VIRUS", "unrecognised_patient_ids": len(unknown)},
        header_extra=extra, official=official,
    )


def scan_oct(args: argparse.Namespace) -> Scan:
    """Scan a Kermany OCT2017 tree."""
    src = Path(args.src)
    classes = ["CNV", "DME", "DRUSEN", "NORMAL"]
    items, splits, _ = scan_split_tree(src, classes, "oct2017", "SRC/train/{CNV,DME,DRUSEN,NORMAL}/*.jpeg")
    items, official = _official(args, items, splits)
    _apply_default_val(args, official)
    records: list[Record] = []
    for split, cname, f in items:
        m = OCT_PATTERN.match(f.name)
        if m is not None and m.group("cls").upper() != cname.upper():
            raise LayoutError(f"{f}: file name says {m.group('cls')} but it is in the {cname} folder")
        records.append(Record(path=f.absolute(), label=classes.index(cname),
                              patient=m.group("patient") if m else None, split=split))
    add_dicom_patients(records, args, src)  # DICOM exports: the PatientID tag, as in the kermany layout
    unknown = sum(r.patient is None for r in records)
    if unknown:
        log.warning(f"oct2017: {unknown} file name(s) without a recognisable patient ID (CLASS-PATIENT-N.jpeg); each "
                    "is treated as its own patient")
    return Scan(
        layout="oct2017", records=records, class_names=classes, task="multiclass", spatial_dims=2, modality="OCT",
        description="Retinal OCT2017 (Kermany, Zhang, Goldbaum, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, "
                    "CC BY 4.0)",
        options={"official_val": args.official_val, "unrecognised_patient_ids": unknown},
        official=official,
    )
