"""Rebuild the embedded demo sample from a Kermany chest X-ray download (not needed to run anything).

    python bundle/sample/make_sample.py ../shared/data/kermany_chest_xray bundle/sample/kermany64

Takes a seeded random set of patients per class from ``SRC/train``, downsamples each image to 64x64 grayscale JPEG,
and writes ``datalist.json`` with a patient-grouped train/validation/test split (60/20/20 of patients). Patient IDs
come from the file names (``personN_...`` for pneumonia, ``IM-XXXX``/``NORMAL2-IM-XXXX`` for normal) and are only
used for grouping; the datalist carries a salted hash.

Data: Kermany, Zhang, Goldbaum, "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images for
Classification", Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

from PIL import Image

CLASSES = ["NORMAL", "PNEUMONIA"]
IMAGES_PER_CLASS = 240
SIZE = 64
SALT = "ffcl-monai-sample"


def patient_of(name: str) -> str:
    m = re.match(r"(person\d+)_", name) or re.match(r"((?:NORMAL2-)?IM-\d+)-", name)
    if not m:
        raise ValueError(f"cannot parse a patient id from {name}")
    return m.group(1)


def main(src: str, out: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    out_dir = Path(out)
    entries = []
    for label, cls in enumerate(CLASSES):
        files = sorted((Path(src) / "train" / cls).glob("*.jpeg"))
        by_patient: dict[str, list[Path]] = {}
        for f in files:
            by_patient.setdefault(patient_of(f.name), []).append(f)
        patients = sorted(by_patient)
        rng.shuffle(patients)
        chosen: list[tuple[str, Path]] = []
        for p in patients:
            if len(chosen) >= IMAGES_PER_CLASS:
                break
            chosen.extend((p, f) for f in by_patient[p][: IMAGES_PER_CLASS - len(chosen)])
        for p, f in chosen:
            entries.append((label, cls, p, f))
    patients = sorted({(label, p) for label, _, p, _ in entries})
    rng.shuffle(patients)
    split_of = {}
    for label in range(len(CLASSES)):
        ps = [p for lab, p in patients if lab == label]
        n = len(ps)
        for i, p in enumerate(ps):
            split_of[p] = "training" if i < 0.6 * n else "validation" if i < 0.8 * n else "test"
    content: dict = {
        "name": "kermany64_sample",
        "description": "480 Kermany pediatric chest X-rays (training split of the original), 64 px grayscale, "
        "patient-grouped 60/20/20 split. CC BY 4.0, doi:10.17632/rscbjbr9sj.2",
        "task": "binary",
        "labels": {str(i): c for i, c in enumerate(CLASSES)},
        "num_classes": len(CLASSES),
        "spatial_dims": 2,
        "modality": "CXR",
        "training": [],
        "validation": [],
        "test": [],
    }
    for label, cls, p, f in sorted(entries, key=lambda e: (e[1], e[3].name)):
        rel = Path(cls) / f.name
        (out_dir / cls).mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(out_dir / rel, quality=90)
        pid = hashlib.sha256((SALT + p).encode()).hexdigest()[:12]
        content[split_of[p]].append({"image": str(rel), "label": label, "patient": pid})
    content["counts"] = {
        s: {c: sum(1 for e in content[s] if e["label"] == i) for i, c in enumerate(CLASSES)}
        for s in ("training", "validation", "test")
    }
    (out_dir / "datalist.json").write_text(json.dumps(content, indent=2) + "\n")
    print(json.dumps(content["counts"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
