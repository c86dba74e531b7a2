"""data_prep folder / csv: class folders, official split folders, CSV columns, label names, patient grouping."""

from __future__ import annotations

import json

import pytest

from data_prep.__main__ import build_parser, main
from data_prep._testing import make_image, private_salt_file


@pytest.fixture(autouse=True)
def _salt_file_in_tmp(tmp_path_factory, monkeypatch):
    """Generated salts go to a temporary file, never to ~/.config."""
    private_salt_file(monkeypatch, tmp_path_factory.mktemp("salt"))


def test_folder_layout_with_patient_regex(tmp_path):
    src = tmp_path / "skin"
    k = 0
    for cls in ("benign", "malignant", "nevus"):
        for p in range(6):
            for j in range(1 + p % 3):
                k += 1
                make_image(src / cls / f"P{cls[0]}{p:02d}_{j}.png", k)
    out = tmp_path / "o" / "s.json"
    assert main(["folder", str(src), "--out", str(out), "--patient-regex", r"^(P\w\d+)_", "--test-count", "6",
                 "--val-count", "6", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["labels"] == {"0": "benign", "1": "malignant", "2": "nevus"} and d["task"] == "multiclass"
    assert d["sizes"]["test"] == 6 and d["sizes"]["validation"] == 6
    pats = [{e["patient"] for e in d[s]} for s in ("training", "validation", "test")]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])


def test_folder_layout_official_splits_and_class_order(tmp_path):
    src = tmp_path / "ds"
    k = 0
    for split in ("train", "test"):
        for cls in ("yes", "no"):
            for i in range(4):
                k += 1
                make_image(src / split / cls / f"{i}.jpg", k)
    out = tmp_path / "o.json"
    assert main(["folder", str(src), "--out", str(out), "--class-names", "no,yes", "--val-count", "2",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["labels"] == {"0": "no", "1": "yes"} and d["task"] == "binary"
    assert d["sizes"] == {"training": 6, "validation": 2, "test": 8}
    assert d["data_prep"]["carved"] == ["validation"]


def test_csv_layout(tmp_path, capsys):
    root = tmp_path / "raw"
    rows = ["file,diagnosis,pid,fold"]
    for i in range(12):
        make_image(root / "imgs" / f"{i}.png", i, mode="L")
        rows.append(f"imgs/{i}.png,{'abnormal' if i % 3 == 0 else 'normal'},pt{i // 2},{'test' if i >= 9 else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "o.json"
    assert main(["csv", str(root / "labels.csv"), "--out", str(out), "--path-column", "file", "--label-column",
                 "diagnosis", "--patient-column", "pid", "--split-column", "fold", "--val-count", "2",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["labels"] == {"0": "abnormal", "1": "normal"}
    assert d["sizes"] == {"training": 7, "validation": 2, "test": 3}
    assert all("pt" not in e["patient"] for e in d["training"])
    # errors: missing column, unknown label with --class-names, a missing image file
    assert main(["csv", str(root / "labels.csv"), "--out", str(out), "--no-progress"]) == 2
    assert "missing column(s) 'image', 'label'" in capsys.readouterr().err
    assert main(["csv", str(root / "labels.csv"), "--out", str(out), "--path-column", "file", "--label-column",
                 "diagnosis", "--class-names", "normal", "--no-progress"]) == 2
    assert "unknown label value(s) ['abnormal']" in capsys.readouterr().err
    (root / "imgs" / "4.png").unlink()
    assert main(["csv", str(root / "labels.csv"), "--out", str(out), "--path-column", "file", "--label-column",
                 "diagnosis", "--no-progress"]) == 1
    assert "4.png: file not found" in capsys.readouterr().out


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == {"kermany", "oct2017", "chexpert", "nih", "medmnist", "npz", "volumes", "folder", "csv",
                                "check"}
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "--" in text and (name == "check" or "--out" in text)
