"""From a layout scan to a checked, written datalist (shared by every layout subcommand)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .check import Report, bad_file_report, check_entries, count_labels, inspect_files
from .common import SPLITS, LayoutError, Record, Scan, relpath
from .phi import patient_hash, resolve_salt
from .splits import SplitError, build_groups, carve, multilabel_stratum, resolve_count
from .writer import write_json_atomic


@dataclass
class CommonOptions:
    """Options every layout subcommand shares."""

    src: Path
    out: Path
    seed: int = 0
    salt: str | None = None
    check: bool = True
    drop_bad: bool = False
    drop_duplicates: bool = False
    workers: int | None = None
    progress: bool = True
    name: str | None = None
    val_count: int | None = None
    val_fraction: float | None = None
    test_count: int | None = None
    test_fraction: float | None = None


def ensure_outside_src(src: Path, out: Path) -> None:
    """Refuse to write anything under SRC (the raw download is read-only for data_prep)."""
    s = Path(os.path.realpath(src))
    o = Path(os.path.realpath(out.parent)) / out.name
    if o == s or s in o.parents:
        raise LayoutError(f"--out {out} is inside SRC {src}; data_prep never writes under SRC. Pick another folder.")


def _stratum(r: Record, freq: list[int] | None) -> Any:
    if r.stratum is not None:
        return r.stratum
    if isinstance(r.label, list):
        return multilabel_stratum(r.label, freq or [0] * len(r.label))
    return r.label


def _carve_split(
    recs: list[Record], n: int, seed: int, hashes: dict[str, str | None], salt: str, avoid: set[str] | None = None
) -> tuple[list[Record], list[Record]]:
    freq = None
    if recs and isinstance(recs[0].label, list):
        freq = [sum(1 for r in recs if r.label[j] == 1) for j in range(len(recs[0].label))]
    strata = [_stratum(r, freq) for r in recs]
    pats = [patient_hash(r.patient, salt) if r.patient is not None else None for r in recs]
    hs = [hashes.get(str(r.path)) for r in recs]
    groups = build_groups(pats, hs)
    eligible = [p is None or p not in avoid for p in pats] if avoid else None
    keep, hold = carve(strata, groups, n, seed, eligible)
    return [recs[i] for i in keep], [recs[i] for i in hold]


#: When the same bytes appear in two splits, the copy in the split that comes first here is kept: official test sets
#: stay intact (comparable with published results) and the training copy is the one that goes.
_PRECEDENCE = ("test", "validation", "training")


def _drop_cross_split_duplicates(
    by_split: dict[str, list[Record]], infos: dict, json_dir: Path
) -> list[dict[str, str]]:
    """Remove images whose exact content is also in a split of higher precedence; return header 'dropped' rows."""
    seen: dict[str, tuple[str, Record]] = {}
    dropped: list[dict[str, str]] = []
    for split in _PRECEDENCE:
        kept = []
        for r in by_split[split]:
            h = infos[str(r.path)].sha256
            if h in seen and seen[h][0] != split:
                other_split, other = seen[h]
                dropped.append({"image": relpath(r.path, json_dir),
                                "reason": f"identical to {other_split}:{relpath(other.path, json_dir)}"})
                continue
            seen.setdefault(h, (split, r))
            kept.append(r)
        by_split[split] = kept
    for d in dropped:
        _log(f"--drop-duplicates: dropped {d['image']} ({d['reason']})")
    return sorted(dropped, key=lambda d: d["image"])


def _entry(r: Record, json_dir: Path, salt: str, task: str) -> dict[str, Any]:
    e: dict[str, Any] = {"image": relpath(r.path, json_dir)}
    if r.label is not None:
        e["label"] = r.label
        if task == "multilabel" and isinstance(r.label, list) and any(v < 0 for v in r.label):
            e["label_mask"] = [0 if v < 0 else 1 for v in r.label]
    if r.patient is not None:
        e["patient"] = patient_hash(r.patient, salt)
    for k in sorted(r.meta):
        e[k] = r.meta[k]
    return e


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pipeline(scan: Scan, opts: CommonOptions) -> int:
    """Check files, split, build the header, run the dataset checks and write the datalist. Returns an exit code."""
    t0 = time.perf_counter()
    out = Path(os.path.abspath(opts.out))
    json_dir = out.parent
    salt, salt_kind = resolve_salt(opts.salt)
    records = scan.records
    if not records:
        raise LayoutError(f"no images found in {opts.src} for layout '{scan.layout}'")
    try:
        # 1. open every file (also gives the content hashes used for grouping and leakage checks)
        infos = {}
        dropped: list[dict[str, str]] = []
        if opts.check:
            pairs = [(str(r.path), str(r.readable)) for r in records]
            infos = inspect_files(pairs, workers=opts.workers, progress=opts.progress, desc=f"{scan.layout}: checking")
            for k, info in infos.items():
                info.path = relpath(Path(k), json_dir) if scan.staging is not None else k
            bad_msgs, bad_rows = bad_file_report(infos.values())
            if bad_rows and not opts.drop_bad:
                rep = Report(errors=bad_msgs, bad_files=bad_rows)
                print(rep.format(f"data_prep {scan.layout}"))
                _log(
                    f"data_prep {scan.layout}: {len(bad_rows)} unreadable file(s) listed above; no datalist written. "
                    "Fix or remove them in a copy of SRC, or re-run with --drop-bad to exclude them (recorded in the "
                    "header)."
                )
                return 1
            if bad_rows:
                bad_keys = {str(r.path) for r in records if not infos[str(r.path)].ok}
                dropped = [
                    {"image": relpath(Path(k), json_dir), "reason": infos[k].error or "unreadable"}
                    for k in sorted(bad_keys)
                ]
                records = [r for r in records if str(r.path) not in bad_keys]
                _log(f"data_prep {scan.layout}: --drop-bad excluded {len(dropped)} unreadable file(s):")
                for d in dropped:
                    _log(f"  {d['image']}: {d['reason']}")
        hashes = {k: i.sha256 for k, i in infos.items()}

        # 2. splits
        by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
        pool: list[Record] = []
        for r in records:
            (by_split[r.split] if r.split else pool).append(r)
        carved: list[str] = []
        want_test = opts.test_count is not None or opts.test_fraction is not None
        if want_test and "test" in scan.official:
            raise SplitError(
                "SRC has an official test split; --test-count/--test-fraction would replace it. Drop those options."
            )
        # unsplit images join the training pool; without an official test split, test is carved from that pool
        by_split["training"].extend(pool)
        if "test" not in scan.official and by_split["training"]:
            n_test = resolve_count(len(by_split["training"]), opts.test_count, opts.test_fraction, "training", "test")
            if n_test:
                keep, test = _carve_split(by_split["training"], n_test, opts.seed, hashes, salt)
                by_split["test"].extend(test)
                by_split["training"] = keep
                carved.append("test")
        want_val = opts.val_count is not None or opts.val_fraction is not None
        if want_val and "validation" in scan.official and (opts.val_count or opts.val_fraction):
            raise SplitError("SRC has an official validation split; drop --val-count/--val-fraction")
        n_val = resolve_count(len(by_split["training"]), opts.val_count, opts.val_fraction, "training", "val")
        if n_val:
            # patients that the source also put in its test split stay in training (validation never shares a
            # patient with test, even when the official train/test split does)
            avoid = {patient_hash(r.patient, salt) for r in by_split["test"] if r.patient is not None}
            keep, val = _carve_split(by_split["training"], n_val, opts.seed + 1, hashes, salt, avoid)
            by_split["training"] = keep
            by_split["validation"].extend(val)
            carved.append("validation")
        if opts.drop_duplicates and opts.check:
            dropped.extend(_drop_cross_split_duplicates(by_split, infos, json_dir))
        if not by_split["training"]:
            raise SplitError("the training split is empty")

        # 3. datalist
        task = scan.task
        lists = {
            s: sorted((_entry(r, json_dir, salt, task) for r in by_split[s]), key=lambda e: e["image"]) for s in SPLITS
        }
        options = dict(scan.options)
        for k in ("val_count", "val_fraction", "test_count", "test_fraction"):
            v = getattr(opts, k)
            if v is not None:
                options[k] = v
        options["drop_bad"] = opts.drop_bad
        options["drop_duplicates"] = opts.drop_duplicates
        options["check"] = opts.check
        header: dict[str, Any] = {
            "name": opts.name or out.stem,
            "description": scan.description,
            "task": task,
            "labels": {str(i): n for i, n in enumerate(scan.class_names)},
            "num_classes": len(scan.class_names),
            "spatial_dims": scan.spatial_dims,
            "modality": scan.modality,
            "counts": {},
            "sizes": {s: len(lists[s]) for s in SPLITS},
        }
        header.update(scan.header_extra)
        header["data_prep"] = {
            "layout": scan.layout,
            "version": __version__,
            "seed": opts.seed,
            "source": relpath(opts.src, json_dir),
            "options": dict(sorted(options.items())),
            "salt": salt_kind,
            "carved": carved,
            "split_method": "seeded stratified patient-grouped carve with exact counts (data_prep/splits.py)"
            + ("; groups also join byte-identical images" if opts.check else ""),
            "dropped": dropped,
        }
        datalist = {**header, **lists}
        datalist["counts"] = count_labels(datalist)

        # 4. dataset-level checks
        if opts.check:
            rep = check_entries(datalist, json_dir, infos)
            print(rep.format(f"data_prep {scan.layout}"))
            if not rep.ok:
                _log(f"data_prep {scan.layout}: check failed (see ERRORS above); no datalist written.")
                return 1
        # 5. write: generated images first, then the JSON that points at them
        if scan.staging is not None:
            scan.staging.commit()
            scan.staging = None
        write_json_atomic(out, datalist)
    finally:
        if scan.staging is not None:
            scan.staging.abort()
    dt = time.perf_counter() - t0
    sizes = ", ".join(f"{s} {len(lists[s])}" for s in SPLITS)
    _log(f"data_prep {scan.layout}: wrote {out} ({sizes}) in {dt:.1f} s")
    return 0
