"""What a stand-in for the FFCL program (:func:`ffcl_monai.workflows.ffcl.run_ffcl`) writes, for the tests of the
programs over it (the ablation, the defaults study): the evaluate step's ``evaluate_<split>/{metrics.json,
predictions.csv}``, written by the evaluate workflow's own :class:`~ffcl_monai.handlers.reports.TestReport`, from
probabilities the test chooses. The tests then check the program's tables against those known predictions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def write_evaluations(overrides: Mapping[str, Any], splits: Iterable[str],
                      positive_probability: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Write ``evaluate_<split>`` under ``overrides["output_dir"]`` for each split of ``overrides["datalist"]``
    (binary task, classes A and B); ``positive_probability(split, labels)`` gives P(B) per image. Returns what
    ``run_ffcl`` returns."""
    from ffcl_monai.handlers.metrics import bootstrap_ci
    from ffcl_monai.handlers.reports import TestReport

    out = Path(overrides["output_dir"])
    dl = Path(overrides["datalist"])
    content = json.loads(dl.read_text())
    for split in splits:
        items = [{**it, "image": str(dl.parent / it["image"])} for it in content[split]]
        y = np.array([it["label"] for it in items])
        p1 = positive_probability(split, y)
        probs = np.stack([1 - p1, p1], 1)
        rep = TestReport(items, out / f"evaluate_{split}", "binary", ["A", "B"], datalist_dir=str(dl.parent))
        rep.metrics = bootstrap_ci(probs, y, "binary", ["A", "B"], n_bootstrap=20)
        rep.write_files(probs, y)
    return {"wall_s": 2.0, "output_dir": str(out)}
