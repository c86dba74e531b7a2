"""2D DICOM read as a viewer shows it, whichever MONAI reader is installed (ffcl_monai/data/dicom.py, issue 15).

The files are built here with pydicom from a real radiograph of the bundle sample (Kermany, CC BY 4.0): 12 bits stored
in 16, MONOCHROME1 and MONOCHROME2 twins, windows, rescale, burnt-in markers. The real MONOCHROME1 CR chest files of
the PyPI package ``pydicom-data`` (the NEMA ``RG1``/``RG3`` files) are checked when it is installed (test extras).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "bundle" / "sample" / "kermany64" / "NORMAL" / "IM-0128-0001.jpeg"
PATIENT_NAME = "SECRETPERSON^JANE"
PATIENT_ID = "PID-7741-XYZ"


def radiograph() -> np.ndarray:
    """The sample radiograph as 12-bit values in 500..1775 (a 12-bit detector's anatomy, well below 4095)."""
    from PIL import Image

    with Image.open(SAMPLE) as im:
        img = np.asarray(im.convert("L"), dtype=np.uint16)
    return 500 + img * 5


def write_dicom(path: Path, stored: np.ndarray | None, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                frames: int = 1, **tags) -> Path:
    """A DX DICOM file (Explicit VR Little Endian, 16 bits allocated) holding ``stored``; no pixels when ``None``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, PATIENT_ID, "DX"
    if stored is not None:
        ds.Rows, ds.Columns = stored.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def loader(**kwargs):
    from ffcl_monai.data.transforms import LoadImageNamedd

    return LoadImageNamedd(keys="image", image_only=True, ensure_channel_first=True, **kwargs)


def load(path: Path, **kwargs) -> torch.Tensor:
    return loader(**kwargs)({"image": str(path)})["image"]


def prefix(path: Path, **kwargs) -> torch.Tensor:
    """The configs' deterministic prefix up to the intensity scaling: load, channels, per-image min-max."""
    from monai.transforms import Compose, ScaleIntensityd

    from ffcl_monai.data.transforms import EnsureChannelsd

    return Compose([loader(**kwargs), EnsureChannelsd(keys="image", channels=1, spatial_dims=2),
                    ScaleIntensityd(keys="image", minv=0.0, maxv=1.0)])({"image": str(path)})["image"]


@pytest.fixture()
def twins(tmp_path: Path) -> tuple[Path, Path]:
    """A MONOCHROME2 file and its MONOCHROME1 twin (stored = 4095 - value): the same picture."""
    a = radiograph()
    return (write_dicom(tmp_path / "m2.dcm", a, "MONOCHROME2"),
            write_dicom(tmp_path / "m1.dcm", 4095 - a, "MONOCHROME1"))


@pytest.mark.parametrize("reader", [None, "ITKReader", "PydicomReader"])
def test_monochrome1_and_monochrome2_twins_load_identically_whichever_reader(twins, reader):
    m2, m1 = twins
    kwargs = {} if reader is None else {"reader": reader}
    a, b = load(m2, **kwargs), load(m1, **kwargs)
    assert tuple(a.shape) == tuple(b.shape) == (1, 64, 64)  # MONAI's 2D layout: channel first, no trailing axis
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    # bright stays bright: the MONOCHROME2 file's largest stored values are the brightest output pixels
    stored = torch.as_tensor(radiograph().T.astype(np.float32))
    assert float(torch.corrcoef(torch.stack([a[0].flatten(), stored.flatten()]))[0, 1]) > 0.99


def test_monai_pydicom_reader_keeps_monochrome1_stored_values_ours_inverts(twins):
    """The bug: MONAI's pydicom reader returns MONOCHROME1 stored values as they are (0 = white), so the picture
    depends on which reader MONAI picks; ITK inverts. Ours inverts, whatever is installed."""
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    from ffcl_monai.data.dicom import read_dicom_display

    m2, m1 = twins
    stored = 4095 - radiograph()
    monai_pydicom = LoadImage(image_only=True, reader=PydicomReader())(str(m1))
    np.testing.assert_array_equal(np.asarray(monai_pydicom), stored.T)  # not inverted (x, y order)
    ours = read_dicom_display(m1)
    assert np.corrcoef(ours.ravel(), stored.ravel().astype(float))[0, 1] < -0.99  # inverted
    np.testing.assert_allclose(ours, read_dicom_display(m2), atol=1e-6)


def test_loader_output_matches_reader_layout_and_carries_no_tags(twins):
    from monai.data import MetaTensor

    from ffcl_monai.data.dicom import read_dicom_display

    m2, _ = twins
    img = load(m2)
    assert isinstance(img, MetaTensor) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), read_dicom_display(m2).T)  # (x, y): the transpose, as MONAI gives
    assert img.meta["filename_or_obj"] == str(m2)
    text = repr(dict(img.meta))
    assert PATIENT_NAME not in text and PATIENT_ID not in text and "0010|0010" not in text
    assert tuple(int(s) for s in img.meta["spatial_shape"]) == (64, 64)


def test_min_max_scaling_after_the_loader_changes_nothing(twins):
    """The configs' per-image ScaleIntensityd is a no-op on the reader's output (percentiles clipped to exactly 0
    and 1), so it does not undo the robust scaling."""
    m2, _ = twins
    torch.testing.assert_close(torch.as_tensor(prefix(m2)), torch.as_tensor(load(m2)), atol=0, rtol=0)


def test_burnt_in_marker_does_not_change_the_lungs(tmp_path):
    a = radiograph()
    marked = a.copy()
    marked[2:6, 2:6] = 4095  # a burnt-in "L" marker at the top of the 12-bit range (0.4 % of the pixels)
    rest = np.ones(a.shape, bool)
    rest[2:6, 2:6] = False
    window = {"WindowCenter": "1000", "WindowWidth": "800"}  # a clinical window: narrower than the stored values
    plain_w = write_dicom(tmp_path / "plain_w.dcm", a, **window)
    marked_w = write_dicom(tmp_path / "marked_w.dcm", marked, **window)
    for read in (load, prefix):  # the loader, and the loader + the configs' min-max
        x, y = read(plain_w)[0].numpy().T, read(marked_w)[0].numpy().T
        np.testing.assert_allclose(x[rest], y[rest], atol=1e-3)
        assert float(y[2:6, 2:6].min()) == 1.0
    # a window wider than the data: the loader's output is still marker-independent
    wide = {"WindowCenter": "2048", "WindowWidth": "4096"}
    x = load(write_dicom(tmp_path / "plain_wide.dcm", a, **wide))[0].numpy().T
    y = load(write_dicom(tmp_path / "marked_wide.dcm", marked, **wide))[0].numpy().T
    np.testing.assert_allclose(x[rest], y[rest], atol=1e-6)
    # no window: the percentile scaling keeps the lungs' contrast (per-image min-max would squeeze them to 31 %)
    y = prefix(write_dicom(tmp_path / "marked.dcm", marked))[0].numpy().T
    assert float(y[rest].max() - y[rest].min()) > 0.95


def test_modality_lut_rescale_is_applied_before_the_window(tmp_path):
    from ffcl_monai.data.dicom import read_dicom_display, window_to_unit

    a = radiograph()
    f = write_dicom(tmp_path / "rescaled.dcm", a, RescaleSlope="2", RescaleIntercept="-1000",
                    WindowCenter="1280", WindowWidth="2000")  # window in rescaled units
    got = read_dicom_display(f)
    np.testing.assert_allclose(got, window_to_unit(a * 2.0 - 1000.0, 1280, 2000), atol=1e-6)
    # the same window on the stored values would be a different picture: the rescale was applied
    assert float(np.abs(got - window_to_unit(a.astype(float), 1280, 2000)).max()) > 0.1


def test_dicom_window_option(tmp_path):
    from ffcl_monai.data.dicom import load_dicom_display, read_dicom_display, robust_unit, window_to_unit

    a = radiograph()
    f = write_dicom(tmp_path / "w.dcm", a, WindowCenter=["1000", "1500"], WindowWidth=["800", "1200"])
    auto = load_dicom_display(f)
    assert auto.voi == "window" and auto.window == (1000.0, 800.0)  # the first of several windows
    np.testing.assert_allclose(auto.pixels, window_to_unit(a, 1000, 800), atol=1e-6)
    np.testing.assert_allclose(read_dicom_display(f, "none"), robust_unit(a), atol=1e-6)
    np.testing.assert_allclose(read_dicom_display(f, [1500, 1200]), window_to_unit(a, 1500, 1200), atol=1e-6)
    # and through the loader, as the configs pass it (dicom_window: [center, width])
    np.testing.assert_allclose(load(f, dicom_window=[1500, 1200])[0].numpy().T, window_to_unit(a, 1500, 1200),
                               atol=1e-6)
    with pytest.raises(ValueError, match="dicom_window"):
        loader(dicom_window="bright")


def test_bits_above_bits_stored_are_ignored(tmp_path):
    from ffcl_monai.data.dicom import read_dicom_display

    a = radiograph()
    noisy = a | 0xF000  # garbage (an old overlay plane) in the 4 unused high bits
    np.testing.assert_allclose(read_dicom_display(write_dicom(tmp_path / "hi.dcm", noisy)),
                               read_dicom_display(write_dicom(tmp_path / "clean.dcm", a)), atol=1e-6)


def test_extensionless_dicom_is_read_by_the_same_reader(twins, tmp_path):
    m2, _ = twins
    for name in ("IM0001", "1.2.826.0.1.3680043.8.498.1"):  # no suffix; named by its SOPInstanceUID
        bare = tmp_path / name
        shutil.copy(m2, bare)
        img = load(bare)
        torch.testing.assert_close(torch.as_tensor(img), torch.as_tensor(load(m2)), atol=0, rtol=0)
        assert "0010|0010" not in img.meta  # not MONAI's reader: no tags in the metadata


def _refusal(path: Path, exc_type) -> str:
    with pytest.raises(exc_type) as info:
        load(path)
    msg = str(info.value)
    assert str(path) in msg and PATIENT_NAME not in msg and PATIENT_ID not in msg
    assert "SECRETPERSON" not in msg
    return msg


def test_refusals_name_the_file_and_never_a_tag_value(tmp_path):
    from ffcl_monai.data.dicom import DicomReadError, read_dicom_display
    from ffcl_monai.data.transforms import ImageReadError

    a = radiograph()
    multi = write_dicom(tmp_path / "cine.dcm", np.stack([a, a]), frames=2)
    with pytest.raises(DicomReadError, match="multi-frame") as info:
        read_dicom_display(multi)
    assert str(multi) in str(info.value) and PATIENT_NAME not in str(info.value)
    # the loader leaves multi-frame files to MONAI's reader (volumes, 3D configs); a 2D config refuses them by name
    from ffcl_monai.data.transforms import EnsureChannelsd

    with pytest.raises(ImageReadError, match="cine.dcm has 3 spatial dims"):
        EnsureChannelsd(keys="image", channels=1, spatial_dims=2)({"image": load(multi)})
    msg = _refusal(write_dicom(tmp_path / "report.dcm", None), ImageReadError)
    assert "no pixel data" in msg
    fake = tmp_path / "photo.dcm"
    shutil.copy(SAMPLE, fake)
    assert "not a DICOM file" in _refusal(fake, ImageReadError)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(write_dicom(tmp_path / "full.dcm", a).read_bytes()[:-3000])
    _refusal(truncated, ImageReadError)


def test_data_prep_check_reads_dicom_with_the_same_reader(twins, tmp_path):
    from data_prep.check import inspect_file

    m2, m1 = twins
    for f in (m2, m1):
        info = inspect_file(f)
        assert info.ok and info.spatial_dims == 2 and info.channels == 1 and info.shape == (64, 64), info
    bad = inspect_file(write_dicom(tmp_path / "report.dcm", None))
    assert not bad.ok and "no pixel data" in bad.error and PATIENT_NAME not in bad.error


def _pydicom_data_monochrome1() -> list[Path]:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed (`pip install -e .[dev]`)")
    import pydicom

    found = []
    for f in sorted(Path(os.path.dirname(data_store.__file__)).rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("PhotometricInterpretation") == "MONOCHROME1" and int(ds.get("NumberOfFrames", 1) or 1) == 1:
            found.append(f)
    return found


def test_real_monochrome1_radiographs_of_pydicom_data_are_inverted():
    import pydicom

    from ffcl_monai.data.dicom import load_dicom_display

    files = _pydicom_data_monochrome1()
    assert len(files) >= 2, "pydicom-data ships MONOCHROME1 CR chest files (RG1_*, RG3_*)"
    for f in files:
        ds = pydicom.dcmread(str(f))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            continue  # the same pixels as the uncompressed twins; decoding JPEG 2000 is slow
        out = load_dicom_display(f)
        stored = ds.pixel_array.astype(np.float64)
        assert out.pixels.shape == stored.shape and out.pixels.dtype == np.float32
        assert 0.0 <= float(out.pixels.min()) < 0.2 and 0.9 < float(out.pixels.max()) <= 1.0, f.name
        r = np.corrcoef(out.pixels[::4, ::4].ravel(), stored[::4, ::4].ravel())[0, 1]
        assert r < -0.5, (f.name, r)  # inverted relative to the stored values
        assert 0.3 < float(out.pixels.mean()) < 0.9, f.name  # a chest, not a black or white sheet


@pytest.mark.parametrize("config", ["train.yaml", "inference.yaml"])
def test_configs_pass_dicom_window_to_the_loader(config, tmp_path):
    """train.yaml and inference.yaml (hence evaluation, pretraining and MONAI Label) build the same loader, and
    ``--dicom_window`` reaches it."""
    from monai.bundle import ConfigParser

    from ffcl_monai.data.dicom import window_to_unit

    a = radiograph()
    f = write_dicom(tmp_path / "w.dcm", a, WindowCenter="1000", WindowWidth="800")
    for window, expected in (("auto", window_to_unit(a, 1000, 800)), ([1500, 1200], window_to_unit(a, 1500, 1200))):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundle" / "configs" / config))
        parser["dicom_window"] = window
        load_t = parser.get_parsed_content("deterministic_transforms#0")
        assert type(load_t).__name__ == "LoadImageNamedd"
        np.testing.assert_allclose(load_t({"image": str(f)})["image"][0].numpy().T, expected, atol=1e-6)


def test_loader_image_only_can_be_switched_like_monai_loadimage():
    """MONAI Label's infer task sets ``image_only`` on the dict transform's loader; the DICOM-first wrapper forwards it
    (it raised AttributeError, a 500 on every /infer)."""
    from ffcl_monai.data.transforms import LoadImageNamedd

    t = LoadImageNamedd("image", image_only=True)
    t._loader.image_only = False
    assert t._loader.image_only is False
    assert t._loader.readers == t._loader.loader.readers
    import copy

    assert copy.deepcopy(t)._loader.image_only is False  # copying probes attributes before __init__ ran


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_jpeg_lossless_dicom_is_decoded(name):
    """JPEG Lossless (process 14), the usual compression of CR/DX exports, needs a decoder pydicom lacks by itself:
    python-gdcm, a core dependency. Without it the read stops with a DicomReadError naming the file."""
    import pydicom
    from pydicom.data import get_testdata_file

    from ffcl_monai.data.dicom import load_dicom_display

    f = get_testdata_file(name)
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    assert "Lossless" in ds.file_meta.TransferSyntaxUID.name  # really a compressed lossless file
    out = load_dicom_display(f)
    assert out.pixels.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= float(out.pixels.min()) and float(out.pixels.max()) <= 1.0
    assert float(out.pixels.std()) > 0.05  # an image, not a blank sheet
