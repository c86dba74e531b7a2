"""Helpers for ``SRC/{train,val,test}/<CLASS>/*`` trees (Kermany, OCT2017, generic folders)."""

from __future__ import annotations

from pathlib import Path

from ..common import LayoutError, list_files

#: folder name -> split name. ``val`` handling is decided by the caller (merge/keep/drop).
SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation", "valid": "validation",
              "validation": "validation", "test": "test", "testing": "test"}


def find_split_dirs(src: Path) -> dict[str, Path]:
    """Map official split names to their folders (case-insensitive folder names)."""
    found: dict[str, Path] = {}
    if not src.is_dir():
        raise LayoutError(f"SRC {src} is not a folder")
    for p in sorted(src.iterdir()):
        if p.is_dir() and p.name.lower() in SPLIT_DIRS:
            split = SPLIT_DIRS[p.name.lower()]
            if split in found:
                raise LayoutError(f"SRC has two folders for the {split} split: {found[split].name} and {p.name}")
            found[split] = p
    return found


def class_dirs(split_dir: Path, expected: list[str] | None) -> dict[str, Path]:
    """Class folders of one split folder; with ``expected``, the names must match exactly (case-insensitive)."""
    dirs = {p.name: p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith((".", "__"))}
    if expected is None:
        return dirs
    lower = {k.lower(): v for k, v in dirs.items()}
    missing = [c for c in expected if c.lower() not in lower]
    if missing:
        raise LayoutError(
            f"{split_dir} has no folder(s) {', '.join(missing)}; expected {'/'.join(expected)} "
            f"(found: {', '.join(sorted(dirs)) or 'nothing'})"
        )
    extra = sorted(set(lower) - {c.lower() for c in expected})
    if extra:
        raise LayoutError(
            f"{split_dir} has unexpected class folder(s) {', '.join(extra)}; expected only {'/'.join(expected)}"
        )
    return {c: lower[c.lower()] for c in expected}


def layout_hint(src: Path, expected: list[str], layout: str, example: str) -> LayoutError:
    """A helpful error for a SRC that is not the named layout."""
    kids = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
    hint = ""
    low = {k.lower() for k in kids}
    if {c.lower() for c in expected} <= low:
        hint = f" It looks like you passed a split folder; pass its parent ({src.parent}) instead."
    elif len(kids) == 1 and (src / kids[0]).is_dir():
        hint = f" It contains a single folder; try SRC={src / kids[0]}."
    return LayoutError(
        f"SRC {src} is not a {layout} layout: expected {example}. Found: {', '.join(kids[:10]) or 'nothing'}.{hint}"
    )


def scan_split_tree(src: Path, classes: list[str] | None, layout: str, example: str):
    """Yield ``(official_split, class_folder_name, file_path)`` for every image of a split/class tree."""
    splits = find_split_dirs(src)
    if "training" not in splits:
        raise layout_hint(src, classes or [], layout, example)
    out = []
    names: list[str] | None = classes
    for split in ("training", "validation", "test"):
        if split not in splits:
            continue
        cdirs = class_dirs(splits[split], names)
        if names is None:  # generic folder layout: the training split defines the classes
            names = sorted(cdirs)
            if not names:
                raise layout_hint(src, [], layout, example)
        for cname, cdir in cdirs.items():
            if cname not in names:
                raise LayoutError(f"{cdir} is a class not present in the training folder ({', '.join(names)})")
            for f in list_files(cdir):
                out.append((split, cname, f))
    return out, splits, names
