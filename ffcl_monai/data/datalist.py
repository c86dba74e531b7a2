"""Loading and validating MONAI decathlon datalists before any training time is spent.

A datalist is the JSON written by ``python -m data_prep`` (format in docs/conventions.md). Validation here is
deliberately cheap (existence, labels, header) so that it can run at every start; opening every image is the job
of ``python -m data_prep check``. Images are opened during caching, where :mod:`ffcl_monai.data.transforms` turns
read errors into messages naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from ffcl_monai.errors import UserInputError
from ffcl_monai.workflows.untrusted import header_class_names, header_overrides, header_volume_preset

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
TASKS = ("binary", "multiclass", "multilabel")


class DatalistError(UserInputError):
    """A datalist problem, with a message that names the file, entry or config key and the fix."""


def read_header(datalist: str | os.PathLike) -> dict[str, Any]:
    """The datalist's header: every top-level key except the split lists."""
    path = Path(datalist)
    if not path.is_file():
        raise DatalistError(
            f"datalist {path} does not exist. Pass `--datalist path/to/datalist.json` (make one with "
            "`python -m data_prep <layout> SRC --out datalist.json`)."
        )
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatalistError(f"datalist {path} is not valid JSON: {e}") from e
    return {k: v for k, v in content.items() if k not in SPLITS}


def class_names_from_header(header: dict[str, Any], where: str = "datalist header") -> list[str] | None:
    """Class names in index order from the header's ``labels`` mapping, if present, as plain text.

    Header text is data: a name that a bundle config would evaluate (``$``/``@``/``%`` prefix) or a ``_target_`` dict
    is refused (:mod:`ffcl_monai.workflows.untrusted`), never passed on.
    """
    return header_class_names(header, where)


def check_header(
    datalist: str | os.PathLike, num_classes: int, spatial_dims: int, task: str, volume_preset: str | None = None
) -> dict[str, Any]:
    """Compare the datalist header with the config and fail with the override that fixes a mismatch.

    A 3D preset the header suggests (``data_prep volumes``: ``volumes.suggested_volume_preset``) that differs from the
    config's ``volume_preset`` is logged as a warning naming the override, never applied.
    """
    header = read_header(datalist)
    header_overrides(header, f"datalist {datalist} header")  # refuses config syntax anywhere in the header
    suggested = header_volume_preset(header, f"datalist {datalist} header")
    if suggested is not None and volume_preset is not None and int(spatial_dims) == 3:
        if suggested != str(volume_preset).strip().lower():
            v = header.get("volumes") or {}
            spacing = v.get("spacing_mm") if isinstance(v.get("spacing_mm"), dict) else {}
            logger.warning(
                f"datalist {datalist}: data_prep recorded {v.get('modality')} volumes (orientations "
                f"{v.get('orientations')}, spacing {spacing.get('min')}..{spacing.get('max')} mm) and suggests "
                f"`--volume_preset {suggested}`; this run uses volume_preset={volume_preset!r} (docs/3d_presets.md)."
            )
    if task not in TASKS:
        raise DatalistError(f"config key `task` is {task!r}; it must be one of {TASKS}.")
    hdr_classes = header.get("num_classes")
    if hdr_classes is not None and int(hdr_classes) != int(num_classes):
        names = class_names_from_header(header, f"datalist {datalist} header")
        raise DatalistError(
            f"datalist {datalist} has {hdr_classes} classes {names or ''} but the config has num_classes={num_classes}. "
            f"Add `--num_classes {hdr_classes}` (and `--class_names \"{names}\"`) to the command."
        )
    hdr_dims = header.get("spatial_dims")
    if hdr_dims is not None and int(hdr_dims) != int(spatial_dims):
        overlay = "bundle/configs/3d.yaml" if int(hdr_dims) == 3 else "no 3d.yaml overlay"
        raise DatalistError(
            f"datalist {datalist} holds {hdr_dims}D images but the config has spatial_dims={spatial_dims}. "
            f"Use {overlay} in --config_file (or `--spatial_dims {hdr_dims}`)."
        )
    hdr_task = header.get("task")
    if hdr_task is not None and hdr_task != task and not (hdr_task in ("binary", "multiclass") and task != "multilabel"):
        raise DatalistError(f"datalist {datalist} is a {hdr_task} task but the config has task={task!r}; pass `--task {hdr_task}`.")
    return header


def _check_label(label: Any, num_classes: int, task: str, where: str) -> None:
    if task == "multilabel":
        if not isinstance(label, (list, tuple)) or len(label) != num_classes:
            raise DatalistError(
                f"{where}: multi-label `label` must be a list of {num_classes} values (0, 1, or -1 to ignore), got {label!r}."
            )
        bad = [v for v in label if v not in (0, 1, -1, 0.0, 1.0, -1.0)]
        if bad:
            raise DatalistError(f"{where}: multi-label values must be 0, 1 or -1 (ignore), got {bad}.")
        return
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) and not (
        isinstance(label, float) and float(label).is_integer()
    ):
        raise DatalistError(f"{where}: `label` must be an integer class index, got {label!r}.")
    if not 0 <= int(label) < num_classes:
        raise DatalistError(
            f"{where}: label {label} is outside the configured classes 0..{num_classes - 1}. Fix the datalist, or "
            f"set `--num_classes` to the real number of classes."
        )


def stratified_subset(items: list[dict], fraction: float, seed: int) -> list[dict]:
    """A seeded, class-stratified subset holding ``fraction`` of the items (at least one per class).

    Used for label-efficiency curves (``label_fraction``). Multi-label items are stratified on their first positive
    label; unlabeled items are sampled uniformly.
    """
    if not 0 < fraction <= 1:
        raise DatalistError(f"`label_fraction` must be in (0, 1], got {fraction}.")
    if fraction == 1:
        return list(items)
    rng = np.random.default_rng(seed)

    def key(d: dict) -> Any:
        lab = d.get("label")
        if isinstance(lab, (list, tuple)):
            return next((i for i, v in enumerate(lab) if v == 1), -1)
        return lab

    groups: dict[Any, list[int]] = {}
    for i, d in enumerate(items):
        groups.setdefault(key(d), []).append(i)
    chosen: list[int] = []
    for k in sorted(groups, key=str):
        idx = groups[k]
        n = max(1, int(round(fraction * len(idx))))
        chosen.extend(rng.choice(idx, size=n, replace=False).tolist())
    return [items[i] for i in sorted(chosen)]


def _class_name(i: int, names: list[str] | None) -> str:
    return f"{i} ({names[i]})" if names and i < len(names) else str(i)


def check_auc_split(
    items: list[dict[str, Any]], num_classes: int, task: str, where: str, class_names: list[str] | None = None
) -> None:
    """Refuse a split on which the ROC-AUC that selects the best model is undefined; warn when it is partial.

    - binary / multiclass: fewer than two classes present -> :class:`DatalistError`; a class missing from a
      multiclass split only warns (the macro AUC then leaves it out).
    - multilabel: no label with both positives and negatives -> :class:`DatalistError`; a label without positives or
      without negatives (ignoring -1) only warns (its AUC is left out of the macro mean).

    Args:
        items: the split's entries (validated labels).
        num_classes: number of classes / labels.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        where: the datalist and split, named in the message.
        class_names: names shown next to the class indices.
    """
    fix = (
        "Re-create the split stratified by class (`python -m data_prep <layout> SRC --out datalist.json --val-count N` "
        "carves a stratified validation split) or add images of the missing class(es) to it."
    )
    if task == "multilabel":
        labels = np.array([it["label"] for it in items], dtype=np.float64).reshape(len(items), -1)
        pos, neg = (labels == 1).sum(axis=0), (labels == 0).sum(axis=0)
        partial = [j for j in range(labels.shape[1]) if not (pos[j] and neg[j])]
        if len(partial) == labels.shape[1]:
            raise DatalistError(
                f"{where}: no label has both positive and negative images ({len(items)} images), so the validation AUC "
                f"that selects the best model is undefined. {fix}"
            )
        if partial:
            shown = ", ".join(f"{_class_name(j, class_names)}: {int(pos[j])} pos / {int(neg[j])} neg" for j in partial)
            warnings.warn(
                f"{where}: label(s) without positives or without negatives: {shown}. Their AUC is undefined and left "
                f"out of the macro AUC that selects the best model. {fix}",
                stacklevel=2,
            )
        return
    counts = Counter(int(it["label"]) for it in items)
    missing = [c for c in range(num_classes) if c not in counts]
    if len(counts) < 2:
        present = ", ".join(_class_name(c, class_names) for c in sorted(counts))
        raise DatalistError(
            f"{where}: all {len(items)} images are of class {present}; the validation AUC that selects the best model "
            f"needs at least two classes (missing: {', '.join(_class_name(c, class_names) for c in missing)}). {fix}"
        )
    if missing:
        warnings.warn(
            f"{where}: no images of class(es) {', '.join(_class_name(c, class_names) for c in missing)}; their AUC is "
            f"left out of the macro AUC that selects the best model. {fix}",
            stacklevel=2,
        )


def load_datalist(
    datalist: str | os.PathLike,
    split: str = "training",
    num_classes: int | None = None,
    task: str = "binary",
    require_labels: bool = True,
    label_fraction: float = 1.0,
    seed: int = 0,
    base_dir: str | os.PathLike | None = None,
    require_auc: bool | None = None,
    fields: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Load one split of a decathlon datalist with absolute image paths, validated.

    Args:
        datalist: the JSON file.
        split: ``training``, ``validation`` or ``test``.
        num_classes: when given (and labels are required), every label is checked against it.
        task: ``binary``, ``multiclass`` or ``multilabel``.
        require_labels: fail on entries without ``label`` (classification); pretraining passes False.
        label_fraction: keep a seeded, stratified fraction of the entries (label-efficiency studies).
        seed: seed of that subset.
        base_dir: folder that relative paths are relative to (default: the JSON's folder).
        require_auc: refuse a split whose ROC-AUC is undefined (:func:`check_auc_split`). Default: on for the
            ``validation`` split of labelled data, which selects the best model by AUC, so such a run stops when the
            split is loaded, before any epoch.
        fields: keep only these keys of each entry (e.g. ``["image", "label"]`` for a classifier). Datalists carry
            more than a workflow reads: auxiliary metadata with nulls (``--metadata``), a ``label_mask`` on only the
            entries that have an ignored label, a patient pseudonym. Such keys, present in some entries only or
            holding None, cannot be collated into a batch.

    Raises:
        DatalistError: naming the datalist entry and the fix, for missing files, bad labels, an empty split or a
            validation split with a single class.
    """
    if split not in SPLITS:
        raise DatalistError(f"unknown split {split!r}; use one of {SPLITS}.")
    read_header(datalist)  # readable JSON, clear message otherwise
    content = json.loads(Path(datalist).read_text())
    if not content.get(split):
        present = {k: len(v) for k, v in content.items() if k in SPLITS}
        raise DatalistError(
            f"split {split!r} of datalist {datalist} is empty or missing (splits present: {present}). "
            "Re-create the datalist with that split (e.g. `python -m data_prep ... --val-count N`)."
        )
    items = load_decathlon_datalist(
        str(datalist), is_segmentation=False, data_list_key=split, base_dir=str(base_dir) if base_dir else None
    )
    missing = []
    for i, item in enumerate(items):
        where = f"datalist {datalist}, {split}[{i}] ({item.get('image')})"
        image = item.get("image")
        if not isinstance(image, str) or not image:
            raise DatalistError(f"{where}: entry has no `image` path.")
        if not os.path.exists(image):
            missing.append(f"{split}[{i}]: {image}")
        if require_labels:
            if "label" not in item:
                raise DatalistError(
                    f"{where}: entry has no `label`. Classification needs labels; unlabeled datalists are for pretraining."
                )
            if num_classes is not None:
                _check_label(item["label"], num_classes, task, where)
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatalistError(
            f"{len(missing)} image(s) listed in {datalist} do not exist:\n  {shown}{more}\n"
            "Paths are relative to the datalist's folder. Fix the paths or re-run data_prep."
        )
    if require_auc is None:
        require_auc = split == "validation" and require_labels
    if require_auc and num_classes is not None:
        names = class_names_from_header(read_header(datalist), f"datalist {datalist} header")
        check_auc_split(items, num_classes, task, f"datalist {datalist}, split {split!r}", names)
    if label_fraction < 1:
        items = stratified_subset(items, label_fraction, seed)
    if fields is not None:
        items = [{k: item[k] for k in fields if k in item} for item in items]
    return items


def split_summary(datalist: str | os.PathLike, class_names: list[str] | None = None) -> dict[str, Any]:
    """Counts per split and class (no paths, no patient identifiers): the dataset summary logged to MLflow."""
    content = json.loads(Path(datalist).read_text())
    summary: dict[str, Any] = {"datalist": os.path.basename(str(datalist))}
    for split in SPLITS:
        entries = content.get(split) or []
        counts: Counter = Counter()
        for e in entries:
            lab = e.get("label") if isinstance(e, dict) else None
            if isinstance(lab, list):
                for i, v in enumerate(lab):
                    if v == 1:
                        counts[class_names[i] if class_names and i < len(class_names) else str(i)] += 1
            elif lab is not None:
                counts[class_names[int(lab)] if class_names and int(lab) < len(class_names) else str(lab)] += 1
            else:
                counts["unlabeled"] += 1
        summary[split] = {"total": len(entries), "per_class": dict(sorted(counts.items()))}
    return summary


def inference_items(images: Any, datalist: str | os.PathLike | None = None, split: str = "test") -> list[dict[str, str]]:
    """Entries for the inference workflow: ``images`` (a list of paths or a glob pattern), else a datalist split.

    Raises:
        DatalistError: when no image is found or a listed file does not exist.
    """
    import glob

    if images:
        paths = sorted(glob.glob(images)) if isinstance(images, str) else [str(p) for p in images]
        if not paths:
            raise DatalistError(f"`images` {images!r} matches no file; pass a list of paths or a glob pattern.")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DatalistError(f"image(s) in `images` do not exist: {missing[:5]}")
        return [{"image": os.path.abspath(p)} for p in paths]
    if datalist is None:
        raise DatalistError("set `images` (paths or a glob) or `datalist` for the inference workflow.")
    return [{"image": d["image"]} for d in load_datalist(datalist, split, require_labels=False)]
