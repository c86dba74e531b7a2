"""data_prep kermany/oct2017 + check: splits, patient grouping, determinism, corrupt files, leakage, errors."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep._testing import make_image, make_kermany, private_salt_file, tree_fingerprint, truncate


@pytest.fixture(autouse=True)
def _salt_file_in_tmp(tmp_path_factory, monkeypatch):
    """Generated salts go to a temporary file, never to ~/.config."""
    private_salt_file(monkeypatch, tmp_path_factory.mktemp("salt"))


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def _patients_by_split(d: dict) -> dict[str, set[str]]:
    return {s: {e["patient"] for e in d[s]} for s in ("training", "validation", "test")}


@pytest.fixture(scope="module")
def kermany_src(tmp_path_factory) -> Path:
    return make_kermany(tmp_path_factory.mktemp("raw") / "chest_xray")


def test_kermany_counts_grouping_determinism_and_src_untouched(kermany_src, tmp_path, capsys):
    before = tree_fingerprint(kermany_src)
    out = tmp_path / "dl" / "k.json"
    assert main(["kermany", str(kermany_src), "--out", str(out), "--val-count", "9", "--no-progress"]) == 0
    d = _load(out)
    n_total = sum(1 for _ in kermany_src.rglob("*.jpeg"))
    assert d["sizes"] == {"training": n_total - 9, "validation": 9, "test": 0}
    assert d["task"] == "binary" and d["num_classes"] == 2 and d["spatial_dims"] == 2
    assert d["labels"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    assert d["data_prep"]["layout"] == "kermany" and d["data_prep"]["carved"] == ["validation"]
    # patient-grouped: no patient in two splits; multi-image patients exist, so this is not vacuous
    pats = _patients_by_split(d)
    assert not pats["training"] & pats["validation"]
    assert max(Counter(e["patient"] for e in d["training"]).values()) > 1
    # stratified: both classes in validation
    assert all(v > 0 for v in d["counts"]["validation"].values())
    # every path is relative to the JSON and resolves
    for s in ("training", "validation"):
        for e in d[s]:
            assert not os.path.isabs(e["image"]) and (out.parent / e["image"]).is_file()
            assert "person" not in e["patient"] and len(e["patient"]) == 16  # salted hash, not the raw id
    # byte-identical re-run, no temp files left behind, SRC unchanged
    first = out.read_bytes()
    assert main(["kermany", str(kermany_src), "--out", str(out), "--val-count", "9", "--no-progress"]) == 0
    assert out.read_bytes() == first
    assert sorted(os.listdir(out.parent)) == ["k.json"]
    assert tree_fingerprint(kermany_src) == before
    # a different seed gives a different validation set
    out2 = tmp_path / "dl" / "k2.json"
    assert main(["kermany", str(kermany_src), "--out", str(out2), "--val-count", "9", "--seed", "3",
                 "--no-progress"]) == 0
    assert _load(out2)["validation"] != d["validation"]
    assert main(["check", str(out), "--no-progress"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_kermany_three_classes_and_fraction(kermany_src, tmp_path):
    out = tmp_path / "k3.json"
    assert main(["kermany", str(kermany_src), "--out", str(out), "--classes", "3", "--val-fraction", "0.25",
                 "--no-progress"]) == 0
    d = _load(out)
    assert d["labels"] == {"0": "NORMAL", "1": "BACTERIA", "2": "VIRUS"} and d["task"] == "multiclass"
    for e in d["training"] + d["validation"]:
        name = Path(e["image"]).name
        assert e["label"] == (1 if "_bacteria_" in name else 2 if "_virus_" in name else 0)
    n = d["sizes"]["training"] + d["sizes"]["validation"]
    assert d["sizes"]["validation"] == round(0.25 * n)


def test_kermany_with_official_test_and_val(tmp_path):
    src = make_kermany(tmp_path / "raw", test=True, val=True)
    out = tmp_path / "o" / "k.json"
    assert main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--no-progress"]) == 0
    d = _load(out)
    assert d["sizes"]["test"] == 10 and all(e["image"].split("/")[-3] == "test" for e in d["test"])
    assert d["sizes"]["validation"] == 5
    assert not any("/test/" in e["image"] for e in d["training"] + d["validation"])  # never carved from test
    # the two official val/ images were merged into the training pool (default --official-val merge)
    assert any("/val/" in e["image"] for e in d["training"] + d["validation"])
    out_keep = tmp_path / "o" / "keep.json"
    assert main(["kermany", str(src), "--out", str(out_keep), "--official-val", "keep", "--no-progress"]) == 0
    assert _load(out_keep)["sizes"]["validation"] == 2


def test_truncated_jpeg_fails_and_names_file_then_drop_bad(kermany_src, tmp_path, capsys):
    src = tmp_path / "copy"
    shutil.copytree(kermany_src, src)
    bad = sorted((src / "train" / "PNEUMONIA").glob("*.jpeg"))[3]
    truncate(bad)
    out = tmp_path / "o" / "k.json"
    rc = main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    assert bad.name in captured.out and "truncated" in captured.out.lower()
    assert not out.exists()  # nothing written on failure
    assert main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--drop-bad", "--no-progress"]) == 0
    d = _load(out)
    assert [x["image"].split("/")[-1] for x in d["data_prep"]["dropped"]] == [bad.name]
    assert bad.name not in json.dumps(d["training"] + d["validation"])
    assert bad.exists()  # listed and excluded, never deleted


def test_leakage_duplicate_across_official_splits(kermany_src, tmp_path, capsys):
    src = tmp_path / "copy"
    shutil.copytree(kermany_src, src)
    make_image(src / "test" / "NORMAL" / "IM-9000-0001.jpeg", 777)
    dup = sorted((src / "train" / "NORMAL").glob("*.jpeg"))[0]
    shutil.copy(dup, src / "test" / "NORMAL" / "IM-9001-0001.jpeg")  # same bytes, other "patient": leakage
    make_image(src / "test" / "PNEUMONIA" / "person900_virus_1.jpeg", 778)
    out = tmp_path / "o" / "k.json"
    rc = main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1 and "LEAKAGE" in text and dup.name in text and not out.exists()
    assert main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--drop-duplicates",
                 "--no-progress"]) == 0
    d = _load(out)
    assert d["data_prep"]["dropped"][0]["image"].endswith(dup.name)
    assert d["sizes"]["test"] == 3


def test_duplicate_bytes_in_train_never_straddle_carved_split(tmp_path):
    # the same image filed under two different patients must land on one side of the carve
    src = make_kermany(tmp_path / "raw")
    a = sorted((src / "train" / "NORMAL").glob("*.jpeg"))[0]
    for i in range(3):
        shutil.copy(a, src / "train" / "NORMAL" / f"IM-{8000 + i:04d}-0001.jpeg")
    for seed in range(6):
        out = tmp_path / f"s{seed}.json"
        assert main(["kermany", str(src), "--out", str(out), "--val-count", "10", "--seed", str(seed),
                     "--no-progress"]) == 0


def test_check_reports_problems(kermany_src, tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["kermany", str(kermany_src), "--out", str(out), "--val-count", "6", "--no-progress"]) == 0
    d = _load(out)
    # a greyscale image among RGB ones, a training image repeated in validation, a 3D claim: all must be reported
    grey = make_image(tmp_path / "grey.png", 5, mode="L")
    d["training"].append({"image": "grey.png", "label": 0, "patient": "x"})
    d["validation"].append(dict(d["training"][0]))
    d["spatial_dims"] = 3
    d["counts"] = None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    assert main(["check", str(bad), "--no-progress", "--report-json", str(tmp_path / "rep.json")]) == 1
    text = capsys.readouterr().out
    assert "mixed channel counts" in text and "LEAKAGE" in text and "not 3D" in text and grey.name in text
    rep = _load(tmp_path / "rep.json")
    assert rep["ok"] is False
    # empty class and bad label
    d = _load(out)
    d["training"] = [e for e in d["training"] if e["label"] == 1]
    d["validation"] = [e for e in d["validation"] if e["label"] == 1]
    d["training"][0]["label"] = 7
    d.pop("counts")
    bad.write_text(json.dumps(d))
    assert main(["check", str(bad), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "'NORMAL' has no images" in text and "invalid labels" in text


def test_clear_errors(kermany_src, tmp_path, capsys):
    out = tmp_path / "k.json"
    # validation count larger than the training set
    assert main(["kermany", str(kermany_src), "--out", str(out), "--val-count", "100000", "--no-progress"]) == 2
    assert "--val-count 100000" in capsys.readouterr().err
    # a SRC that is not Kermany, and a split folder passed instead of the root
    other = tmp_path / "not_kermany"
    make_image(other / "a.png", 1)
    assert main(["kermany", str(other), "--out", str(out), "--no-progress"]) == 2
    assert "is not a kermany layout" in capsys.readouterr().err
    assert main(["kermany", str(kermany_src / "train"), "--out", str(out), "--no-progress"]) == 2
    assert "pass its parent" in capsys.readouterr().err
    # writing inside SRC is refused
    assert main(["kermany", str(kermany_src), "--out", str(kermany_src / "k.json"), "--no-progress"]) == 2
    assert "never writes under SRC" in capsys.readouterr().err
    assert not out.exists()


def test_oct2017(tmp_path):
    src = tmp_path / "OCT2017"
    k = 0
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
            for p in range(n):
                for j in range(1 + p % 2):
                    k += 1
                    make_image(src / split / cls / f"{cls}-{1000 + p + (0 if split == 'train' else 50)}-{j}.jpeg", k,
                               mode="L")
    out = tmp_path / "o.json"
    assert main(["oct2017", str(src), "--out", str(out), "--val-count", "8", "--no-progress"]) == 0
    d = _load(out)
    assert d["num_classes"] == 4 and d["sizes"]["validation"] == 8 and d["sizes"]["test"] == 12
    pats = _patients_by_split(d)
    assert not pats["training"] & pats["validation"]


def test_validation_never_shares_a_patient_with_official_test(tmp_path, capsys):
    # the official test folder reuses patient IDs of train/ (as distributed); carved validation must avoid them
    src = make_kermany(tmp_path / "raw", test=True)
    train_names = sorted(p.name for p in (src / "train" / "PNEUMONIA").glob("*.jpeg"))
    for i, name in enumerate(train_names[::3]):
        person = name.split("_")[0]
        make_image(src / "test" / "PNEUMONIA" / f"{person}_bacteria_{9000 + i}.jpeg", 5000 + i)
    for seed in range(4):
        out = tmp_path / f"k{seed}.json"
        assert main(["kermany", str(src), "--out", str(out), "--val-count", "12", "--seed", str(seed),
                     "--no-progress"]) == 0
        pats = _patients_by_split(_load(out))
        assert pats["training"] & pats["test"]  # inherited from the source: reported as a warning
        assert not pats["validation"] & pats["test"] and not pats["validation"] & pats["training"]
    assert "more than one official split" in capsys.readouterr().out


def _dicom_radiograph(path: Path, patient_id: str, seed: int) -> None:
    """An 8-bit MONOCHROME2 DICOM radiograph (random pixels) carrying ``patient_id``."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "DX", patient_id, "Doe^Jane"
    arr = np.random.default_rng(seed).integers(0, 256, (24, 20), dtype=np.uint8)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("layout,classes", [("kermany", ["NORMAL", "PNEUMONIA"]),
                                            ("oct2017", ["CNV", "DME", "DRUSEN", "NORMAL"])])
def test_dicom_exports_are_grouped_by_patient_id_tag(layout, classes, tmp_path, monkeypatch):
    """A hospital export of the same layout as DICOM files named by UIDs (no patient in the name): the PatientID tag
    groups the split, as the other layouts do, instead of one patient per image (which leaked patients across
    training and validation, and the check then refused the datalist)."""
    private_salt_file(monkeypatch, tmp_path / "salt")
    src = tmp_path / "export"
    n = 0
    for p in range(12):
        for k in range(3):  # three images per patient
            cls = classes[p % len(classes)]
            _dicom_radiograph(src / "train" / cls / f"1.2.826.0.1.{p}.{k}.dcm", f"PAT{p:04d}X", seed=n)
            n += 1
    out = tmp_path / "dl" / "d.json"
    assert main([layout, str(src), "--out", str(out), "--val-count", "6", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["grouping"] == "patient"
    by_patient: dict[str, set[str]] = {}
    for split in ("training", "validation"):
        for e in d[split]:
            by_patient.setdefault(e["patient"], set()).add(split)
            assert "PAT" not in json.dumps(e)  # pseudonyms only, never the tag value
    assert len(by_patient) == 12 and all(len(s) == 1 for s in by_patient.values())
    assert len(d["validation"]) == 6
