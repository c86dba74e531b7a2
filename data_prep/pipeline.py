"""From a layout scan to a checked, written datalist (shared by every layout subcommand)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .check import Report, _listing, bad_file_report, check_entries, count_labels, inspect_files
from .common import (
    PRIVATE_ID_SOURCES, SPLITS, LayoutError, Record, Scan, file_key, is_inside, is_utf8_path, log, norm_path,
    printable, relpath,
)
from .dicomtags import is_dicom_name
from .phi import Salt, SaltResolver, path_pseudonym, patient_hash
from .splits import SplitError, build_groups, carve, multilabel_stratum, resolve_count
from .writer import StagingDir, write_json_atomic

#: How many offending files a path error lists.
_LISTED = 10


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
    pseudonymize_paths: bool = False
    link_mode: str = "symlink"
    #: shared with the scan (the volumes layout names converted series with the salt); created from ``salt`` if None
    salt_resolver: SaltResolver | None = None


def ensure_outside_src(src: Path, out: Path) -> None:
    """Refuse to write anything under SRC (the raw download is read-only for data_prep)."""
    s = Path(os.path.realpath(src))
    o = Path(os.path.realpath(out.parent)) / out.name
    if o == s or s in o.parents:
        raise LayoutError(f"--out {out} is inside SRC {src}; data_prep never writes under SRC. Pick another folder.")


def source_root(src: Path) -> Path:
    """The folder a layout reads from: SRC itself, or the folder of a SRC file (CSV, npz)."""
    src = norm_path(src)
    return src if src.is_dir() else src.parent


def _stratum(r: Record, freq: list[int] | None) -> Any:
    if r.stratum is not None:
        return r.stratum
    if isinstance(r.label, list):
        return multilabel_stratum(r.label, freq or [0] * len(r.label))
    return r.label


def _raw_id(r: Record) -> str | None:
    """The raw patient ID used for grouping (in memory only); stripped like :func:`data_prep.phi.patient_hash`."""
    return str(r.patient).strip() if r.patient is not None else None


def _carve_split(
    recs: list[Record], n: int, seed: int, hashes: dict[str, str | None], avoid: set[str] | None = None
) -> tuple[list[Record], list[Record]]:
    """Carve ``n`` images from ``recs``, grouped by raw patient ID and by content; independent of the salt."""
    freq = None
    if recs and isinstance(recs[0].label, list):
        freq = [sum(1 for r in recs if r.label[j] == 1) for j in range(len(recs[0].label))]
    strata = [_stratum(r, freq) for r in recs]
    pats = [_raw_id(r) for r in recs]
    hs = [hashes.get(file_key(r.path)) for r in recs]
    groups = build_groups(pats, hs)
    eligible = [p is None or p not in avoid for p in pats] if avoid else None
    keep, hold = carve(strata, groups, n, seed, eligible)
    return [recs[i] for i in keep], [recs[i] for i in hold]


#: When the same bytes appear in two splits, the copy in the split that comes first here is kept: official test sets
#: stay intact (comparable with published results) and the training copy is the one that goes.
_PRECEDENCE = ("test", "validation", "training")
_RANK = {"test": 0, "validation": 1, "training": 2, None: 3}


def _label_text(label: Any) -> str:
    return json.dumps(label)


def _drop_conflicting_labels(
    records: list[Record], infos: dict, shown: Callable[[Path], str]
) -> tuple[list[Record], list[dict[str, str]]]:
    """``--drop-duplicates``, before any split is carved: byte-identical images filed under different labels.

    When the copies in the highest-precedence *official* split (test, then validation) agree on a label, they are kept
    and the other copies dropped (BreastMNIST: the training copy of a test image goes). Otherwise the right label is
    unknown and every copy is dropped. Runs before carving so that carved counts stay exact.
    """
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        h = infos[file_key(r.path)].sha256
        if h:
            by_hash[h].append(r)
    drop: dict[int, str] = {}
    for members in by_hash.values():
        if len({_label_text(r.label) for r in members}) < 2:
            continue
        best = min(_RANK[r.split] for r in members)
        top = [r for r in members if _RANK[r.split] == best]
        keep_top = best <= _RANK["validation"] and len({_label_text(r.label) for r in top}) == 1
        listing = ", ".join(f"{r.split or 'pool'}:{shown(r.path)} (label {_label_text(r.label)})" for r in members)
        for r in members:
            if keep_top and any(r is t for t in top):
                continue
            if keep_top:
                drop[id(r)] = (f"identical to {top[0].split}:{shown(top[0].path)}, which is labelled "
                               f"{_label_text(top[0].label)} (this copy: {_label_text(r.label)})")
            else:
                drop[id(r)] = f"byte-identical copies carry conflicting labels, the right one is unknown: {listing}"
    rows = [{"image": shown(r.path), "reason": drop[id(r)]} for r in records if id(r) in drop]
    for d in rows:
        log.info(f"--drop-duplicates: dropped {d['image']} ({d['reason']})")
    return [r for r in records if id(r) not in drop], rows


def _drop_cross_split_duplicates(
    by_split: dict[str, list[Record]], infos: dict, shown: Callable[[Path], str]
) -> list[dict[str, str]]:
    """Remove images whose exact content is also in a split of higher precedence; return header 'dropped' rows."""
    seen: dict[str, tuple[str, Record]] = {}
    dropped: list[dict[str, str]] = []
    for split in _PRECEDENCE:
        kept = []
        for r in by_split[split]:
            h = infos[file_key(r.path)].sha256
            if h in seen and seen[h][0] != split:
                other_split, other = seen[h]
                dropped.append({"image": shown(r.path), "reason": f"identical to {other_split}:{shown(other.path)}"})
                continue
            seen.setdefault(h, (split, r))
            kept.append(r)
        by_split[split] = kept
    for d in dropped:
        log.info(f"--drop-duplicates: dropped {d['image']} ({d['reason']})")
    return sorted(dropped, key=lambda d: d["image"])


def _entry(r: Record, json_dir: Path, salt: Salt | None, task: str) -> dict[str, Any]:
    e: dict[str, Any] = {"image": relpath(r.path, json_dir)}
    if r.label is not None:
        e["label"] = r.label
        if task == "multilabel" and isinstance(r.label, list) and any(v < 0 for v in r.label):
            e["label_mask"] = [0 if v < 0 else 1 for v in r.label]
    if r.patient is not None and salt is not None:
        e["patient"] = patient_hash(r.patient, salt.value)
    for k in sorted(r.meta):
        e[k] = r.meta[k]
    return e


def validate_paths(records: list[Record], root: Path) -> None:
    """Refuse file names that are not UTF-8 and symbolic links inside ``root`` (SRC) that resolve outside it.

    Generated images (written by data_prep) are not checked. Files a CSV names outside SRC on purpose (absolute paths)
    are allowed; a file *inside* SRC must also *resolve* inside SRC, so a link cannot pull other data into the set.
    """
    src_files = [r.path for r in records if not r.generated]
    bad = [p for p in src_files if not is_utf8_path(p)]
    if bad:
        raise LayoutError(
            f"{len(bad)} file name(s) are not valid UTF-8 (shown with \\x escapes); a datalist is JSON text and cannot "
            "name them. Rename them in a copy of SRC (e.g. `convmv -f latin1 -t utf8 -r --notest DIR`):\n"
            + _listing([printable(p) for p in bad], _LISTED)
        )
    root = norm_path(root)
    real_root = os.path.realpath(root)
    escaping = [p for p in src_files if is_inside(p, root) and not is_inside(os.path.realpath(p), real_root)]
    if escaping:
        raise LayoutError(
            f"{len(escaping)} file(s) in SRC are symbolic links (or lie below one) whose target is outside SRC "
            f"{printable(root)}; data_prep reads only files inside SRC. Copy the targets into SRC (or pass the folder "
            "that holds them as SRC):\n" + _listing([printable(p) for p in escaping], _LISTED)
        )


def _grouping(records: list[Record]) -> tuple[str, list[str]]:
    """``("patient" | "image" | "partial", sorted ID sources)`` for the header's ``grouping``."""
    with_pid = sum(1 for r in records if r.patient is not None)
    kind = "patient" if with_pid == len(records) else "image" if with_pid == 0 else "partial"
    return kind, sorted({r.patient_source or "unknown" for r in records if r.patient is not None})


def _announce_grouping(layout: str, records: list[Record], official: set[str]) -> None:
    kind, sources = _grouping(records)
    n = len(records)
    if kind == "image":
        what = " (official splits cannot be verified; carved ones are made image by image)" if official else ""
        log.warning(
            f"data_prep {layout}: NO PATIENT IDs in this source: the splits are IMAGE-level, not patient-level{what}. "
            "Images of one patient may sit in training and test, which inflates test scores. If the source has patient "
            "IDs, give them (--patient-regex for folder, --patient-column for csv/volumes; DICOM files are grouped by "
            "their PatientID tag automatically). The header records \"grouping\": \"image\"."
        )
    elif kind == "partial":
        missing = sum(1 for r in records if r.patient is None)
        log.warning(
            f"data_prep {layout}: {missing} of {n} image(s) have no patient ID; each of them is split as its own "
            "patient. The header records \"grouping\": \"partial\"."
        )
    else:
        n_pat = len({_raw_id(r) for r in records})
        log.info(f"data_prep {layout}: splits grouped by patient ({', '.join(sources)}): {n_pat} patient(s), "
                 f"{n} image(s)")


def _suffix(name: str) -> str:
    low = name.lower()
    if low.endswith(".nii.gz"):
        return name[-7:]
    return Path(name).suffix


def _make_link(target: Path, link: Path, mode: str) -> str:
    """Create ``link`` -> ``target``; returns the mode used (``symlink``, or ``copy`` where symlinks fail).

    DICOM files are never copied: a byte copy would write their identifying header tags into the output folder.
    """
    if mode == "symlink":
        try:
            os.symlink(target, link)
            return "symlink"
        except OSError as exc:
            log.warning(f"--pseudonymize-paths: cannot create symbolic links here ({type(exc).__name__}); copying "
                        "the files instead")
    if is_dicom_name(target):
        raise LayoutError(
            f"--pseudonymize-paths: {printable(target)} is DICOM; a copy would carry its identifying header tags "
            "(PatientName, PatientID, dates, UIDs ...) into the output folder. Use --link-mode symlink on a file "
            "system that supports links, or de-identify the DICOM files first."
        )
    try:
        shutil.copyfile(target, link)  # never a hard link: writing through one would modify SRC
    except OSError as exc:
        raise LayoutError(f"--pseudonymize-paths: cannot copy {printable(target)} ({exc.strerror})") from exc
    return "copy"


def run_pipeline(scan: Scan, opts: CommonOptions) -> int:
    """Check files, split, build the header, run the dataset checks and write the datalist. Returns an exit code."""
    t0 = time.perf_counter()
    out = norm_path(opts.out)
    json_dir = out.parent
    root = source_root(opts.src)
    records = scan.records
    links: StagingDir | None = None
    try:
        if not records:
            raise LayoutError(f"no images found in {opts.src} for layout '{scan.layout}'")
        validate_paths(records, root)

        # 0. patient identity and the salt (needed for patient pseudonyms and pseudonymous file names only)
        _announce_grouping(scan.layout, records, scan.official)
        resolver = opts.salt_resolver or SaltResolver(opts.salt, out_dir=json_dir, src_root=root)
        has_ids = any(r.patient is not None for r in records)
        private = opts.pseudonymize_paths or any(
            r.patient is not None and r.patient_source in PRIVATE_ID_SOURCES for r in records
        )
        salt = resolver.get(need_secret=private) if (has_ids or opts.pseudonymize_paths) else None
        if salt is not None and salt.public and has_ids:
            log.warning(
                f"data_prep {scan.layout}: patient pseudonyms use the PUBLIC default salt (data_prep/phi.py "
                "DEFAULT_SALT): anyone who has the raw patient IDs can recompute them. That is acceptable only for "
                "public datasets; for private IDs set $DATA_PREP_SALT (or a salt file, see data_prep/README.md)."
            )
        pseudonyms: dict[str, str] = {}

        def shown(path: Path) -> str:
            """How the datalist names a file: relative to the JSON, or its pseudonymous link."""
            return pseudonyms.get(file_key(path)) or relpath(path, json_dir)

        if opts.pseudonymize_paths:
            dicom = [r.path for r in records if not r.generated and is_dicom_name(r.path)]
            if dicom and opts.link_mode == "copy":
                raise LayoutError(
                    f"--link-mode copy would copy {len(dicom)} DICOM file(s) with their identifying header tags "
                    f"(e.g. {printable(dicom[0])}) into the output folder; use --link-mode symlink, or de-identify "
                    "the DICOM files first."
                )
            links = StagingDir(json_dir / f"{out.stem}_links")
            for r in records:
                if r.generated:
                    continue
                rel = Path(os.path.relpath(r.path, root)).as_posix()
                name = path_pseudonym(rel, salt.value) + _suffix(r.path.name)
                pseudonyms[file_key(r.path)] = relpath(links.final / name, json_dir)
            if len(set(pseudonyms.values())) != len(pseudonyms):
                raise LayoutError("--pseudonymize-paths: two files got the same pseudonym; please report this")

        # 1. open every file (also gives the content hashes used for grouping and leakage checks)
        infos = {}
        dropped: list[dict[str, str]] = []
        if opts.check:
            pairs = [(file_key(r.path), str(r.readable)) for r in records]
            infos = inspect_files(pairs, workers=opts.workers, progress=opts.progress, desc=f"{scan.layout}: checking")
            for k, info in infos.items():
                info.path = relpath(Path(k), json_dir) if scan.staging is not None else k
            bad_msgs, bad_rows = bad_file_report(infos.values())
            if bad_rows and not opts.drop_bad:
                rep = Report(errors=bad_msgs, bad_files=bad_rows)
                print(rep.format(f"data_prep {scan.layout}"))
                log.error(
                    f"data_prep {scan.layout}: {len(bad_rows)} unreadable or invalid file(s) listed above; no datalist "
                    "written. Fix or remove them in a copy of SRC, or re-run with --drop-bad to exclude them "
                    "(recorded in the header)."
                )
                return 1
            if bad_rows:
                bad = [r for r in records if not infos[file_key(r.path)].ok]
                dropped = sorted(({"image": shown(r.path), "reason": infos[file_key(r.path)].error or "unreadable"}
                                  for r in bad), key=lambda d: d["image"])
                records = [r for r in records if infos[file_key(r.path)].ok]
                log.info(f"data_prep {scan.layout}: --drop-bad excluded {len(dropped)} unreadable file(s):")
                for d in dropped:
                    log.info(f"  {d['image']}: {d['reason']}")
            if opts.drop_duplicates:
                records, more = _drop_conflicting_labels(records, infos, shown)
                dropped.extend(more)
        hashes = {k: i.sha256 for k, i in infos.items()}

        # 2. splits: computed from raw patient IDs and content hashes, in memory; the salt plays no part
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
                keep, test = _carve_split(by_split["training"], n_test, opts.seed, hashes)
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
            avoid = {_raw_id(r) for r in by_split["test"] if r.patient is not None}
            keep, val = _carve_split(by_split["training"], n_val, opts.seed + 1, hashes, avoid)
            by_split["training"] = keep
            by_split["validation"].extend(val)
            carved.append("validation")
        if opts.drop_duplicates and opts.check:
            dropped.extend(_drop_cross_split_duplicates(by_split, infos, shown))
        if not by_split["training"]:
            raise SplitError("the training split is empty")

        # 3. datalist (entries name the files as found; pseudonyms replace them after the checks)
        task = scan.task
        lists = {
            s: sorted((_entry(r, json_dir, salt, task) for r in by_split[s]), key=lambda e: e["image"]) for s in SPLITS
        }
        kept = [r for s in SPLITS for r in by_split[s]]
        grouping, id_sources = _grouping(kept) if kept else ("image", [])
        options = dict(scan.options)
        for k in ("val_count", "val_fraction", "test_count", "test_fraction"):
            v = getattr(opts, k)
            if v is not None:
                options[k] = v
        options["drop_bad"] = opts.drop_bad
        options["drop_duplicates"] = opts.drop_duplicates
        options["check"] = opts.check
        options["pseudonymize_paths"] = opts.pseudonymize_paths
        header: dict[str, Any] = {
            "name": opts.name or out.stem,
            "description": scan.description,
            "task": task,
            "labels": {str(i): n for i, n in enumerate(scan.class_names)},
            "num_classes": len(scan.class_names),
            "spatial_dims": scan.spatial_dims,
            "modality": scan.modality,
            "grouping": grouping,
            "counts": {},
            "sizes": {s: len(lists[s]) for s in SPLITS},
        }
        header.update(scan.header_extra)
        header["data_prep"] = {
            "layout": scan.layout,
            "version": __version__,
            "seed": opts.seed,
            "source": None if opts.pseudonymize_paths else relpath(opts.src, json_dir),
            "options": dict(sorted(options.items())),
            "salt": salt.kind if salt is not None else None,
            "patient_ids": id_sources,
            "paths": "original",
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
                log.error(f"data_prep {scan.layout}: check failed (see ERRORS above); no datalist written.")
                return 1

        # 5. pseudonymous links (SRC is only read: symlinks point at it, copies read it)
        if links is not None:
            rec_of = {relpath(r.path, json_dir): r for r in kept}
            modes = set()
            made: set[str] = set()
            for s in SPLITS:
                for e in lists[s]:
                    r = rec_of[e["image"]]
                    if r.generated:
                        continue
                    new = pseudonyms[file_key(r.path)]
                    if new not in made:
                        modes.add(_make_link(r.path, links.path / Path(new).name, opts.link_mode))
                        made.add(new)
                    e["image"] = new
                lists[s].sort(key=lambda e: e["image"])
            mode = "copy" if "copy" in modes else opts.link_mode
            header["data_prep"]["paths"] = f"pseudonymized ({mode})"
            datalist = {**header, **lists}
            datalist["counts"] = count_labels(datalist)
            log.info(f"data_prep {scan.layout}: --pseudonymize-paths: {len(made)} {mode}(s) with pseudonymous names "
                     f"in {links.final}; the datalist names no original file or folder")

        # 6. write: generated images and links first, then the JSON that points at them
        if scan.staging is not None:
            scan.staging.commit()
            scan.staging = None
        if links is not None:
            links.commit()
            links = None
        write_json_atomic(out, datalist)
    finally:
        if scan.staging is not None:
            scan.staging.abort()
        if links is not None:
            links.abort()
    dt = time.perf_counter() - t0
    sizes = ", ".join(f"{s} {len(lists[s])}" for s in SPLITS)
    log.info(f"data_prep {scan.layout}: wrote {out} ({sizes}) in {dt:.1f} s")
    return 0
