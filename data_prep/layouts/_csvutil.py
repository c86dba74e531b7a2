"""CSV helpers shared by the chexpert, nih, csv and volumes layouts, and the metadata codes of chexpert and nih."""

from __future__ import annotations

import csv
from pathlib import Path

from ..common import LayoutError, Record, log


def read_csv(path: Path, required: list[str], what: str) -> list[dict[str, str]]:
    """Read a CSV into dicts; raise a clear error naming the file and any missing column."""
    if not path.is_file():
        raise LayoutError(f"{what}: {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel writes a BOM
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = cols
        missing = [c for c in required if c not in cols]
        if missing:
            raise LayoutError(
                f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} (found: {', '.join(cols) or 'none'})"
            )
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def parse_float(v: str) -> float | None:
    """Float or None for blanks; accepts NIH's old '058Y' ages."""
    v = (v or "").strip()
    if not v:
        return None
    if v[-1:].upper() == "Y" and v[:-1].isdigit():
        v = v[:-1]
    try:
        return float(v)
    except ValueError:
        return None


def parse_sex(v: str) -> int | None:
    """0 = female, 1 = male, None otherwise (header ``sex_names``)."""
    v = (v or "").strip().lower()
    if v in ("m", "male"):
        return 1
    if v in ("f", "female"):
        return 0
    return None


SEX_NAMES = {"0": "female", "1": "male"}
#: Shared by CheXpert and NIH so that a view head pretrained on one transfers to the other. The datalist keeps all the
#: information (AP / PA / lateral); the training configs choose the target from it with `view_target`
#: (ffcl_monai/losses/auxiliary.py): frontal_lateral (seed 004's binary target, AP and PA = frontal), ap_pa (laterals
#: masked) or ap_pa_lateral (these codes), so one datalist serves every view experiment.
VIEW_NAMES = {"0": "AP", "1": "PA", "2": "LATERAL"}
LATERAL_CODE = 2


def view_code(frontal_lateral: str | None, ap_pa: str | None) -> int | None:
    """Map CheXpert's Frontal/Lateral + AP/PA (or NIH's View Position) to VIEW_NAMES."""
    fl = (frontal_lateral or "").strip().lower()
    ap = (ap_pa or "").strip().upper()
    if fl == "lateral" or ap in ("LL", "RL", "LATERAL"):
        return 2
    if ap == "AP":
        return 0
    if ap == "PA":
        return 1
    return None


def warn_if_frontal_only(records: list[Record], layout: str) -> None:
    """Warn when every known ``view`` is frontal: seed 004's frontal-vs-lateral target is then constant.

    NIH ChestX-ray14 is frontal-only (``View Position`` AP or PA), and so is CheXpert with ``--frontal-only``; the
    training configs refuse ``view_target: frontal_lateral`` on such a datalist, and AP vs PA is what varies.
    """
    views = [r.meta.get("view") for r in records if r.meta.get("view") is not None]
    if views and LATERAL_CODE not in views:
        log.warning(
            f"{layout} --metadata: all {len(views)} known views are frontal (AP/PA), so the frontal-vs-lateral view "
            "target of seed 004 is constant in this datalist; for auxiliary targets train with `--view_target ap_pa` "
            "(AP vs PA; bundle/configs/pretrain_aux.yaml, multitask.yaml)"
        )
