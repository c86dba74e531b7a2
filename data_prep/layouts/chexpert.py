"""``chexpert``: CheXpert ``train.csv``/``valid.csv`` (Irvin et al. 2019) -> multi-label datalist.

Labels: the 14 observations, each 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned, read as 0).
Uncertainty policies (``--uncertain``), as in the CheXpert paper:

* ``ignore`` (U-Ignore): uncertain -> -1 in ``label`` and 0 in ``label_mask``; losses and metrics skip it.
* ``ones`` (U-Ones) / ``zeros`` (U-Zeros): uncertain -> 1 / 0.
* ``class`` (U-MultiClass): uncertainty becomes its own output. ``label`` has 28 entries: the 14 observations
  (1 = positive) followed by 14 "<observation> (uncertain)" flags, so a plain multi-label BCE head can learn it.

``--metadata`` adds ``sex`` (0 female / 1 male), ``age`` (years) and ``view`` (0 AP / 1 PA / 2 LATERAL, shared with
the nih layout) to each entry, null when unknown. The view keeps all three; the training configs pick seed 004's
frontal-vs-lateral target (default), AP vs PA or all three from it with ``view_target``.

``valid.csv`` (radiologist consensus labels, 234 images) becomes the test split by default (``--valid-as``), and a
patient-grouped validation split is carved from ``train.csv``. Patient IDs come from ``patientNNNNN`` in the path.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..common import LayoutError, Record, Scan
from ._csvutil import SEX_NAMES, VIEW_NAMES, parse_float, parse_sex, read_csv, view_code, warn_if_frontal_only

OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
]
PATIENT_RE = re.compile(r"(patient\d+)", re.I)


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the ``chexpert`` subcommand."""
    p = sub.add_parser(
        "chexpert", parents=[common], help="CheXpert train.csv/valid.csv (14 observations, uncertainty policy)",
        description="CheXpert (SRC holds train.csv and valid.csv; image paths in the CSV are resolved against SRC and "
                    "its parent) -> multi-label datalist.",
        epilog="example: python -m data_prep chexpert ~/data/CheXpert-v1.0-small --out chexpert/u_ignore.json "
               "--uncertain ignore --metadata",
    )
    p.add_argument("--uncertain", choices=("ignore", "ones", "zeros", "class"), default="ignore",
                   help="uncertain (-1) labels: ignore = mask out of the loss (default), ones, zeros, or class "
                        "(extra 'uncertain' outputs)")
    p.add_argument("--frontal-only", action="store_true", help="keep frontal views only")
    p.add_argument("--metadata", action="store_true",
                   help="add sex (0/1), age (years) and view (0 AP / 1 PA / 2 LATERAL) to each entry for auxiliary "
                        "tasks; the training configs' view_target picks frontal vs lateral (default), AP vs PA or all "
                        "three")
    p.add_argument("--valid-as", choices=("test", "validation"), default="test",
                   help="split that valid.csv becomes (default test; validation is then carved from train.csv)")
    p.add_argument("--val-count", type=int, default=None, help="images carved from train.csv for validation")
    p.add_argument("--val-fraction", type=float, default=None, help="fraction carved (default 0.05 when carving)")
    p.set_defaults(scan=scan)


def _resolve(src: Path, rel: str) -> Path:
    """CSV paths start with the dataset folder name (``CheXpert-v1.0-small/train/...``); try the usual anchors."""
    rel_p = Path(rel)
    for cand in (src / rel_p, src.parent / rel_p, src / Path(*rel_p.parts[1:]) if len(rel_p.parts) > 1 else None):
        if cand is not None and cand.exists():
            return cand.absolute()
    return (src.parent / rel_p).absolute()  # reported as missing by the file check


def encode_labels(values: list[str], policy: str, where: str) -> list[int]:
    """Map raw CheXpert cells (``'1.0'``, ``'0'``, ``'-1'``, blank) to a label vector under a policy."""
    raw: list[int] = []
    for name, v in zip(OBSERVATIONS, values):
        v = v.strip()
        if v == "":
            raw.append(0)
            continue
        try:
            f = float(v)
        except ValueError:
            raise LayoutError(f"{where}: column '{name}' has value {v!r}; expected 1, 0, -1 or blank") from None
        if f not in (1.0, 0.0, -1.0):
            raise LayoutError(f"{where}: column '{name}' has value {v!r}; expected 1, 0, -1 or blank")
        raw.append(int(f))
    if policy == "ignore":
        return raw
    if policy == "ones":
        return [1 if x == -1 else x for x in raw]
    if policy == "zeros":
        return [0 if x == -1 else x for x in raw]
    return [1 if x == 1 else 0 for x in raw] + [1 if x == -1 else 0 for x in raw]


def scan(args: argparse.Namespace) -> Scan:
    """Scan a CheXpert folder."""
    src = Path(args.src)
    if not (src / "train.csv").is_file():
        raise LayoutError(f"SRC {src} is not a CheXpert folder: train.csv not found (expected SRC/train.csv and "
                          "SRC/valid.csv, as in CheXpert-v1.0-small/)")
    required = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    sources = [("train.csv", "training")]
    if (src / "valid.csv").is_file():
        sources.append(("valid.csv", args.valid_as))
    official = {s for _, s in sources}
    if "validation" not in official and args.val_count is None and args.val_fraction is None:
        args.val_fraction = 0.05
    records: list[Record] = []
    n_lateral = 0
    for fname, split in sources:
        rows = read_csv(src / fname, required, "chexpert")
        for i, row in enumerate(rows):
            where = f"{src / fname} row {i + 2}"
            fl = row["Frontal/Lateral"]
            if args.frontal_only and fl.lower() != "frontal":
                n_lateral += 1
                continue
            m = PATIENT_RE.search(row["Path"])
            if m is None:
                raise LayoutError(f"{where}: no patientNNNNN in Path {row['Path']!r}; cannot group by patient")
            label = encode_labels([row[c] for c in OBSERVATIONS], args.uncertain, where)
            meta = {}
            if args.metadata:
                meta = {"sex": parse_sex(row["Sex"]), "age": parse_float(row["Age"]),
                        "view": view_code(fl, row["AP/PA"])}
            records.append(Record(path=_resolve(src, row["Path"]), label=label, patient=m.group(1).lower(),
                                  split=split, meta=meta))
    names = list(OBSERVATIONS)
    if args.uncertain == "class":
        names += [f"{n} (uncertain)" for n in OBSERVATIONS]
    extra = {"sex_names": SEX_NAMES, "view_names": VIEW_NAMES} if args.metadata else {}
    if args.metadata:
        warn_if_frontal_only(records, "chexpert")
    extra["uncertain_policy"] = args.uncertain
    return Scan(
        layout="chexpert", records=records, class_names=names, task="multilabel", spatial_dims=2, modality="CXR",
        description="CheXpert (Irvin et al., AAAI 2019), Stanford ML Group; CheXpert Dataset Research Use Agreement",
        options={"uncertain": args.uncertain, "frontal_only": args.frontal_only, "metadata": args.metadata,
                 "valid_as": args.valid_as, "lateral_skipped": n_lateral},
        header_extra=extra, official=official,
    )
