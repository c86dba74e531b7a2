"""Builders of tiny synthetic raw layouts, used by the test-suite (``tests/test_data_prep_*.py``).

Everything here writes into a folder the caller owns (pytest's ``tmp_path``); nothing reads ``../shared``.
Images are seeded noise, so every file has distinct bytes unless a test copies one on purpose.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np


def make_image(
    path: Path, seed: int, size: tuple[int, int] = (12, 12), mode: str = "RGB", fmt: str | None = None
) -> Path:
    """Write a small noise image (JPEG/PNG by suffix)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(arr).convert(mode).save(path, format=fmt, **extra)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its size (a download that stopped half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


def make_kermany(root: Path, test: bool = False, val: bool = False, seed: int = 0) -> Path:
    """A Kermany-style tree with multi-image patients.

    train/: 12 NORMAL patients (IM-XXXX, 1-3 images, two NORMAL2-IM ones) and 16 PNEUMONIA patients
    (personN, bacteria and virus, 1-4 images; person3 has both kinds). test/ and val/ use other patient numbers.
    """
    k = seed * 100_000

    def put(split: str, cls: str, name: str) -> None:
        nonlocal k
        k += 1
        make_image(root / split / cls / name, k)

    for p in range(12):
        prefix = "NORMAL2-IM" if p in (3, 7) else "IM"
        for j in range(1 + p % 3):
            put("train", "NORMAL", f"{prefix}-{100 + p:04d}-{j + 1:04d}.jpeg")
    img = 0
    for p in range(16):
        for j in range(1 + p % 4):
            kind = "virus" if (p % 3 == 0) else "bacteria"
            if p == 3 and j == 0:
                kind = "virus" if kind == "bacteria" else "bacteria"
            img += 1
            put("train", "PNEUMONIA", f"person{p + 1}_{kind}_{img}.jpeg")
    if test:
        for p in range(4):
            put("test", "NORMAL", f"IM-{p + 1:04d}-0001.jpeg")
        for p in range(6):
            put("test", "PNEUMONIA", f"person{500 + p}_{'virus' if p % 2 else 'bacteria'}_{900 + p}.jpeg")
    if val:
        put("val", "NORMAL", "NORMAL2-IM-1427-0001.jpeg")
        put("val", "PNEUMONIA", "person1946_bacteria_4874.jpeg")
    return root


CHEXPERT_OBS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
]


def make_chexpert(root: Path, n_patients: int = 12, seed: int = 0) -> Path:
    """``root/CheXpert-v1.0-small/{train.csv,valid.csv,train/...,valid/...}`` with uncertain (-1) and blank cells."""
    ds = root / "CheXpert-v1.0-small"
    rng = np.random.default_rng(seed)
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBS]
    k = 0
    for split, n in (("train", n_patients), ("valid", 3)):
        rows = []
        for p in range(n):
            pid = p + 1 if split == "train" else 64541 + p
            for study in range(1 + p % 2):
                views = (("view1_frontal", "Frontal", "AP" if p % 2 else "PA"), ("view2_lateral", "Lateral", ""))
                for view, fl, ap in views:
                    if view == "view2_lateral" and p % 3:
                        continue
                    rel = f"CheXpert-v1.0-small/{split}/patient{pid:05d}/study{study + 1}/{view}.jpg"
                    k += 1
                    make_image(root / rel, 10_000 + k, mode="L")
                    vals = rng.choice(["1.0", "0.0", "-1.0", ""], size=len(CHEXPERT_OBS), p=[0.2, 0.3, 0.2, 0.3])
                    if split == "valid":
                        vals = rng.choice(["1.0", "0.0"], size=len(CHEXPERT_OBS))
                    sex = ["Male", "Female", "Unknown"][p % 3]
                    rows.append([rel, sex, str(20 + p), fl, ap, *vals])
        with open(ds / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return ds


NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]


def make_nih(root: Path, n_patients: int = 16, official_lists: bool = True, seed: int = 0) -> Path:
    """``root/Data_Entry_2017.csv`` + ``images_001/images/*.png`` (+ official lists) with multi-image patients."""
    rng = np.random.default_rng(seed)
    rows, train, test = [], [], []
    k = 0
    for p in range(n_patients):
        for fu in range(1 + p % 3):
            k += 1
            name = f"{p + 1:08d}_{fu:03d}.png"
            make_image(root / "images_001" / "images" / name, 20_000 + k, mode="L")
            n_find = int(rng.integers(0, 3))
            finds = sorted(set(rng.choice(NIH_FINDINGS, size=n_find))) if n_find else ["No Finding"]
            rows.append([name, "|".join(finds), str(fu), str(p + 1), str(30 + p), "M" if p % 2 else "F",
                         "PA" if fu % 2 == 0 else "AP", "2500", "2048", "0.143", "0.143"])
            (test if p >= n_patients - 4 else train).append(name)
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    if official_lists:
        (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
        (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def make_dicom_series(folder: Path, n_slices: int, patient_id: str, patient_name: str, seed: int,
                      template: str = "CT_small.dcm") -> Path:
    """A DICOM series built from pydicom's bundled test file, with fresh UIDs, positions and pixels."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file(template))
    rng = np.random.default_rng(seed)
    series_uid = generate_uid(entropy_srcs=[f"series-{seed}"])
    folder.mkdir(parents=True, exist_ok=True)
    arr0 = base.pixel_array
    for i in range(n_slices):
        ds = base.copy()
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.PatientBirthDate = "19700101"
        ds.InstitutionName = "St Example Hospital"
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"sop-{seed}-{i}"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-50.0, -60.0, 10.0 + 2.5 * i]
        ds.PixelSpacing = [0.7, 0.8]
        ds.SliceThickness = 2.5
        noise = rng.integers(0, 50, size=arr0.shape).astype(arr0.dtype)
        ds.PixelData = (arr0 + noise).astype(arr0.dtype).tobytes()
        # shuffled file names: the converter must sort by position, not by name
        ds.save_as(folder / f"slice_{(i * 7) % n_slices:03d}.dcm", enforce_file_format=True)
    return folder


def private_salt_file(monkeypatch, folder: Path) -> Path:
    """Point data_prep's salt file into ``folder`` and clear ``$DATA_PREP_SALT``, so tests never touch ~/.config."""
    monkeypatch.delenv("DATA_PREP_SALT", raising=False)
    path = folder / "data_prep_salt"
    monkeypatch.setenv("DATA_PREP_SALT_FILE", str(path))
    return path


def tree_fingerprint(root: Path) -> dict[str, tuple[int, float, str]]:
    """(size, mtime, sha256) of every file under root, to prove a command changed nothing there."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
