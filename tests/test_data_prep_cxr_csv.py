"""data_prep chexpert / nih: uncertainty policies, metadata, official lists, patient grouping, CSV errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep._testing import NIH_FINDINGS, make_chexpert, make_nih, private_salt_file
from data_prep.layouts.chexpert import encode_labels


@pytest.fixture(autouse=True)
def _salt_file_in_tmp(tmp_path_factory, monkeypatch):
    """Generated salts go to a temporary file, never to ~/.config."""
    private_salt_file(monkeypatch, tmp_path_factory.mktemp("salt"))


@pytest.fixture(scope="module")
def chexpert_src(tmp_path_factory) -> Path:
    return make_chexpert(tmp_path_factory.mktemp("cx"))


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_encode_policies():
    cells = ["1.0", "0.0", "-1.0", ""] + ["0"] * 10
    assert encode_labels(cells, "ignore", "x")[:4] == [1, 0, -1, 0]
    assert encode_labels(cells, "ones", "x")[:4] == [1, 0, 1, 0]
    assert encode_labels(cells, "zeros", "x")[:4] == [1, 0, 0, 0]
    cls = encode_labels(cells, "class", "x")
    assert len(cls) == 28 and cls[:4] == [1, 0, 0, 0] and cls[14:18] == [0, 0, 1, 0]


@pytest.mark.parametrize("policy", ["ignore", "ones", "zeros", "class"])
def test_chexpert_policies(chexpert_src, tmp_path, policy):
    out = tmp_path / f"{policy}.json"
    assert main(["chexpert", str(chexpert_src), "--out", str(out), "--uncertain", policy, "--val-count", "4",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["task"] == "multilabel" and d["uncertain_policy"] == policy
    assert d["num_classes"] == (28 if policy == "class" else 14)
    n_train_csv = len(_rows(chexpert_src / "train.csv"))
    assert d["sizes"]["validation"] == 4 and d["sizes"]["training"] == n_train_csv - 4
    assert d["sizes"]["test"] == len(_rows(chexpert_src / "valid.csv"))  # valid.csv -> test by default
    flat = [v for s in ("training", "validation") for e in d[s] for v in e["label"]]
    if policy == "ignore":
        assert -1 in flat
        e = next(e for e in d["training"] if -1 in e["label"])
        assert e["label_mask"] == [0 if v < 0 else 1 for v in e["label"]]
    else:
        assert set(flat) <= {0, 1} and "label_mask" not in d["training"][0]
    pats = {s: {e["patient"] for e in d[s]} for s in ("training", "validation", "test")}
    assert not pats["training"] & pats["validation"]


def test_chexpert_frontal_only_and_metadata(chexpert_src, tmp_path):
    out = tmp_path / "f.json"
    assert main(["chexpert", str(chexpert_src), "--out", str(out), "--frontal-only", "--metadata", "--val-count", "2",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    entries = d["training"] + d["validation"] + d["test"]
    assert all("frontal" in e["image"] for e in entries)
    assert d["view_names"] == {"0": "AP", "1": "PA", "2": "LATERAL"} and d["sex_names"] == {"0": "female", "1": "male"}
    assert {e["view"] for e in entries} <= {0, 1} and {e["sex"] for e in entries} == {0, 1, None}
    assert all(isinstance(e["age"], float) for e in entries)


def test_chexpert_errors(chexpert_src, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = _rows(chexpert_src / "train.csv")
    cols = list(rows[0])
    with open(bad / "train.csv", "w", newline="") as f:  # missing column
        w = csv.DictWriter(f, [c for c in cols if c != "Edema"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    assert main(["chexpert", str(bad), "--out", str(tmp_path / "o.json"), "--no-progress"]) == 2
    assert "missing column(s) 'Edema'" in capsys.readouterr().err
    rows[0]["Edema"] = "maybe"  # unknown label value
    with open(bad / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    assert main(["chexpert", str(bad), "--out", str(tmp_path / "o.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'Edema' has value 'maybe'" in err and "row 2" in err
    assert main(["chexpert", str(tmp_path / "nothing"), "--out", str(tmp_path / "o.json"), "--no-progress"]) == 2


def test_nih_official_lists_and_metadata(tmp_path):
    src = make_nih(tmp_path / "nih")
    out = tmp_path / "o" / "nih.json"
    assert main(["nih", str(src), "--out", str(out), "--metadata", "--val-count", "5", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    test_list = set((src / "test_list.txt").read_text().split())
    assert {Path(e["image"]).name for e in d["test"]} == test_list
    assert d["num_classes"] == 14 and d["labels"]["13"] == "Hernia" and d["sizes"]["validation"] == 5
    pats = {s: {e["patient"] for e in d[s]} for s in ("training", "validation", "test")}
    assert not pats["training"] & pats["validation"] and not pats["training"] & pats["test"]
    rows = {r["Image Index"]: r for r in _rows(src / "Data_Entry_2017.csv")}
    for e in d["training"]:
        r = rows[Path(e["image"]).name]
        finds = r["Finding Labels"].split("|")
        assert e["label"] == [int(f in finds) for f in NIH_FINDINGS]
        assert e["view"] == (1 if r["View Position"] == "PA" else 0)
        assert e["sex"] == (1 if r["Patient Gender"] == "M" else 0) and e["age"] == float(r["Patient Age"])
        assert e["patient"] != r["Patient ID"]


def test_nih_without_lists_and_errors(tmp_path, capsys):
    src = make_nih(tmp_path / "nih", official_lists=False)
    out = tmp_path / "o.json"
    assert main(["nih", str(src), "--out", str(out), "--no-finding-label", "--test-fraction", "0.25",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["num_classes"] == 15 and d["data_prep"]["carved"] == ["test", "validation"]
    pats = {s: {e["patient"] for e in d[s]} for s in ("training", "validation", "test")}
    assert not pats["training"] & pats["test"] and not pats["validation"] & pats["test"]
    text = (src / "Data_Entry_2017.csv").read_text().replace("Nodule", "Nodular", 1)
    if "Nodular" not in text:
        text = text.replace("No Finding", "Normal", 1)
    (src / "Data_Entry_2017.csv").write_text(text)
    assert main(["nih", str(src), "--out", str(out), "--no-progress"]) == 2
    assert "unknown finding label" in capsys.readouterr().err
