"""data_prep medmnist / npz: PNG (2D) and NIfTI (3D) outputs, official and carved splits, determinism."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main
from data_prep._testing import private_salt_file


@pytest.fixture(autouse=True)
def _salt_file_in_tmp(tmp_path_factory, monkeypatch):
    """Generated salts go to a temporary file, never to ~/.config."""
    private_salt_file(monkeypatch, tmp_path_factory.mktemp("salt"))


def _medmnist(path: Path, shape: tuple[int, ...], n=(20, 6, 8), n_classes=2, multilabel=0, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
        if multilabel:
            arrays[f"{split}_labels"] = rng.integers(0, 2, size=(k, multilabel), dtype=np.uint8)
        else:
            lab = np.arange(k) % n_classes
            arrays[f"{split}_labels"] = lab.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_medmnist_2d(tmp_path):
    src = _medmnist(tmp_path / "breastmnist.npz", (8, 8))
    out = tmp_path / "dl" / "breast.json"
    assert main(["medmnist", str(src), "--out", str(out), "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["sizes"] == {"training": 20, "validation": 6, "test": 8}
    assert d["labels"] == {"0": "malignant", "1": "normal, benign"} and d["modality"] == "US"
    assert d["spatial_dims"] == 2 and d["data_prep"]["carved"] == []
    e = d["training"][3]
    img = np.asarray(Image.open(out.parent / e["image"]))
    assert img.shape == (8, 8)
    z = np.load(src)
    idx = int(Path(e["image"]).stem)
    assert np.array_equal(img, z["train_images"][idx]) and e["label"] == int(z["train_labels"][idx, 0])
    assert "patient" not in e  # MedMNIST has no patient IDs; none are invented
    # byte-identical re-run, images included
    before = (out.read_bytes(), _digest_tree(out.parent / "breast_images"))
    assert main(["medmnist", str(src), "--out", str(out), "--no-progress"]) == 0
    assert (out.read_bytes(), _digest_tree(out.parent / "breast_images")) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["breast.json", "breast_images"]


def test_medmnist_3d_and_rgb_and_multilabel(tmp_path):
    src = _medmnist(tmp_path / "adrenalmnist3d_64.npz", (6, 7, 5))
    out = tmp_path / "a3d.json"
    assert main(["medmnist", str(src), "--out", str(out), "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["spatial_dims"] == 3 and d["labels"] == {"0": "normal", "1": "hyperplasia"}
    e = d["test"][0]
    assert e["image"].endswith(".nii.gz")
    vol = np.asanyarray(nib.load(str(tmp_path / e["image"])).dataobj)
    assert vol.shape == (6, 7, 5)

    rgb = _medmnist(tmp_path / "dermamnist.npz", (8, 8, 3), n_classes=7, n=(28, 7, 7))
    assert main(["medmnist", str(rgb), "--out", str(tmp_path / "rgb.json"), "--no-progress"]) == 0
    d = json.loads((tmp_path / "rgb.json").read_text())
    assert d["spatial_dims"] == 2 and d["num_classes"] == 7 and d["task"] == "multiclass"

    ml = _medmnist(tmp_path / "chestmnist.npz", (8, 8), multilabel=14, n=(30, 6, 6))
    assert main(["medmnist", str(ml), "--out", str(tmp_path / "ml.json"), "--no-progress"]) == 0
    d = json.loads((tmp_path / "ml.json").read_text())
    assert d["task"] == "multilabel" and len(d["training"][0]["label"]) == 14


def test_npz_generic_stratified_exact(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "digits.npz"
    np.savez(src, images=rng.integers(0, 256, size=(100, 6, 6), dtype=np.uint8), labels=np.repeat(np.arange(5), 20))
    out = tmp_path / "d.json"
    assert main(["npz", str(src), "--out", str(out), "--test-count", "20", "--val-count", "0", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["sizes"] == {"training": 80, "validation": 0, "test": 20}
    assert Counter(e["label"] for e in d["test"]) == {c: 4 for c in range(5)}
    out2 = tmp_path / "d2.json"
    assert main(["npz", str(src), "--out", str(out2), "--test-count", "20", "--val-fraction", "0.25",
                 "--no-progress"]) == 0
    d2 = json.loads(out2.read_text())
    assert d2["sizes"] == {"training": 60, "validation": 20, "test": 20}
    # carving validation does not change the test split (test is carved first, with its own seed)
    assert {Path(e["image"]).name for e in d2["test"]} == {Path(e["image"]).name for e in d["test"]}
    assert d2["data_prep"]["carved"] == ["test", "validation"]


@pytest.mark.parametrize("arrays, msg", [
    ({"x": np.zeros((3, 4, 4), np.uint8)}, "has no array 'images'"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0, 1])}, "has 3 entries but 'labels' 2"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.array([0.5, 1, 0])}, "must be integers"),
])
def test_npz_errors(tmp_path, capsys, arrays, msg):
    src = tmp_path / "bad.npz"
    np.savez(src, **arrays)
    assert main(["npz", str(src), "--out", str(tmp_path / "o" / "x.json"), "--no-progress"]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # staging cleaned up


def test_medmnist_rejects_plain_npz(tmp_path, capsys):
    src = tmp_path / "plain.npz"
    np.savez(src, images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(3, np.uint8))
    assert main(["medmnist", str(src), "--out", str(tmp_path / "x.json"), "--no-progress"]) == 2
    assert "not a MedMNIST npz" in capsys.readouterr().err
