"""data_prep volumes: NIfTI folders, DICOM series -> NIfTI without PHI, real pydicom/nibabel files; check on DICOM."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path as nib_data_path
from pydicom.data import get_testdata_file

from data_prep.__main__ import main
from data_prep._testing import make_dicom_series, make_image, private_salt_file, tree_fingerprint
from data_prep.check import inspect_file


@pytest.fixture(autouse=True)
def _salt_file_in_tmp(tmp_path_factory, monkeypatch):
    """Generated salts go to a temporary file, never to ~/.config."""
    private_salt_file(monkeypatch, tmp_path_factory.mktemp("salt"))


PHI = ["DOE^JANE", "DOE^JOHN", "MRN-0001", "MRN-0002", "19700101", "St Example Hospital"]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def test_dicom_series_to_nifti_without_phi(tmp_path, capsys):
    src = tmp_path / "dicom"
    # two patients; MRN-0001 has two series, so grouping must keep them together
    make_dicom_series(src / "DOE^JANE_ct1", 4, "MRN-0001", "DOE^JANE", seed=1)
    make_dicom_series(src / "DOE^JANE_ct2", 3, "MRN-0001", "DOE^JANE", seed=2)
    make_dicom_series(src / "DOE^JOHN_ct1", 4, "MRN-0002", "DOE^JOHN", seed=3)
    make_dicom_series(src / "anon_ct", 2, "MRN-0003", "X^Y", seed=4)
    (src / "anon_ct" / "README.txt").write_text("not dicom")  # ignored, not fatal
    labels = _write_csv(tmp_path / "labels.csv", ["image", "label"],
                        [["DOE^JANE_ct1", "tumour"], ["DOE^JANE_ct2", "normal"], ["DOE^JOHN_ct1", "normal"],
                         ["anon_ct", "tumour"]])
    before = tree_fingerprint(src)
    out = tmp_path / "out" / "vol.json"
    assert main(["volumes", str(src), "--labels", str(labels), "--out", str(out), "--val-count", "1",
                 "--test-count", "1", "--no-progress"]) == 0
    logs = capsys.readouterr()
    d = json.loads(out.read_text())
    assert d["spatial_dims"] == 3 and d["modality"] == "CT" and d["labels"] == {"0": "normal", "1": "tumour"}
    entries = d["training"] + d["validation"] + d["test"]
    assert len(entries) == 4
    # patient grouping from the DICOM PatientID (hashed): JANE's two series share one hash and one split
    by_patient: dict[str, set] = {}
    for s in ("training", "validation", "test"):
        for e in d[s]:
            by_patient.setdefault(e["patient"], set()).add(s)
    assert len(by_patient) == 3 and all(len(v) == 1 for v in by_patient.values())
    # no PHI anywhere: datalist, logs, file names, NIfTI bytes (decompressed)
    text = out.read_text() + logs.out + logs.err
    for f in (out.parent / "vol_images").iterdir():
        text += f.name + gzip.decompress(f.read_bytes()).decode("latin-1")
    for phi in PHI:
        assert phi not in text
    # geometry: (columns, rows, slices), spacing from PixelSpacing/positions, slices sorted by position
    e = next(e for e in entries if e["label"] == 1 and nib.load(str(out.parent / e["image"])).shape[2] == 4)
    img = nib.load(str(out.parent / e["image"]))
    assert img.shape == (128, 128, 4)
    assert np.allclose(img.header.get_zooms()[:3], (0.8, 0.7, 2.5))
    assert img.header["descrip"].tobytes().strip(b"\0") == b""
    assert tree_fingerprint(src) == before  # SRC untouched


def test_dicom_itk_reader_matches_pydicom(tmp_path):
    src = tmp_path / "dicom"
    make_dicom_series(src / "s1", 3, "MRN-0001", "DOE^JANE", seed=1)
    make_dicom_series(src / "s2", 3, "MRN-0002", "DOE^JOHN", seed=2)
    make_dicom_series(src / "s3", 3, "MRN-0003", "DOE^JOHN", seed=3)
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [["s1", 0], ["s2", 1], ["s3", 1]])
    outs = {}
    for reader in ("pydicom", "itk"):
        out = tmp_path / reader / "v.json"
        assert main(["volumes", str(src), "--labels", str(labels), "--out", str(out), "--dicom-reader", reader,
                     "--val-count", "0", "--test-count", "0", "--no-progress"]) == 0
        d = json.loads(out.read_text())
        outs[reader] = {e["image"]: nib.load(str(out.parent / e["image"])) for e in d["training"]}
    assert outs["pydicom"].keys() == outs["itk"].keys()
    for k, a in outs["pydicom"].items():
        b = outs["itk"][k]
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        assert np.allclose(a.affine, b.affine, atol=1e-4)


def test_nifti_folder_with_real_anatomical(tmp_path):
    src = tmp_path / "nii"
    src.mkdir()
    shutil.copy(Path(nib_data_path) / "anatomical.nii", src / "sub-01.nii")  # real T1, 33x41x25
    rng = np.random.default_rng(0)
    rows = [["sub-01", "control", "p1"]]
    for i in range(2, 9):
        nib.save(nib.Nifti1Image(rng.random((6, 5, 4)).astype(np.float32), np.eye(4)), src / f"sub-{i:02d}.nii.gz")
        rows.append([f"sub-{i:02d}", "case" if i % 2 else "control", f"p{i // 2}"])
    labels = _write_csv(src.parent / "labels.csv", ["subject", "dx", "pid"], rows)
    out = tmp_path / "o" / "n.json"
    assert main(["volumes", str(src), "--labels", str(labels), "--id-column", "subject", "--label-column", "dx",
                 "--patient-column", "pid", "--out", str(out), "--val-count", "2", "--test-count", "2", "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["sizes"] == {"training": 4, "validation": 2, "test": 2}
    assert any(e["image"].endswith("sub-01.nii") for s in ("training", "validation", "test") for e in d[s])
    assert not (out.parent / "n_images").exists()  # NIfTI sources are referenced in place, not copied
    info = inspect_file(src / "sub-01.nii")
    assert info.ok and info.spatial_dims == 3 and info.shape == (33, 41, 25)


def test_volumes_errors(tmp_path, capsys):
    src = tmp_path / "nii"
    src.mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), src / f"v{i}.nii.gz")
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [["v0", 0], ["v1", 1], ["v9", 1]])
    assert main(["volumes", str(src), "--labels", str(labels), "--out", str(tmp_path / "o.json"),
                 "--no-progress"]) == 2
    assert "'v9'" in capsys.readouterr().err
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [["v0", "a"], ["v1", "b"], ["v2", "zzz"]])
    assert main(["volumes", str(src), "--labels", str(labels), "--class-names", "a,b", "--out",
                 str(tmp_path / "o.json"), "--no-progress"]) == 2
    assert "unknown label value(s) ['zzz']" in capsys.readouterr().err
    assert main(["volumes", str(src), "--labels", str(labels), "--label-column", "diagnosis", "--out",
                 str(tmp_path / "o.json"), "--no-progress"]) == 2
    assert "missing column(s) 'diagnosis'" in capsys.readouterr().err
    # a truncated NIfTI is caught by the check
    data = (src / "v1.nii.gz").read_bytes()
    (src / "v1.nii.gz").write_bytes(data[: len(data) // 2])
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [["v0", 0], ["v1", 1], ["v2", 1]])
    assert main(["volumes", str(src), "--labels", str(labels), "--out", str(tmp_path / "o.json"),
                 "--val-count", "0", "--test-count", "0", "--no-progress"]) == 1
    assert "v1.nii.gz" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_pydicom_files_in_folder_layout_and_check(tmp_path, name):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        for i in range(3):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.PixelData = (ds.pixel_array + (i + (10 if cls == "b" else 0))).astype(ds.pixel_array.dtype).tobytes()
            ds.PatientID = f"{cls}{i}"  # six patients: DICOM files are grouped by PatientID (one patient can't split)
            (src / cls).mkdir(parents=True, exist_ok=True)
            ds.save_as(src / cls / f"{cls}{i}.dcm", enforce_file_format=True)
    out = tmp_path / "o.json"
    assert main(["folder", str(src), "--out", str(out), "--val-count", "1", "--test-count", "1",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    assert d["spatial_dims"] == 2 and d["labels"] == {"0": "a", "1": "b"}
    info = inspect_file(get_testdata_file(name))
    assert info.ok and info.spatial_dims == 2 and info.channels == 1
    # a DICOM file cut in half is reported, not silently dropped
    cut = src / "a" / "a1.dcm"
    cut.write_bytes(cut.read_bytes()[:2000])
    assert main(["folder", str(src), "--out", str(out), "--no-progress"]) == 1


def test_png_check_mixed_with_jpeg(tmp_path):
    make_image(tmp_path / "x.png", 1)
    assert inspect_file(tmp_path / "x.png").channels == 3
    assert not inspect_file(tmp_path / "missing.png").ok
