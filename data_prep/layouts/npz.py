"""``medmnist`` and ``npz``: arrays in an ``.npz`` -> PNG (2D) or NIfTI (3D) files plus a datalist.

``medmnist`` expects the MedMNIST v2 keys ``{train,val,test}_{images,labels}`` and keeps the official splits.
``npz`` expects ``images`` and ``labels`` (names configurable) and carves seeded, stratified splits.

Images are written next to the datalist in ``<stem>_images/`` (never under SRC), named by their index in the npz so
that changing the split options changes only the JSON. PNGs carry no timestamps and NIfTI files are gzipped with
``mtime=0``, so outputs are byte-identical across runs. NIfTI files get an identity affine (MedMNIST has no geometry).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..common import LayoutError, Record, Scan, parse_class_map
from ..writer import StagingDir, gzip_deterministic

#: Class names and modality of MedMNIST v2 subsets (from the MedMNIST INFO table). Unknown subsets get "0", "1", ...
MEDMNIST_INFO: dict[str, tuple[list[str] | None, str]] = {
    "breastmnist": (["malignant", "normal, benign"], "US"),
    "pneumoniamnist": (["normal", "pneumonia"], "CXR"),
    "chestmnist": (["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
                    "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia"], "CXR"),
    "adrenalmnist3d": (["normal", "hyperplasia"], "CT"),
    "nodulemnist3d": (["benign", "malignant"], "CT"),
    "vesselmnist3d": (["vessel", "aneurysm"], "MRA"),
    "organmnist3d": (["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                      "lung-left", "lung-right", "pancreas", "spleen"], "CT"),
    "fracturemnist3d": (None, "CT"),
    "synapsemnist3d": (None, "EM"),
    "organamnist": (None, "CT"), "organcmnist": (None, "CT"), "organsmnist": (None, "CT"),
    "dermamnist": (None, "dermatoscopy"), "bloodmnist": (None, "microscopy"), "pathmnist": (None, "histology"),
    "octmnist": (None, "OCT"), "retinamnist": (None, "fundus"), "tissuemnist": (None, "microscopy"),
}
MEDMNIST_SPLITS = {"train": "training", "val": "validation", "test": "test"}


def _common_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-names", default=None, help="comma-separated class names in label order")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None,
                   help="override the 2D/3D guess from the array shape")
    p.add_argument("--modality", default=None, help="modality string for the header")


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register the ``medmnist`` and ``npz`` subcommands."""
    p = sub.add_parser(
        "medmnist", parents=[common], help="MedMNIST v2 npz (2D or 3D, any size), official splits kept",
        description="MedMNIST npz -> PNG (2D) or NIfTI (3D) files in <stem>_images/ next to --out, plus a datalist "
                    "with the official train/val/test splits.",
        epilog="example: python -m data_prep medmnist breastmnist.npz --out breast/breastmnist.json",
    )
    _common_opts(p)
    p.set_defaults(scan=scan_medmnist)

    q = sub.add_parser(
        "npz", parents=[common], help="generic npz with images/labels arrays, seeded stratified splits",
        description="Generic npz (arrays 'images' (N,H,W[,C]) or (N,D,H,W) and 'labels' (N,) or (N,1)) -> image "
                    "files plus a datalist with seeded, stratified splits.",
        epilog="example: python -m data_prep npz mnist_5k.npz --out mnist5k/mnist5k.json --test-count 1000 "
               "--val-count 0",
    )
    _common_opts(q)
    q.add_argument("--images-key", default="images", help="array name of the images (default: images)")
    q.add_argument("--labels-key", default="labels", help="array name of the labels (default: labels)")
    q.add_argument("--test-count", type=int, default=None, help="images carved for test (exact)")
    q.add_argument("--test-fraction", type=float, default=None, help="fraction carved for test (default 0.2)")
    q.add_argument("--val-count", type=int, default=None, help="images carved from the rest for validation")
    q.add_argument("--val-fraction", type=float, default=None, help="fraction carved for validation (default 0.1)")
    q.set_defaults(scan=scan_npz)


def _load_npz(src: Path) -> Any:
    if not src.is_file():
        raise LayoutError(f"SRC {src} is not a file; the npz layouts take the .npz file itself")
    try:
        return np.load(src, allow_pickle=False)  # never unpickle: an npz from the internet must not run code
    except Exception as exc:
        raise LayoutError(f"{src}: cannot be read as an npz file ({type(exc).__name__}: {exc})") from exc


def _guess_dims(images: np.ndarray, name: str, override: int | None) -> tuple[int, bool]:
    """Return ``(spatial_dims, channels_last)`` for an (N, ...) image array."""
    shape = images.shape
    if override == 2:
        if images.ndim == 3:
            return 2, False
        if images.ndim == 4 and shape[-1] in (1, 3, 4):
            return 2, True
        raise LayoutError(f"{name}: shape {shape} cannot be 2D images (expected (N,H,W) or (N,H,W,C))")
    if override == 3:
        if images.ndim == 4:
            return 3, False
        if images.ndim == 5 and shape[-1] in (1, 3, 4):
            return 3, True
        raise LayoutError(f"{name}: shape {shape} cannot be 3D volumes (expected (N,D,H,W) or (N,D,H,W,C))")
    if images.ndim == 3:
        return 2, False
    if images.ndim == 4:
        if shape[-1] in (3, 4) and shape[1] == shape[2] and shape[3] != shape[1]:
            return 2, True
        return 3, False
    if images.ndim == 5:
        return 3, True
    raise LayoutError(f"{name}: images of shape {shape} are neither 2D nor 3D; pass --spatial-dims")


def _labels(arr: np.ndarray, name: str) -> tuple[list[Any], bool]:
    """Return per-image labels (int, or list for multi-label) and whether the task is multi-label."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 1:
        if not np.issubdtype(arr.dtype, np.integer):
            if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
                arr = arr.astype(np.int64)
            else:
                raise LayoutError(f"{name}: labels must be integers (got dtype {arr.dtype})")
        if arr.min() < 0:
            raise LayoutError(f"{name}: negative label value {int(arr.min())}; labels must be 0..K-1")
        return [int(v) for v in arr], False
    if arr.ndim == 2:
        vals = set(np.unique(arr).tolist())
        if not vals <= {0, 1}:
            raise LayoutError(f"{name}: multi-label arrays must be 0/1 (found values {sorted(vals)[:10]})")
        return [[int(v) for v in row] for row in arr], True
    raise LayoutError(f"{name}: labels of shape {arr.shape} are not understood")


def _encode(img: np.ndarray, dims: int, channels_last: bool) -> tuple[bytes, str]:
    """Encode one image as PNG bytes (2D) or gzipped NIfTI bytes (3D)."""
    if dims == 2:
        from PIL import Image

        a = img[..., 0] if channels_last and img.shape[-1] == 1 else img
        if a.dtype == np.uint8:
            pil = Image.fromarray(a)
        elif a.dtype == np.uint16 and a.ndim == 2:
            pil = Image.fromarray(a)  # 16-bit greyscale PNG
        elif a.dtype == np.bool_:
            pil = Image.fromarray(a.astype(np.uint8) * 255)
        else:
            raise LayoutError(f"2D images of dtype {a.dtype} cannot be written as PNG losslessly; convert to uint8")
        buf = io.BytesIO()
        pil.save(buf, format="PNG", optimize=False)
        return buf.getvalue(), ".png"
    import nibabel as nib

    # channels-last (D,H,W,C) is already NIfTI's convention (channels in the 4th dimension)
    nii = nib.Nifti1Image(np.ascontiguousarray(img), np.eye(4))
    nii.header.set_xyzt_units("mm")
    return gzip_deterministic(nii.to_bytes()), ".nii.gz"


def _write_images(staging: StagingDir, final_dir: Path, images: np.ndarray, names: list[str], dims: int,
                  channels_last: bool, progress: bool, desc: str) -> list[tuple[Path, Path]]:
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(len(images)), desc=desc, unit="img", disable=not progress, leave=False):
        data, ext = _encode(images[i], dims, channels_last)
        rel = names[i] + ext
        # plain writes: the whole staging folder is swapped in atomically afterwards (StagingDir.commit)
        target = staging.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        out.append((final_dir / rel, staging.path / rel))
    return out


def _class_names(n_classes: int, given: list[str] | None, known: list[str] | None, what: str) -> list[str]:
    names = given or known or [str(i) for i in range(n_classes)]
    if len(names) < n_classes:
        raise LayoutError(
            f"{what}: labels go up to {n_classes - 1} but only {len(names)} class name(s) were given "
            f"({', '.join(names)}); fix --class-names"
        )
    return names


def _subset_key(src: Path) -> str:
    stem = src.name[:-4] if src.name.endswith(".npz") else src.stem
    for suffix in ("_28", "_64", "_128", "_224"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem.lower()


def scan_medmnist(args: argparse.Namespace) -> Scan:
    """Convert a MedMNIST npz (official splits)."""
    src = Path(args.src)
    z = _load_npz(src)
    needed = [f"{s}_{k}" for s in MEDMNIST_SPLITS for k in ("images", "labels")]
    missing = [k for k in needed if k not in z.files]
    if missing:
        raise LayoutError(
            f"{src} is not a MedMNIST npz: missing array(s) {', '.join(missing)} (found: {', '.join(z.files)}). "
            "For an npz with 'images'/'labels' use the 'npz' subcommand."
        )
    key = _subset_key(src)
    known_names, known_mod = MEDMNIST_INFO.get(key, (None, "unknown"))
    out = Path(args.out).absolute()
    final_dir = out.parent / f"{out.stem}_images"
    staging = StagingDir(final_dir)
    try:
        records: list[Record] = []
        dims = None
        multilabel = False
        n_classes = 0
        for short, split in MEDMNIST_SPLITS.items():
            images = z[f"{short}_images"]
            labels, multilabel = _labels(z[f"{short}_labels"], f"{src}:{short}_labels")
            if len(labels) != len(images):
                raise LayoutError(f"{src}: {short}_images has {len(images)} entries but {short}_labels {len(labels)}")
            d, ch_last = _guess_dims(images, f"{src}:{short}_images", args.spatial_dims)
            if dims is not None and d != dims:
                raise LayoutError(f"{src}: the splits disagree on 2D/3D")
            dims = d
            n_classes = max(n_classes, len(labels[0]) if multilabel else (max(labels) + 1 if labels else 0))
            names = [f"{short}/{i:06d}" for i in range(len(images))]
            paths = _write_images(staging, final_dir, images, names, d, ch_last, args.progress,
                                  f"medmnist: writing {short}")
            for (final, tmp), lab in zip(paths, labels):
                records.append(Record(path=final, label=lab, split=split, read_path=tmp))
        class_names = _class_names(n_classes, parse_class_map(args.class_names), known_names, str(src))
        task = "multilabel" if multilabel else ("binary" if len(class_names) == 2 else "multiclass")
        shape = z["train_images"].shape[1:]
        return Scan(
            layout="medmnist", records=records, class_names=class_names, task=task, spatial_dims=dims,
            modality=args.modality or known_mod,
            description=f"MedMNIST v2 {key} ({'x'.join(map(str, shape))}), Yang et al. 2023, CC BY 4.0",
            options={"subset": key, "spatial_dims": args.spatial_dims, "class_names": args.class_names},
            staging=staging, official={"training", "validation", "test"},
        )
    except BaseException:
        staging.abort()
        raise


def scan_npz(args: argparse.Namespace) -> Scan:
    """Convert a generic npz with one images array and one labels array (splits are carved)."""
    src = Path(args.src)
    z = _load_npz(src)
    for key, opt in ((args.images_key, "--images-key"), (args.labels_key, "--labels-key")):
        if key not in z.files:
            raise LayoutError(f"{src} has no array '{key}' (found: {', '.join(z.files)}); set {opt}")
    images = z[args.images_key]
    labels, multilabel = _labels(z[args.labels_key], f"{src}:{args.labels_key}")
    if len(labels) != len(images):
        raise LayoutError(f"{src}: '{args.images_key}' has {len(images)} entries but '{args.labels_key}' {len(labels)}")
    dims, ch_last = _guess_dims(images, f"{src}:{args.images_key}", args.spatial_dims)
    if args.test_count is None and args.test_fraction is None:
        args.test_fraction = 0.2
    if args.val_count is None and args.val_fraction is None:
        args.val_fraction = 0.1
    out = Path(args.out).absolute()
    final_dir = out.parent / f"{out.stem}_images"
    staging = StagingDir(final_dir)
    try:
        width = max(5, len(str(len(images) - 1)))
        names = [f"{i:0{width}d}" for i in range(len(images))]
        paths = _write_images(staging, final_dir, images, names, dims, ch_last, args.progress, "npz: writing")
        records = [Record(path=f, label=lab, read_path=t) for (f, t), lab in zip(paths, labels)]
        n_classes = len(labels[0]) if multilabel else max(labels) + 1
        class_names = _class_names(n_classes, parse_class_map(args.class_names), None, str(src))
        task = "multilabel" if multilabel else ("binary" if len(class_names) == 2 else "multiclass")
        return Scan(
            layout="npz", records=records, class_names=class_names, task=task, spatial_dims=dims,
            modality=args.modality or "unknown",
            description=f"{'SRC' if getattr(args, 'pseudonymize_paths', False) else src.name}: {len(images)} images "
                        f"{'x'.join(map(str, images.shape[1:]))} converted by data_prep",
            options={"images_key": args.images_key, "labels_key": args.labels_key, "spatial_dims": args.spatial_dims,
                     "class_names": args.class_names},
            staging=staging,
        )
    except BaseException:
        staging.abort()
        raise
