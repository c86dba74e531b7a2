"""data_prep security and patient safety: patient grouping in every layout, paths with '..', secret salts, no DICOM
identifiers in any output, pseudonymous paths, and bad values (NaN/Inf, non-UTF-8 names, escaping symlinks, NIfTI
headers that declare too many voxels) that fail clearly.

Every fixture is built in tmp_path (pydicom, nibabel, PIL); nothing reads ../shared. The module imports only what
the original data_prep already had, so that it can be run against an older checkout to show each test failing there.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from data_prep import check as check_mod
from data_prep.__main__ import main
from data_prep._testing import make_chexpert, make_dicom_series, make_image, make_kermany, make_nih, tree_fingerprint, truncate
from data_prep.phi import DEFAULT_SALT, PHI_DICOM_KEYWORDS, patient_hash

SPLITS = ("training", "validation", "test")

#: Distinctive values for every identifying DICOM keyword (data_prep.phi.PHI_DICOM_KEYWORDS); ``{n}`` numbers the
#: patient. Dates, times, ages and UIDs are valid for their VRs.
PHI_VALUES = {
    "PatientName": "QZXNAME^PATIENT{n}", "PatientID": "QZXMRN{n}77", "PatientBirthDate": "1931122{n}",
    "PatientBirthTime": "11223{n}", "PatientSex": "O", "PatientAge": "09{n}Y", "PatientAddress": "QZXSTREET {n}",
    "PatientTelephoneNumbers": "QZXTEL55{n}", "OtherPatientIDs": "QZXOTHER{n}", "OtherPatientNames": "QZXALIAS^{n}",
    "PatientMotherBirthName": "QZXMOTHER{n}", "MedicalRecordLocator": "QZXLOCATOR{n}",
    "ReferringPhysicianName": "QZXREFDOC^{n}", "PerformingPhysicianName": "QZXPERFDOC^{n}",
    "OperatorsName": "QZXOPERATOR^{n}", "InstitutionName": "QZX INSTITUTION {n}",
    "InstitutionAddress": "QZX INST ADDRESS {n}", "AccessionNumber": "QZXACC{n}9", "StudyID": "QZXSTU{n}",
    "StudyDate": "1999031{n}", "StudyTime": "07080{n}", "SeriesDate": "1999041{n}", "AcquisitionDate": "1999051{n}",
    "ContentDate": "1999061{n}", "StudyInstanceUID": "1.2.826.0.1.3680043.9.7777.1.{n}",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.9.7777.2.{n}", "SOPInstanceUID": "1.2.826.0.1.3680043.9.7777.3.{n}",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.9.7777.4.{n}", "DeviceSerialNumber": "QZXSERIAL{n}",
    "StationName": "QZXSTATION{n}",
}
assert set(PHI_VALUES) == set(PHI_DICOM_KEYWORDS)


@pytest.fixture(autouse=True)
def salt_file(tmp_path_factory, monkeypatch) -> Path:
    """No $DATA_PREP_SALT; generated salts go to a fresh temporary file (never ~/.config)."""
    monkeypatch.delenv("DATA_PREP_SALT", raising=False)
    path = tmp_path_factory.mktemp("salt") / "data_prep_salt"
    monkeypatch.setenv("DATA_PREP_SALT_FILE", str(path))
    return path


def make_dicom_image(path: Path, seed: int, patient_id: str, phi_number: int | None = None) -> Path:
    """One 2D DICOM image (pydicom's CT_small.dcm, fresh pixels) with PatientID ``patient_id``; with ``phi_number``
    every identifying keyword also gets its PHI_VALUES value (and a per-file SOPInstanceUID)."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = ds.pixel_array
    ds.PixelData = (arr + np.random.default_rng(seed).integers(0, 50, size=arr.shape)).astype(arr.dtype).tobytes()
    if phi_number is not None:
        _set_phi(ds, phi_number)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{seed}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_phi(ds: pydicom.Dataset, n: int, keep: tuple[str, ...] = ()) -> None:
    for kw, v in PHI_VALUES.items():
        if kw not in keep:
            setattr(ds, kw, v.format(n=n))


def make_phi_series(folder: Path, n_slices: int, n: int) -> Path:
    """A DICOM series (make_dicom_series) of patient ``n`` whose identifying tags all carry PHI_VALUES."""
    make_dicom_series(folder, n_slices, PHI_VALUES["PatientID"].format(n=n), PHI_VALUES["PatientName"].format(n=n),
                      seed=n)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        _set_phi(ds, n, keep=("SeriesInstanceUID", "SOPInstanceUID"))  # the series stays one series
        ds.save_as(f, enforce_file_format=True)
    return folder


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def _images(d: dict) -> dict[str, list[str]]:
    return {s: sorted(e["image"] for e in d[s]) for s in SPLITS}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def _dicom_two_mrns(root: Path) -> dict[str, str]:
    """Class folders a/ and b/ of 2D DICOM slices: MRN0001 and MRN0002 have 6 slices each in both classes, six more
    patients one slice each. Returns {file path relative to root: PatientID}."""
    who: dict[str, str] = {}
    k = 0
    plan = [("MRN0001", "a", 4), ("MRN0001", "b", 2), ("MRN0002", "a", 3), ("MRN0002", "b", 3)]
    plan += [(f"MRN00{10 + i}", "ab"[i % 2], 1) for i in range(6)]
    for mrn, cls, n in plan:
        for _ in range(n):
            k += 1
            rel = f"{cls}/slice_{k:03d}.dcm"
            make_dicom_image(root / rel, seed=k, patient_id=mrn)
            who[rel] = mrn
    return who


# ------------------------------------------------------------------------------------------- 1. patient grouping
@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_dicom_patients_never_straddle_splits(tmp_path, layout, capsys):
    src = tmp_path / "src"
    who = _dicom_two_mrns(src)
    if layout == "folder":
        cmd = ["folder", str(src)]
    else:
        csv = _write_csv(src / "labels.csv", ["image", "label"], [[rel, rel.split("/")[0]] for rel in who])
        cmd = ["csv", str(csv)]
    for seed in range(3):
        out = tmp_path / f"o{seed}" / "d.json"
        assert main([*cmd, "--out", str(out), "--test-count", "3", "--val-count", "2", "--seed", str(seed),
                     "--no-progress"]) == 0
        d = _load(out)
        assert d["grouping"] == "patient" and d["data_prep"]["patient_ids"] == ["DICOM PatientID"]
        splits_of: dict[str, set[str]] = {}
        for s in SPLITS:
            for e in d[s]:
                rel = os.path.relpath(out.parent / e["image"], src)
                splits_of.setdefault(who[rel], set()).add(s)
        assert set(splits_of) == set(who.values())
        assert all(len(v) == 1 for v in splits_of.values()), splits_of  # every patient in exactly one split
        text = out.read_text()
        assert "MRN0001" not in text and patient_hash("MRN0001", DEFAULT_SALT) not in text
        assert main(["check", str(out), "--no-progress"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_check_flags_a_dicom_patient_in_two_splits(tmp_path, capsys):
    # a datalist as the old code wrote it: carved image-level splits, no patient keys, MRN0001 on both sides
    src = tmp_path / "src"
    who = _dicom_two_mrns(src)
    mrn1 = sorted(rel for rel, m in who.items() if m == "MRN0001")
    others = sorted(rel for rel, m in who.items() if m != "MRN0001")
    entry = lambda rel: {"image": f"src/{rel}", "label": 0 if rel.startswith("a/") else 1}  # noqa: E731
    d = {"task": "binary", "labels": {"0": "a", "1": "b"}, "num_classes": 2, "spatial_dims": 2,
         "data_prep": {"carved": ["test"]},
         "training": [entry(r) for r in mrn1[:3] + others[2:]], "validation": [],
         "test": [entry(r) for r in mrn1[3:] + others[:2]]}
    dl = tmp_path / "d.json"
    dl.write_text(json.dumps(d))
    assert main(["check", str(dl), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "LEAKAGE" in text and "DICOM patient" in text and "IMAGE-level" in text
    assert "MRN0001" not in text  # files are named, tag values never


def test_image_level_split_is_announced_and_recorded(tmp_path, capsys):
    src = tmp_path / "skin"
    for k in range(12):
        make_image(src / ("benign" if k % 2 else "malignant") / f"P{k // 2:02d}_{k}.png", k)
    out = tmp_path / "o" / "image.json"
    assert main(["folder", str(src), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "IMAGE-level" in err
    assert _load(out)["grouping"] == "image"
    assert main(["check", str(out), "--no-progress"]) == 0  # still passes, but says so
    assert "IMAGE-level" in capsys.readouterr().out
    out2 = tmp_path / "o" / "patient.json"
    assert main(["folder", str(src), "--out", str(out2), "--patient-regex", r"^(P\d+)_", "--test-count", "2",
                 "--val-count", "2", "--no-progress"]) == 0
    assert "IMAGE-level" not in capsys.readouterr().err
    d2 = _load(out2)
    assert d2["grouping"] == "patient" and d2["data_prep"]["patient_ids"] == ["file name"]


def test_identical_bytes_under_two_labels_is_an_error(tmp_path, capsys):
    src = tmp_path / "pool"
    for k in range(10):
        make_image(src / ("a" if k % 2 else "b") / f"{k}.png", k)
    shutil.copy(src / "a" / "1.png", src / "b" / "copy_of_1.png")
    out = tmp_path / "o" / "d.json"
    assert main(["folder", str(src), "--out", str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "carry different labels" in text and "a/1.png" in text and "b/copy_of_1.png" in text
    assert not out.exists()
    # --drop-duplicates: no official split holds a copy, so the right label is unknown and both copies go
    assert main(["folder", str(src), "--out", str(out), "--drop-duplicates", "--no-progress"]) == 0
    d = _load(out)
    assert sorted(Path(x["image"]).name for x in d["data_prep"]["dropped"]) == ["1.png", "copy_of_1.png"]
    assert sum(d["sizes"].values()) == 9
    # with official splits, the test copy (and its label) is kept and the training copy dropped
    off = tmp_path / "official"
    for k in range(8):
        make_image(off / "train" / ("a" if k % 2 else "b") / f"{k}.png", k)
        make_image(off / "test" / ("a" if k % 2 else "b") / f"t{k}.png", 100 + k)
    shutil.copy(off / "test" / "a" / "t1.png", off / "train" / "b" / "leaked.png")
    out = tmp_path / "o2" / "d.json"
    assert main(["folder", str(off), "--out", str(out), "--val-count", "0", "--no-progress"]) == 1
    assert main(["folder", str(off), "--out", str(out), "--val-count", "0", "--drop-duplicates",
                 "--no-progress"]) == 0
    d = _load(out)
    assert [Path(x["image"]).name for x in d["data_prep"]["dropped"]] == ["leaked.png"]
    assert any(e["image"].endswith("test/a/t1.png") for e in d["test"])


UNREADABLE = "unreadable, truncated or invalid"


def _dotdot_fixture(layout: str, data: Path) -> tuple[list[str], str]:
    """Build a source under ``data`` whose check must fail; return (command args before --out, expected text)."""
    if layout == "kermany":
        src = make_kermany(data / "chest_xray")
        truncate(sorted((src / "train" / "NORMAL").glob("*.jpeg"))[0])  # a per-file check: unreadable
        return ["kermany", "chest_xray", "--val-count", "4"], UNREADABLE
    if layout == "oct2017":
        k = 0
        for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
            for p in range(3):
                k += 1
                make_image(data / "OCT" / "train" / cls / f"{cls}-{100 + k}-1.jpeg", k, mode="L")
        truncate(data / "OCT" / "train" / "CNV" / "CNV-101-1.jpeg")
        return ["oct2017", "OCT", "--val-count", "2"], UNREADABLE
    if layout == "chexpert":
        ds = make_chexpert(data)
        first = sorted(ds.rglob("*.jpg"))[0]
        truncate(first)
        return ["chexpert", "CheXpert-v1.0-small", "--val-count", "2"], UNREADABLE
    if layout == "nih":
        make_nih(data / "nih")
        truncate(sorted((data / "nih").rglob("*.png"))[0])
        return ["nih", "nih", "--val-count", "2"], UNREADABLE
    if layout == "medmnist":
        rng = np.random.default_rng(0)
        arrays = {f"{s}_images": rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8) for s in ("train", "val", "test")}
        arrays |= {f"{s}_labels": (np.arange(6) % 2).reshape(-1, 1).astype(np.uint8) for s in ("train", "val", "test")}
        arrays["test_images"][0] = arrays["train_images"][0]  # same image in train and test: leakage
        arrays["test_labels"][0] = arrays["train_labels"][0]
        data.mkdir(parents=True, exist_ok=True)
        np.savez(data / "breastmnist.npz", **arrays)
        return ["medmnist", "breastmnist.npz"], "LEAKAGE"
    if layout == "npz":
        vols = np.random.default_rng(0).random((10, 4, 4, 4)).astype(np.float32)
        vols[3, 1, 1, 1] = np.nan
        data.mkdir(parents=True, exist_ok=True)
        np.savez(data / "vols.npz", images=vols, labels=np.arange(10) % 2)
        return ["npz", "vols.npz", "--test-count", "2", "--val-count", "0"], "NaN"
    if layout == "volumes":
        (data / "nii").mkdir(parents=True)
        rows = []
        for i in range(6):
            shape = (4, 4, 4, 2) if i == 0 else (4, 4, 4)  # one two-channel volume
            nib.save(nib.Nifti1Image(np.random.default_rng(i).random(shape).astype(np.float32), np.eye(4)),
                     data / "nii" / f"v{i}.nii.gz")
            rows.append([f"v{i}", i % 2])
        _write_csv(data / "nii" / "labels.csv", ["image", "label"], rows)
        return ["volumes", "nii", "--val-count", "1", "--test-count", "1"], "mixed channel counts"
    if layout == "folder":
        for k in range(8):
            make_image(data / "skin" / ("a" if k % 2 else "b") / f"{k}.png", k, mode="LA" if k == 0 else "RGB")
        return ["folder", "skin", "--val-count", "1", "--test-count", "1"], "mixed channel counts"
    assert layout == "csv"
    rows = []
    for k in range(8):
        make_image(data / "tab" / "img" / f"{k}.png", k, mode="LA" if k == 0 else "RGB")  # 2 channels: no conversion
        rows.append([f"img/{k}.png", k % 2])
    _write_csv(data / "tab" / "labels.csv", ["image", "label"], rows)
    return ["csv", "tab/labels.csv", "--val-count", "1", "--test-count", "1"], "mixed channel counts"


@pytest.mark.parametrize("layout", ["kermany", "oct2017", "chexpert", "nih", "medmnist", "npz", "volumes", "folder",
                                    "csv"])
def test_every_layout_checks_files_through_a_dotdot_path(tmp_path, layout, capsys):
    # SRC and --out both reached through '..': the per-file checks must still run (they were silently skipped)
    data = tmp_path / "data"
    (tmp_path / "work").mkdir()
    args, expected = _dotdot_fixture(layout, data)
    via = str(tmp_path / "work" / ".." / "data")
    cmd = [args[0], f"{via}/{args[1]}", *args[2:]]
    out = f"{tmp_path}/work/../out/{layout}.json"
    assert ".." in cmd[1] and ".." in out
    assert main([*cmd, "--out", out, "--no-progress"]) == 1, capsys.readouterr()
    text = capsys.readouterr().out
    assert expected in text and "FAILED" in text
    assert not Path(out).exists()


def test_check_entries_never_skips_files_silently(tmp_path):
    make_image(tmp_path / "a.png", 1)
    d = {"task": "binary", "labels": {"0": "x", "1": "y"}, "num_classes": 2, "spatial_dims": 2,
         "training": [{"image": "a.png", "label": 0}, {"image": "b.png", "label": 1}]}
    infos = {str(tmp_path / "a.png"): check_mod.inspect_file(tmp_path / "a.png")}
    rep = check_mod.check_entries(d, tmp_path, infos)  # no result for b.png: that is an error, not a pass
    assert not rep.ok and any("no file-check result" in e and "b.png" in e for e in rep.errors)


# ---------------------------------------------------------------------------------------------- 2. identifiers
def test_private_ids_get_a_generated_secret_salt(tmp_path, salt_file, monkeypatch, capsys):
    root = tmp_path / "raw"
    rows = []
    for i in range(12):
        make_image(root / "imgs" / f"{i}.png", i, mode="L")
        rows.append([f"imgs/{i}.png", i % 2, f"MRN-{i // 2:04d}"])
    csv = _write_csv(root / "labels.csv", ["file", "dx", "mrn"], rows)
    cmd = ["csv", str(csv), "--path-column", "file", "--label-column", "dx", "--patient-column", "mrn",
           "--val-count", "2", "--test-count", "2", "--no-progress"]
    out = tmp_path / "o" / "d.json"
    assert not salt_file.exists()
    assert main([*cmd, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert salt_file.is_file() and stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert str(salt_file) in err and "PUBLIC default salt" not in err
    salt = salt_file.read_text().strip()
    assert len(salt) == 64
    d = _load(out)
    text = out.read_text()
    assert d["data_prep"]["salt"] == "file" and salt not in text and "MRN-0001" not in text
    pseudonyms = {e["patient"] for s in SPLITS for e in d[s]}
    assert patient_hash("MRN-0001", salt) in pseudonyms and patient_hash("MRN-0001", DEFAULT_SALT) not in pseudonyms
    # the stored salt is reused: same file, byte-identical datalist
    first = out.read_bytes()
    assert main([*cmd, "--out", str(out)]) == 0
    assert out.read_bytes() == first and salt_file.read_text().strip() == salt
    # a salt file next to the datalist would be shared with it: refused
    salt_file.unlink()
    monkeypatch.setenv("DATA_PREP_SALT_FILE", str(out.parent / "salt"))
    assert main([*cmd, "--out", str(out)]) == 2
    assert "next to the datalist" in capsys.readouterr().err and not (out.parent / "salt").exists()


def test_public_default_salt_is_a_loud_warning(tmp_path, monkeypatch, capsys):
    src = make_kermany(tmp_path / "raw")  # public dataset, patient IDs from file names: the default is allowed
    out = tmp_path / "k.json"
    assert main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "PUBLIC default salt" in err and _load(out)["data_prep"]["salt"] == "default"
    monkeypatch.setenv("DATA_PREP_SALT", "a-private-salt")
    assert main(["kermany", str(src), "--out", str(out), "--val-count", "5", "--no-progress"]) == 0
    assert "PUBLIC default salt" not in capsys.readouterr().err
    assert _load(out)["data_prep"]["salt"] == "custom" and "a-private-salt" not in out.read_text()


def test_splits_do_not_depend_on_the_salt(tmp_path):
    dicom = tmp_path / "dicom"
    _dicom_two_mrns(dicom)
    kermany = make_kermany(tmp_path / "kermany")
    rows = []
    for i in range(16):
        make_image(tmp_path / "tab" / f"{i}.png", i)
        rows.append([f"{i}.png", i % 2, f"pid{i // 3}"])
    csv = _write_csv(tmp_path / "tab" / "l.csv", ["image", "label", "pid"], rows)
    cases = {
        "folder-dicom": ["folder", str(dicom), "--test-count", "3", "--val-count", "2"],
        "kermany": ["kermany", str(kermany), "--val-count", "9"],
        "csv-column": ["csv", str(csv), "--patient-column", "pid", "--test-count", "3", "--val-count", "3"],
    }
    for name, cmd in cases.items():
        got = []
        for salt in ("first-secret", "second-secret"):
            out = tmp_path / salt / f"{name}.json"
            assert main([*cmd, "--out", str(out), "--salt", salt, "--seed", "2", "--no-progress"]) == 0
            d = _load(out)
            got.append((_images(d), {e["patient"] for e in d["training"]}))
        assert got[0][0] == got[1][0], name  # same images in every split
        assert got[0][1] != got[1][1], name  # while the pseudonyms differ


def test_splits_do_not_depend_on_the_salt_with_pseudonymized_paths(tmp_path):
    dicom = tmp_path / "dicom"
    _dicom_two_mrns(dicom)
    got = []
    for salt in ("first-secret", "second-secret"):
        out = tmp_path / salt / "d.json"
        assert main(["folder", str(dicom), "--out", str(out), "--salt", salt, "--pseudonymize-paths",
                     "--test-count", "3", "--val-count", "2", "--no-progress"]) == 0
        d = _load(out)
        # link names depend on the salt; their targets (the real files) must not
        got.append({s: sorted(os.path.realpath(out.parent / e["image"]) for e in d[s]) for s in SPLITS})
    assert got[0] == got[1]


def _strings_in_outputs(folder: Path) -> str:
    """Names and contents (gzip decompressed) of every file data_prep wrote under folder, as latin-1 text.

    Symbolic links (--pseudonymize-paths) are names only: their targets are the inputs, not something written.
    """
    parts = []
    for p in sorted(folder.rglob("*")):
        parts.append(str(p.relative_to(folder)))
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            parts.append(data.decode("latin-1"))
    return "\n".join(parts)


def test_no_dicom_identifier_reaches_any_output(tmp_path, salt_file, capsys, caplog):
    src = tmp_path / "src"
    k = 0
    for n, (cls, count) in enumerate([("a", 3), ("b", 2), ("a", 2), ("b", 3), ("a", 1), ("b", 1)], start=1):
        for _ in range(count):
            k += 1
            make_dicom_image(src / "images" / cls / f"img{k:02d}.dcm", seed=k, patient_id=f"QZXMRN{n}77", phi_number=n)
    rows = [[f"images/{p.parent.name}/{p.name}", p.parent.name] for p in sorted((src / "images").rglob("*.dcm"))]
    csv = _write_csv(src / "labels.csv", ["image", "label"], rows)
    vol = tmp_path / "vol"
    vrows = []
    for n in range(1, 6):
        make_phi_series(vol / f"series{n}", 3, n)
        vrows.append([f"series{n}", n % 2])
    vcsv = _write_csv(tmp_path / "vlabels.csv", ["image", "label"], vrows)
    # every identifying value actually stored in the inputs
    values: set[str] = set()
    for p in list(src.rglob("*.dcm")) + list(vol.rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for kw in PHI_DICOM_KEYWORDS:
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 5:
                values.add(v)
    assert {"QZXMRN177", "QZXNAME^PATIENT1", "QZXACC19", "19990311"} <= values and len(values) > 100
    pids = {f"QZXMRN{n}77" for n in range(1, 7)}
    out = tmp_path / "out"
    runs = {
        "vol": ["volumes", str(vol), "--labels", str(vcsv), "--test-count", "1", "--val-count", "1"],
        "folder": ["folder", str(src / "images"), "--test-count", "2", "--val-count", "2"],
        "csv": ["csv", str(csv), "--test-count", "2", "--val-count", "2"],
        "pseudo": ["folder", str(src / "images"), "--pseudonymize-paths", "--test-count", "2", "--val-count", "2"],
    }
    for name, cmd in runs.items():
        if name == "pseudo":  # DICOM files are never copied (a copy would carry the header tags)
            assert main([*cmd, "--out", str(out / "copy.json"), "--link-mode", "copy", "--no-progress"]) == 2
            assert "DICOM file(s) with their identifying header tags" in capsys.readouterr().err
            assert not (out / "copy.json").exists() and not (out / "copy_links").exists()
        assert main([*cmd, "--out", str(out / f"{name}.json"), "--no-progress"]) == 0, cmd
        assert main(["check", str(out / f"{name}.json"), "--no-progress", "--report-json",
                     str(out / f"{name}.report.json")]) == 0
        logs = capsys.readouterr()
        text = _strings_in_outputs(out) + logs.out + logs.err + caplog.text
        leaked = sorted(v for v in values if v in text)
        assert not leaked, (name, leaked)
        # a pseudonym made with the public salt is as good as the identifier (a dictionary of MRNs inverts it)
        public = sorted(p for p in pids if patient_hash(p, DEFAULT_SALT) in text)
        assert not public, (name, public)
        assert salt_file.is_file() and salt_file.read_text().strip() not in text  # the secret stays in its file
    assert len(list((out / "vol_images").glob("*.nii.gz"))) == 5


def test_pseudonymize_paths_hides_file_and_folder_names(tmp_path, capsys):
    src = tmp_path / "export"
    k = 0
    for cls in ("normal", "tumour"):
        for name in ("DOE_JANE_MRN0001", "ROE_RICHARD_MRN0002", "POE_EDGAR_MRN0003", "ZOE_ZED_MRN0004"):
            for j in range(2):
                k += 1
                make_image(src / cls / name / f"{name}_scan{j}.png", k)
    before = tree_fingerprint(src)
    out = tmp_path / "share" / "ds.json"
    cmd = ["folder", str(src), "--out", str(out), "--patient-regex", r"^([A-Z]+_[A-Z]+_MRN\d+)_",
           "--test-count", "4", "--val-count", "4", "--pseudonymize-paths", "--no-progress"]
    assert main(cmd) == 0
    d = _load(out)
    text = out.read_text()
    for secret in ("DOE", "JANE", "MRN0001", "RICHARD", "scan0", "export"):
        assert secret not in text, secret
    assert d["data_prep"]["source"] is None and d["data_prep"]["paths"] == "pseudonymized (symlink)"
    assert d["data_prep"]["salt"] == "file"  # names are private: never the public salt
    entries = [e for s in SPLITS for e in d[s]]
    assert len(entries) == 16 and d["grouping"] == "patient"
    for e in entries:
        link = out.parent / e["image"]
        assert e["image"].startswith("ds_links/") and len(link.stem) == 20 and link.suffix == ".png"
        assert link.is_symlink() and Path(os.path.realpath(link)).is_relative_to(os.path.realpath(src))
    assert tree_fingerprint(src) == before  # inputs never modified
    assert main(["check", str(out), "--no-progress"]) == 0
    first = out.read_bytes()
    assert main(cmd) == 0 and out.read_bytes() == first  # deterministic
    # copies: a folder that can be shared without link targets
    out_copy = tmp_path / "share2" / "ds.json"
    assert main([*cmd[:3], str(out_copy), *cmd[4:], "--link-mode", "copy"]) == 0
    dc = _load(out_copy)
    for e in dc["training"]:
        f = out_copy.parent / e["image"]
        assert not f.is_symlink() and f.is_file()
    assert dc["data_prep"]["paths"] == "pseudonymized (copy)"
    assert _images(dc) == _images(d)  # same salt, same names


def test_pseudonymize_paths_copies_where_symlinks_fail(tmp_path, monkeypatch, capsys):
    src = tmp_path / "export"
    for k in range(6):
        make_image(src / "ab"[k % 2] / f"DOE_JANE_{k}.png", k)

    def no_symlinks(*args, **kwargs):
        raise PermissionError("no symbolic links on this file system")

    before = tree_fingerprint(src)
    monkeypatch.setattr(os, "symlink", no_symlinks)
    out = tmp_path / "o" / "d.json"
    assert main(["folder", str(src), "--out", str(out), "--pseudonymize-paths", "--test-count", "1",
                 "--val-count", "1", "--no-progress"]) == 0
    d = _load(out)
    assert d["data_prep"]["paths"] == "pseudonymized (copy)" and "DOE" not in out.read_text()
    assert "copying the files instead" in capsys.readouterr().err
    for e in d["training"]:
        assert not (out.parent / e["image"]).is_symlink() and (out.parent / e["image"]).is_file()
    assert tree_fingerprint(src) == before  # SRC read only: nothing created, changed or linked there


def test_identifier_in_a_dicom_file_name_is_flagged(tmp_path, capsys):
    # exports often name files by their SOPInstanceUID or folders by the patient: the datalist would carry that
    src = tmp_path / "export"
    for k in range(6):
        tmp = make_dicom_image(tmp_path / "tmp.dcm", seed=k, patient_id=f"QZXMRN{k}77", phi_number=k)
        uid = str(pydicom.dcmread(tmp, stop_before_pixels=True).SOPInstanceUID)
        (src / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        tmp.rename(src / "ab"[k % 2] / f"{uid}.dcm")
    out = tmp_path / "o" / "d.json"
    assert main(["folder", str(src), "--out", str(out), "--test-count", "1", "--val-count", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "6 DICOM file(s) have one of their own identifiers" in err and "--pseudonymize-paths" in err
    assert main(["folder", str(src), "--out", str(out), "--test-count", "1", "--val-count", "1",
                 "--pseudonymize-paths", "--no-progress"]) == 0
    assert "their own identifiers" not in capsys.readouterr().err
    assert "1.2.826.0.1.3680043.9.7777" not in out.read_text()


def test_series_that_mixes_patients_is_an_error_without_ids(tmp_path, capsys):
    vol = tmp_path / "vol"
    make_dicom_series(vol / "s1", 3, "QZXMRN177", "QZXNAME^ONE", seed=1)
    make_dicom_series(vol / "s2", 3, "QZXMRN277", "QZXNAME^TWO", seed=2)
    make_dicom_series(vol / "s3", 3, "QZXMRN377", "QZXNAME^THREE", seed=3)
    stray = sorted((vol / "s2").glob("*.dcm"))[0]
    ds = pydicom.dcmread(stray)
    ds.PatientID = "QZXMRN999"  # one slice of another patient filed into s2
    ds.save_as(stray, enforce_file_format=True)
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [["s1", 0], ["s2", 1], ["s3", 1]])
    for reader in ("pydicom", "itk"):
        assert main(["volumes", str(vol), "--labels", str(labels), "--out", str(tmp_path / reader / "v.json"),
                     "--val-count", "0", "--test-count", "0", "--dicom-reader", reader, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "s2" in err and "2 different patients" in err
        assert "QZXMRN" not in err and "QZXNAME" not in err


def test_redact_removes_tag_values_from_messages():
    from data_prep.phi import redact

    ds = pydicom.Dataset()
    ds.PatientID = "QZXMRN177"
    ds.PatientName = "QZXNAME^ONE"
    ds.AccessionNumber = "QZXACC19"
    msg = redact("cannot decode QZXMRN177 (QZXNAME^ONE), accession QZXACC19, Rows 512", ds)
    assert msg == "cannot decode <redacted> (<redacted>), accession <redacted>, Rows 512"


# ---------------------------------------------------------------------------------------------- 3. bad values
def test_nan_and_inf_fail_the_check_naming_the_file(tmp_path, capsys):
    # float TIFF (folder layout)
    src = tmp_path / "tif"
    for k in range(8):
        arr = np.random.default_rng(k).random((6, 6)).astype(np.float32)
        if k == 3:
            arr[2, 2] = np.nan
            arr[0, 0] = np.inf
        (src / ("a" if k % 2 else "b")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(src / ("a" if k % 2 else "b") / f"f{k}.tif")
    assert main(["folder", str(src), "--out", str(tmp_path / "o" / "t.json"), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "a/f3.tif" in text and "1 NaN and 1 Inf" in text
    # NIfTI (volumes layout) with an Inf, then the check command on a datalist
    nii = tmp_path / "nii"
    nii.mkdir()
    for i in range(5):
        v = np.random.default_rng(i).random((4, 4, 4)).astype(np.float32)
        if i == 2:
            v[1, 2, 3] = -np.inf
        nib.save(nib.Nifti1Image(v, np.eye(4)), nii / f"v{i}.nii.gz")
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [[f"v{i}", i % 2] for i in range(5)])
    assert main(["volumes", str(nii), "--labels", str(labels), "--out", str(tmp_path / "v.json"),
                 "--val-count", "0", "--test-count", "0", "--no-progress"]) == 1
    assert "v2.nii.gz" in capsys.readouterr().out
    dl = tmp_path / "hand.json"
    dl.write_text(json.dumps({"task": "binary", "labels": {"0": "x", "1": "y"}, "num_classes": 2, "spatial_dims": 3,
                              "training": [{"image": f"nii/v{i}.nii.gz", "label": i % 2} for i in range(5)]}))
    assert main(["check", str(dl), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "nii/v2.nii.gz" in text and "0 NaN and 1 Inf" in text and "FAILED" in text
    # --drop-bad excludes it explicitly
    assert main(["volumes", str(nii), "--labels", str(labels), "--out", str(tmp_path / "v.json"), "--drop-bad",
                 "--val-count", "0", "--test-count", "0", "--no-progress"]) == 0
    assert "Inf" in _load(tmp_path / "v.json")["data_prep"]["dropped"][0]["reason"]


def test_non_utf8_file_name_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "src"
    for k in range(6):
        make_image(src / ("a" if k % 2 else "b") / f"{k}.png", k)
    bad = os.path.join(os.fsencode(src / "a"), b"bad\xff.png")
    try:
        shutil.copy(os.fsencode(src / "a" / "1.png"), bad)
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    rc = main(["folder", str(src), "--out", str(tmp_path / "o.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not valid UTF-8" in err and "bad\\xff.png" in err
    assert not (tmp_path / "o.json").exists()


def test_symlink_whose_target_is_outside_src_is_refused(tmp_path, capsys):
    src = tmp_path / "src"
    for k in range(6):
        make_image(src / ("a" if k % 2 else "b") / f"{k}.png", k)
    os.symlink(src / "a" / "1.png", src / "a" / "inside_link.png")  # target inside SRC: fine
    assert main(["folder", str(src), "--out", str(tmp_path / "ok.json"), "--no-progress"]) == 0
    secret = make_image(tmp_path / "elsewhere" / "other_patient.png", 99)
    os.symlink(secret, src / "a" / "escape.png")
    rc = main(["folder", str(src), "--out", str(tmp_path / "o.json"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "a/escape.png" in err and "outside SRC" in err
    assert not (tmp_path / "o.json").exists()


def _nifti_header_only(path: Path, shape: tuple[int, ...], dtype=np.int16) -> Path:
    """A .nii.gz whose header declares ``shape`` but that carries no voxel data (a would-be gzip bomb)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = 352
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    return path


def test_nifti_header_limits_are_checked_before_decoding(tmp_path, monkeypatch, capsys):
    nii = tmp_path / "nii"
    nii.mkdir()
    for i in range(4):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), nii / f"v{i}.nii.gz")
    # a dimension above MAX_DIM (the data is there and tiny once compressed)
    nib.save(nib.Nifti1Image(np.zeros((8193, 2, 2), np.uint8), np.eye(4)), nii / "wide.nii.gz")
    labels = _write_csv(tmp_path / "l.csv", ["image", "label"], [[f"v{i}", i % 2] for i in range(4)] + [["wide", 1]])
    assert main(["volumes", str(nii), "--labels", str(labels), "--out", str(tmp_path / "o.json"),
                 "--val-count", "0", "--test-count", "0", "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "wide.nii.gz" in text and "too large" in text and "MAX_DIM" in text
    # more voxels than MAX_VOXELS, declared by a header without data: refused from the header alone
    bomb = _nifti_header_only(tmp_path / "bomb.nii.gz", (8192, 8192, 64), np.uint8)
    info = check_mod.inspect_file(bomb)
    assert not info.ok and "too large" in info.error and "4,294,967,296" in info.error
    # the limit is a module constant: lowered, a small header-only file is refused before any decoding
    monkeypatch.setattr(check_mod, "MAX_VOXELS", 1000)
    info = check_mod.inspect_file(_nifti_header_only(tmp_path / "small.nii.gz", (20, 20, 20)))
    assert not info.ok and "too large" in info.error
