"""Validation of images and datalists (``python -m data_prep check DATALIST.json``).

Two levels:

* :func:`inspect_files` opens every image in a thread pool (decoders and hashlib release the GIL) and records whether
  it decodes completely, its spatial dimensionality, channel count, shape, the sha256 of its bytes, how many NaN/Inf
  values it holds, and (DICOM) an in-memory token of its PatientID. PIL images are fully decoded with ``.load()`` and
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off, so a truncated JPEG is an error, not a grey bottom half. NIfTI and
  DICOM sizes are checked against :data:`MAX_DIM`/:data:`MAX_VOXELS` from the header, before any pixel is decoded.
* :func:`check_entries` looks at a datalist together with those results: unreadable files, NaN/Inf values, wrong
  dimensionality, mixed channel counts, byte-identical images in two splits (leakage) or under two labels, patients
  (``patient`` keys, and DICOM PatientID tags) in two splits, labels outside the declared classes, empty classes,
  stale header counts, image-level splits, and class balance.

Errors make the command exit non-zero; warnings and information are printed but do not fail the check.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .common import SPLITS, file_key
from .phi import quiet_dicom, redact, session_token

#: How many examples a report line lists before it says "... and N more".
MAX_LISTED = 100

#: Size limits, checked from the header before any pixel data is decompressed (a few KB of .nii.gz can declare
#: terabytes: a gzip bomb). A NIfTI or DICOM image with any dimension above MAX_DIM, or more than MAX_VOXELS voxels
#: (all dimensions, channels and frames multiplied), is reported as a bad file and never decoded.
MAX_DIM = 8192
MAX_VOXELS = 2**31


class ImageTooLargeError(ValueError):
    """The header declares more voxels than :data:`MAX_VOXELS` or a dimension above :data:`MAX_DIM`."""


class RedactedError(Exception):
    """A decoder error whose message had identifying DICOM values removed (the text keeps the original type name)."""


@dataclass
class FileInfo:
    """Result of opening one image file."""

    path: str
    ok: bool
    error: str | None = None
    spatial_dims: int | None = None
    channels: int | None = None
    shape: tuple[int, ...] | None = None
    sha256: str | None = None
    nan: int = 0
    inf: int = 0
    #: in-memory token of the DICOM PatientID (:func:`data_prep.phi.session_token`); never printed or written
    patient_token: str | None = field(default=None, repr=False)


class _Decoded(NamedTuple):
    spatial_dims: int
    channels: int
    shape: tuple[int, ...]
    nan: int = 0
    inf: int = 0
    patient_token: str | None = None


# channel counts the training loader turns into `in_channels` (1 or 3): grey, RGB, RGBA
LOADER_CONVERTS_CHANNELS = {1, 3, 4}


def _nonfinite(arr: Any) -> tuple[int, int]:
    """(NaN count, +/-Inf count) of a numeric array; (0, 0) for integer data."""
    import numpy as np

    a = np.asarray(arr)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)):
        return 0, 0
    return int(np.count_nonzero(np.isnan(a))), int(np.count_nonzero(np.isinf(a)))


def _check_size(shape: tuple[int, ...], what: str) -> None:
    import math

    n = math.prod(int(s) for s in shape) if shape else 0
    if any(int(s) > MAX_DIM for s in shape) or n > MAX_VOXELS:
        raise ImageTooLargeError(
            f"{what} declares {'x'.join(str(int(s)) for s in shape)} = {n:,} voxels; data_prep refuses any dimension "
            f"above {MAX_DIM} or more than {MAX_VOXELS:,} voxels (data_prep.check.MAX_DIM / MAX_VOXELS) and did not "
            "decode it. Crop or resample the image, or exclude it with --drop-bad"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_pil(path: Path) -> _Decoded:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # full decode: raises OSError on truncated data
        bands = len(im.getbands())
        n_frames = getattr(im, "n_frames", 1)
        nan = inf = 0
        if im.mode.startswith("F"):  # 32-bit float (TIFF): every frame may hold NaN/Inf
            for k in range(n_frames):
                im.seek(k)
                a, b = _nonfinite(np.asarray(im))
                nan, inf = nan + a, inf + b
        if n_frames > 1:
            return _Decoded(3, bands, (im.width, im.height, n_frames), nan, inf)
        return _Decoded(2, bands, (im.width, im.height), nan, inf)


def _open_nifti(path: Path) -> _Decoded:
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))  # reads the header only
    _check_size(tuple(img.header.get_data_shape()), "the NIfTI header")
    data = np.asanyarray(img.dataobj)  # reads (and decompresses) everything: catches truncated files
    nan, inf = _nonfinite(data)
    shape = tuple(int(s) for s in data.shape)
    if len(shape) <= 2:
        return _Decoded(2, 1, shape, nan, inf)
    channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    return _Decoded(3, channels, shape[:3], nan, inf)


def _open_dicom(path: Path) -> _Decoded:
    """A single-frame DICOM file is read by :func:`ffcl_monai.data.dicom.read_dicom_display`, the function the
    bundle's loader uses (so both accept and refuse the same files, and a file that checks out here is what training
    sees: one grey channel); a multi-frame file is a volume (3D configs), decoded by pydicom."""
    import pydicom

    from .dicomtags import patient_id_of

    with quiet_dicom():
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        try:
            spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            _check_size((int(getattr(ds, "Columns", 0) or 0), int(getattr(ds, "Rows", 0) or 0), frames, spp),
                        "the DICOM header (Columns x Rows x NumberOfFrames x SamplesPerPixel)")
            if frames <= 1:
                from ffcl_monai.data.dicom import DicomReadError, read_dicom_display

                try:
                    arr = read_dicom_display(path)  # never holds NaN/Inf: it refuses such files
                except DicomReadError as exc:  # "DICOM <path>: <problem>. <fix>": the report names the file already
                    raise RedactedError(f"DicomReadError: {str(exc).removeprefix(f'DICOM {path}: ')}") from None
                pid = patient_id_of(ds)
                return _Decoded(2, 1, tuple(int(s) for s in arr.shape), 0, 0, session_token(pid) if pid else None)
            ds = pydicom.dcmread(str(path))
            arr = ds.pixel_array
            nan, inf = _nonfinite(arr)
        except RedactedError:
            raise
        except ImageTooLargeError:
            raise
        except Exception as exc:  # decoder messages must not carry tag values into reports
            raise RedactedError(f"{type(exc).__name__}: {redact(str(exc), ds)}") from None
        pid = patient_id_of(ds)
    token = session_token(pid) if pid else None
    shape = tuple(int(s) for s in arr.shape)
    if frames > 1:
        return _Decoded(3, spp, shape[:3], nan, inf, token)
    return _Decoded(2, spp, shape[:2], nan, inf, token)


def _open_itk(path: Path) -> _Decoded:
    import itk

    img = itk.imread(str(path))
    dims = int(img.GetImageDimension())
    comps = int(img.GetNumberOfComponentsPerPixel())
    size = tuple(int(s) for s in itk.size(img))
    nan, inf = _nonfinite(itk.array_view_from_image(img))
    return _Decoded(dims, comps, size, nan, inf)


def open_image(path: Path) -> _Decoded:
    """Open and fully decode one image; return ``(spatial_dims, channels, shape, nan, inf, patient_token)``.

    Raises on any problem, including a header that declares more than :data:`MAX_VOXELS` voxels.
    """
    low = path.name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return _open_nifti(path)
    if low.endswith((".dcm", ".dicom")):
        return _open_dicom(path)
    if low.endswith((".mha", ".mhd", ".nrrd")):
        return _open_itk(path)
    return _open_pil(path)


def inspect_file(path: str | os.PathLike, display: str | None = None) -> FileInfo:
    """Open, decode and hash one file. Never raises: problems are returned in ``FileInfo.error``."""
    p = Path(path)
    name = display or str(p)
    try:
        if not p.is_file():
            return FileInfo(name, False, "file not found")
        if p.stat().st_size == 0:
            return FileInfo(name, False, "empty file (0 bytes)")
        digest = _sha256(p)
        d = open_image(p)
        info = FileInfo(name, True, None, d.spatial_dims, d.channels, d.shape, digest, d.nan, d.inf, d.patient_token)
        if d.nan or d.inf:
            info.ok = False
            info.error = (f"{d.nan} NaN and {d.inf} Inf value(s); replace them in a copy (e.g. numpy.nan_to_num) or "
                          "exclude the file with --drop-bad")
        return info
    except RedactedError as exc:
        return FileInfo(name, False, str(exc)[:300])
    except ImageTooLargeError as exc:
        return FileInfo(name, False, f"too large: {exc}")
    except Exception as exc:  # any decoder error is a finding about the file, not a crash of the checker
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return FileInfo(name, False, f"{type(exc).__name__}: {msg}"[:300])


def default_workers() -> int:
    """Threads for file inspection: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def inspect_files(
    paths: list[tuple[str, str]], workers: int | None = None, progress: bool = True, desc: str = "checking images"
) -> dict[str, FileInfo]:
    """Inspect ``(key, readable_path)`` pairs in parallel; return ``{key: FileInfo}``.

    The key is what reports name (the final path); the readable path may be a staging copy.
    """
    from tqdm.auto import tqdm

    workers = workers or default_workers()
    out: dict[str, FileInfo] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda kp: (kp[0], inspect_file(kp[1], kp[0])), paths, chunksize=1)
        for key, info in tqdm(it, total=len(paths), desc=desc, unit="img", disable=not progress, leave=False):
            out[key] = info
    return out


@dataclass
class Report:
    """Findings of a check. ``ok`` is False when there is at least one error."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    bad_files: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings do not count)."""
        return not self.errors

    def format(self, title: str = "data_prep check") -> str:
        """Human-readable report."""
        lines = [f"== {title}: {'PASSED' if self.ok else 'FAILED'} "
                 f"({len(self.errors)} error(s), {len(self.warnings)} warning(s)) =="]
        for head, items in (("ERRORS", self.errors), ("WARNINGS", self.warnings), ("INFO", self.info)):
            if items:
                lines.append(f"{head}:")
                lines.extend("  " + s.replace("\n", "\n  ") for s in items)
        # printable whatever the file names hold (a lone surrogate from a non-UTF-8 name must not crash print())
        return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable report (``check --report-json``)."""
        return {"ok": self.ok, **asdict(self)}


def _listing(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = items[:limit]
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n".join(f"    {s}" for s in shown) + more


def bad_file_report(infos: Iterable[FileInfo]) -> tuple[list[str], list[dict[str, str]]]:
    """Error lines and a machine-readable list for files that could not be read."""
    bad = sorted((i for i in infos if not i.ok), key=lambda i: i.path)
    if not bad:
        return [], []
    rows = [f"{i.path}: {i.error}" for i in bad]
    msg = f"{len(bad)} unreadable, truncated or invalid file(s):\n" + _listing(rows)
    return [msg], [{"path": i.path, "error": i.error or ""} for i in bad]


def _entry_label_problem(label: Any, task: str, num_classes: int) -> str | None:
    if task == "multilabel":
        if not isinstance(label, list) or len(label) != num_classes:
            return f"multi-label 'label' must be a list of length {num_classes}"
        if any(v not in (-1, 0, 1) for v in label):
            return "multi-label values must be 0, 1 or -1 (ignored)"
        return None
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
        return f"label must be an int in [0, {num_classes})"
    return None


def check_entries(datalist: dict[str, Any], json_dir: Path, infos: dict[str, FileInfo]) -> Report:
    """Dataset-level checks of a datalist given per-file results keyed by :func:`data_prep.common.file_key`.

    Every entry must have a result in ``infos``: an entry without one is an error, so that the per-file checks can
    never be skipped silently (as they once were for SRC paths containing ``..``).
    """
    rep = Report()
    task = datalist.get("task", "multiclass")
    labels = {int(k): v for k, v in (datalist.get("labels") or {}).items()}
    num_classes = int(datalist.get("num_classes", len(labels) or 0))
    spatial_dims = datalist.get("spatial_dims")
    carved = set((datalist.get("data_prep") or {}).get("carved", []))
    splits = [s for s in SPLITS if s in datalist]
    for key in datalist:
        if isinstance(datalist[key], list) and key not in SPLITS and key not in ("dropped",):
            rep.warnings.append(f"list '{key}' is not one of {SPLITS}; the bundle will ignore it")

    # 1. entries and files
    label_problems: list[str] = []
    missing_key: list[str] = []
    unchecked: list[str] = []
    file_infos: dict[str, list[tuple[str, FileInfo]]] = defaultdict(list)  # split -> [(rel, info)]
    for split in splits:
        for n, e in enumerate(datalist[split]):
            if not isinstance(e, dict) or not isinstance(e.get("image"), str):
                missing_key.append(f"{split}[{n}]")
                continue
            if "label" in e and num_classes:
                prob = _entry_label_problem(e["label"], task, num_classes)
                if prob:
                    label_problems.append(f"{split}[{n}] {e['image']}: {prob} (got {e['label']!r})")
            info = infos.get(file_key(json_dir / e["image"]))
            if info is not None:
                file_infos[split].append((e["image"], info))
            else:
                unchecked.append(f"{split}:{e['image']}")
    if missing_key:
        rep.errors.append("entries without an 'image' path (a string):\n" + _listing(missing_key))
    if unchecked:
        rep.errors.append(
            f"{len(unchecked)} entr(y/ies) have no file-check result, so the per-file checks did not run for them "
            "(a data_prep path lookup bug; please report it):\n" + _listing(unchecked)
        )
    if label_problems:
        rep.errors.append(f"{len(label_problems)} entr(y/ies) with invalid labels:\n" + _listing(label_problems))

    all_infos = [i for s in splits for _, i in file_infos[s]]
    errs, rep.bad_files = bad_file_report(all_infos)
    rep.errors.extend(errs)
    good = [(s, rel, i) for s in splits for rel, i in file_infos[s] if i.ok]

    # 2. dimensionality and channels
    if spatial_dims is not None:
        wrong = [f"{rel}: {i.spatial_dims}D {i.shape}" for s, rel, i in good if i.spatial_dims != spatial_dims]
        if wrong:
            rep.errors.append(
                f"{len(wrong)} file(s) are not {spatial_dims}D as the header's spatial_dims says:\n" + _listing(wrong)
            )
    by_ch: dict[int, list[str]] = defaultdict(list)
    for s, rel, i in good:
        by_ch[i.channels or 0].append(rel)
    if len(by_ch) > 1:
        parts = [f"{c} channel(s): {len(v)} file(s), e.g. {v[0]}" for c, v in sorted(by_ch.items())]
        if set(by_ch) <= LOADER_CONVERTS_CHANNELS:
            # grey, RGB and RGBA files mixed (two RGB files among the grey Kermany OCT release): the loader's
            # EnsureChannelsd makes every image `in_channels` channels, so a batch stacks; the release stays usable
            rep.info.append(
                "mixed channel counts, converted by the loader (ffcl_monai EnsureChannelsd: RGB(A) averaged to grey "
                "with in_channels 1, grey repeated with in_channels 3):\n" + _listing(parts)
            )
        else:
            rep.errors.append(
                "mixed channel counts (a batch cannot be stacked; convert the odd files or add a channel transform):\n"
                + _listing(parts)
            )
    elif by_ch:
        (c,) = by_ch
        shapes = Counter(i.shape for _, _, i in good)
        common = ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in shapes.most_common(3))
        more = f", and {len(shapes) - 3} other shape(s)" if len(shapes) > 3 else ""
        rep.info.append(f"{len(good)} readable image(s), {c} channel(s); shapes: {common}{more}")

    # 3. leakage: identical bytes in two splits; duplicates within one split
    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for s, rel, i in good:
        if i.sha256:
            by_hash[i.sha256].append((s, rel))
    label_of = {}
    for s in splits:
        for e in datalist[s]:
            if isinstance(e, dict) and isinstance(e.get("image"), str):
                label_of[(s, e["image"])] = e.get("label")
    cross, within, conflicting = [], [], []
    for h, occ in sorted(by_hash.items(), key=lambda kv: kv[1][0][1]):
        if len(occ) < 2:
            continue
        desc = " == ".join(f"{s}:{rel}" for s, rel in occ)
        (cross if len({s for s, _ in occ}) > 1 else within).append(desc)
        if len({json.dumps(label_of.get(o)) for o in occ}) > 1:
            conflicting.append(" == ".join(f"{s}:{rel} (label {json.dumps(label_of.get((s, rel)))})" for s, rel in occ))
    if cross:
        rep.errors.append(
            f"LEAKAGE: {len(cross)} image(s) with identical content appear in more than one split "
            "(for official splits, --drop-duplicates removes the training/validation copy):\n" + _listing(cross)
        )
    if conflicting:
        rep.errors.append(
            f"{len(conflicting)} set(s) of byte-identical images carry different labels (at least one label is wrong). "
            "Fix the labels in a copy of SRC, or re-run with --drop-duplicates: an official test/validation copy is "
            "kept and the others dropped; copies within one split are all dropped (recorded in the header):\n"
            + _listing(conflicting)
        )
    if within:
        rep.warnings.append(f"{len(within)} duplicate image(s) within a split:\n" + _listing(within))

    # 4. patients spanning splits
    pats: dict[str, set[str]] = defaultdict(set)
    for s in splits:
        for e in datalist[s]:
            if isinstance(e, dict) and e.get("patient"):
                pats[e["patient"]].add(s)
    spanning = sorted((p, sorted(ss)) for p, ss in pats.items() if len(ss) > 1)
    if spanning:
        bad = [f"patient {p}: {', '.join(ss)}" for p, ss in spanning if carved & set(ss)]
        soft = [f"patient {p}: {', '.join(ss)}" for p, ss in spanning if not carved & set(ss)]
        if bad:
            rep.errors.append(
                f"LEAKAGE: {len(bad)} patient(s) appear in a carved split and another split:\n" + _listing(bad)
            )
        if soft:
            rep.warnings.append(
                f"{len(soft)} patient(s) appear in more than one official split (as distributed by the source):\n"
                + _listing(soft, 10)
            )

    # 4b. DICOM files of one patient (same PatientID tag, compared as in-memory tokens) in two splits
    by_token: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s, rel, i in good:
        if i.patient_token:
            by_token[i.patient_token][s].append(rel)
    dicom_hard, dicom_soft = [], []
    for occ in sorted(by_token.values(), key=lambda o: min(min(v) for v in o.values())):
        if len(occ) < 2:
            continue
        desc = ", ".join(f"{s}:{sorted(occ[s])[0]}" + (f" (+{len(occ[s]) - 1})" if len(occ[s]) > 1 else "")
                         for s in splits if s in occ)
        (dicom_hard if carved & set(occ) else dicom_soft).append(desc)
    if dicom_hard:
        rep.errors.append(
            f"LEAKAGE: {len(dicom_hard)} DICOM patient(s) (same PatientID tag; values not shown) have images in a "
            "carved split and another split; re-run data_prep, which groups DICOM files by PatientID:\n"
            + _listing(dicom_hard)
        )
    if dicom_soft:
        rep.warnings.append(
            f"{len(dicom_soft)} DICOM patient(s) (same PatientID tag; values not shown) have images in more than one "
            "split:\n" + _listing(dicom_soft, 10)
        )

    # 4c. image-level splits must not pass for patient-level ones
    entries = [e for s in splits for e in datalist[s] if isinstance(e, dict)]
    with_pid = sum(1 for e in entries if e.get("patient"))
    if entries and with_pid == 0:
        rep.warnings.append(
            "no entry has a 'patient' ID: the splits are IMAGE-level, so images of one patient may sit in several "
            "splits (optimistic scores). Give patient IDs (--patient-regex, --patient-column, DICOM PatientID) if "
            "the source has them."
        )
    elif entries and with_pid < len(entries):
        rep.warnings.append(
            f"{len(entries) - with_pid} of {len(entries)} entries have no 'patient' ID; each of them was split as its "
            "own patient."
        )

    # 5. classes: empty classes, balance, header counts
    if labels:
        actual = _count(datalist, splits, task, labels)
        header_counts = datalist.get("counts")
        if header_counts is not None and header_counts != actual:
            rep.errors.append("header 'counts' do not match the entries (stale or edited datalist); re-run data_prep")
        total = Counter()
        for s in splits:
            total.update(actual.get(s, {}))
        for cid, name in sorted(labels.items()):
            if total.get(name, 0) == 0:
                (rep.errors if task != "multilabel" else rep.warnings).append(
                    f"class {cid} '{name}' has no {'images' if task != 'multilabel' else 'positive images'} at all"
                )
            elif "training" in actual and actual["training"].get(name, 0) == 0:
                (rep.errors if task != "multilabel" else rep.warnings).append(
                    f"class {cid} '{name}' is empty in the training split"
                )
        for s in splits:
            n = len(datalist[s])
            if n == 0:
                continue
            counts = actual.get(s, {})
            empty = [name for name in labels.values() if counts.get(name, 0) == 0]
            if empty and s != "training" and task != "multilabel":
                rep.warnings.append(f"{s}: class(es) {', '.join(empty)} have no images")
            parts = ", ".join(f"{name} {counts.get(name, 0)} ({100.0 * counts.get(name, 0) / n:.1f}%)"
                              for name in labels.values())
            rep.info.append(f"{s}: {n} image(s); {'positives: ' if task == 'multilabel' else ''}{parts}")
            nz = [v for v in counts.values() if v > 0]
            if task != "multilabel" and len(nz) > 1 and max(nz) / min(nz) > 10:
                rep.warnings.append(f"{s}: strong class imbalance (largest/smallest class = {max(nz) / min(nz):.1f})")
    return rep


def _count(datalist: dict[str, Any], splits: list[str], task: str, labels: dict[int, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in splits:
        c: Counter = Counter()
        for e in datalist[s]:
            if not isinstance(e, dict) or "label" not in e:
                continue
            lab = e["label"]
            if task == "multilabel" and isinstance(lab, list):
                for j, v in enumerate(lab):
                    if v == 1 and j in labels:
                        c[labels[j]] += 1
            elif isinstance(lab, int) and lab in labels:
                c[labels[lab]] += 1
        out[s] = {name: int(c.get(name, 0)) for _, name in sorted(labels.items())}
    return out


def count_labels(datalist: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per split and class: image counts (single-label) or positive counts (multi-label)."""
    labels = {int(k): v for k, v in (datalist.get("labels") or {}).items()}
    splits = [s for s in SPLITS if s in datalist]
    return _count(datalist, splits, datalist.get("task", "multiclass"), labels)


def check_datalist(
    path: str | os.PathLike, workers: int | None = None, progress: bool = True
) -> Report:
    """Open every image of a datalist in parallel and run all checks."""
    path = Path(path)
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Report(errors=[f"{path}: datalist not found"])
    except json.JSONDecodeError as exc:
        return Report(errors=[f"{path}: not valid JSON ({exc})"])
    if not isinstance(datalist, dict) or not any(s in datalist for s in SPLITS):
        return Report(errors=[f"{path}: not a decathlon datalist (no 'training'/'validation'/'test' list)"])
    json_dir = path.parent
    keys: dict[str, str] = {}
    for s in SPLITS:
        for e in datalist.get(s, []):
            if isinstance(e, dict) and isinstance(e.get("image"), str):
                k = file_key(json_dir / e["image"])
                keys[k] = k
    pairs = sorted(keys.items())
    infos = inspect_files(pairs, workers=workers, progress=progress)
    # show paths relative to the JSON in the report, the way they are written in it
    for k, info in infos.items():
        info.path = os.path.relpath(k, json_dir)
    return check_entries(datalist, json_dir, infos)
