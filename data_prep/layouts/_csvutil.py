"""CSV helpers shared by the chexpert, nih, csv and volumes layouts."""

from __future__ import annotations

import csv
from pathlib import Path

from ..common import LayoutError


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
#: Shared by CheXpert and NIH so that a view head pretrained on one transfers to the other.
VIEW_NAMES = {"0": "AP", "1": "PA", "2": "LATERAL"}


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
