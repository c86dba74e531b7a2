"""3D intensity/geometry presets (``volume_preset: none | mri | ct``): orientation, spacing, robust intensities, CT
windows, and the unchanged default path. Tiny synthetic NIfTI volumes written with nibabel; through the bundle config
where the behaviour is the config's, through the builder where it is one step's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Resized, ScaleIntensityd

from conftest import cfg, user_error

AFFINE_RAS = np.diag([1.0, 1.2, 1.5, 1.0])


def _head(shape=(24, 20, 16), seed: int = 0) -> np.ndarray:
    """An asymmetric 'head': noisy ellipsoid with a bright blob off-centre, zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.7
    vol = np.where(inside, 100 + 20 * rng.standard_normal(shape), 0)
    blob = ((grid[0] - 0.3) ** 2 + (grid[1] + 0.2) ** 2 + (grid[2] - 0.1) ** 2) < 0.05
    vol[blob] = 300
    return vol.astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored with the first two voxel axes reversed (RAS -> LPS)."""
    flip = np.eye(4)
    for ax in (0, 1):
        flip[ax, ax] = -1
        flip[ax, 3] = data.shape[ax] - 1
    return np.ascontiguousarray(data[::-1, ::-1, :]), affine @ flip


def _psr(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume with voxel axes transposed (i, j, k) -> (j, k, i), as IXI's PSR storage."""
    moved = np.ascontiguousarray(data.transpose(1, 2, 0))
    perm = np.eye(4)[:, [1, 2, 0, 3]]
    return moved, affine @ perm


def _deterministic(overrides: dict, files=("train.yaml", "3d.yaml")) -> Compose:
    parser = ConfigParser()
    parser.read_config(cfg(*files))
    parser.update({"cache_on_device": False, **overrides})
    return Compose(parser.get_parsed_content("deterministic_transforms"))


def _run(transform, path: str) -> torch.Tensor:
    return transform({"image": path, "label": 0})["image"]


def _load(path: str) -> MetaTensor:
    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])({"image": path})["image"]


# --- orientation ---------------------------------------------------------------------------------------------------


def test_ras_lps_and_transposed_storage_give_one_tensor(tmp_path):
    data = _head()
    ras = _save(tmp_path / "ras.nii.gz", data, AFFINE_RAS)
    lps = _save(tmp_path / "lps.nii.gz", *_lps(data, AFFINE_RAS))
    psr = _save(tmp_path / "psr.nii.gz", *_psr(data, AFFINE_RAS))
    assert nib.aff2axcodes(nib.load(lps).affine) == ("L", "P", "S")
    assert nib.aff2axcodes(nib.load(psr).affine) == ("A", "S", "R")
    t = _deterministic({"volume_preset": "mri", "image_size": [16, 16, 16], "target_spacing": [1.5, 1.5, 1.5]})
    out = [_run(t, p) for p in (ras, lps, psr)]
    assert out[0].shape == (1, 16, 16, 16)
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[0], out[2], atol=1e-5)
    # the blob (bright, +x) lands in the same place and is not mirrored
    assert not torch.allclose(out[0], torch.flip(out[0], dims=[1]), atol=1e-2)


def test_loader_keeps_the_affine_for_the_preset(tmp_path):
    """LoadImageNamedd(image_only=True) and EnsureChannelsd keep a MetaTensor whose affine is the file's."""
    path = _save(tmp_path / "v.nii.gz", _head(), AFFINE_RAS)
    parser = ConfigParser()
    parser.read_config(cfg("train.yaml", "3d.yaml"))
    parser.update({"cache_on_device": False})
    loader, channels = parser.get_parsed_content("deterministic_transforms")[:2]
    img = channels(loader({"image": path}))["image"]
    assert isinstance(img, MetaTensor)
    assert np.allclose(img.affine.numpy(), AFFINE_RAS)


# --- spacing ---------------------------------------------------------------------------------------------------------


def test_twice_the_spacing_is_resampled_to_the_target_grid(tmp_path):
    from ffcl_monai.data.volume_presets import intensity_and_geometry

    data = 50 + np.arange(12 * 10 * 8, dtype=np.float32).reshape(12, 10, 8) / 10  # all foreground: nothing cropped
    path = _save(tmp_path / "coarse.nii.gz", data, np.diag([2.0, 2.0, 2.0, 1.0]))
    steps = intensity_and_geometry("mri", image_size=[8, 8, 8], target_spacing=[1.0, 1.0, 1.0])
    before_fit = Compose(steps[:-1])({"image": _load(path)})["image"]
    physical = np.array(data.shape) * 2.0  # mm
    assert tuple(before_fit.shape[1:]) == tuple(int(n) for n in physical / 1.0)
    assert np.allclose(before_fit.pixdim.numpy(), [1.0, 1.0, 1.0])
    assert Compose(steps)({"image": _load(path)})["image"].shape == (1, 8, 8, 8)


# --- intensities -----------------------------------------------------------------------------------------------------


def test_one_hot_voxel_does_not_rescale_the_rest(tmp_path):
    data = _head(seed=1)
    hot = data.copy()
    hot[12, 10, 8] = 50 * data.max()  # inside the ellipsoid
    a = _save(tmp_path / "a.nii.gz", data, AFFINE_RAS)
    b = _save(tmp_path / "b.nii.gz", hot, AFFINE_RAS)
    # through the config: image_size equals the stored grid and the spacing is kept, so nothing is interpolated
    over = {"volume_preset": "mri", "image_size": list(data.shape), "target_spacing": [1.0, 1.2, 1.5],
            "volume_fit": "pad_crop"}
    t = _deterministic(over)
    x, y = _run(t, a), _run(t, b)
    assert x.shape == y.shape
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[0, 12, 10, 8] = False
    assert float((x - y)[rest].abs().max()) <= 0.01
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_ct_window_maps_its_edges_to_0_and_1_clipped(tmp_path):
    from ffcl_monai.data.volume_presets import intensity_and_geometry

    center, width = 40.0, 400.0
    data = np.full((8, 8, 8), -1000.0, np.float32)  # air
    data[2:6, 2:6, 2:6] = center
    data[2, 2, 2], data[3, 3, 3] = center - width / 2, center + width / 2
    data[4, 4, 4], data[5, 5, 5] = 3000.0, -500.0  # bone beyond the window, fat/lung below it
    path = _save(tmp_path / "ct.nii.gz", data, np.eye(4))
    steps = intensity_and_geometry("ct", image_size=[8, 8, 8], ct_window=[center, width])
    x = Compose(steps[:2])({"image": _load(path)})["image"][0]
    assert float(x[2, 2, 2]) == pytest.approx(0.0, abs=1e-6) and float(x[3, 3, 3]) == pytest.approx(1.0, abs=1e-6)
    assert float(x[2, 3, 4]) == pytest.approx(0.5, abs=1e-6)
    assert float(x[4, 4, 4]) == 1.0 and float(x[5, 5, 5]) == 0.0 and float(x[0, 0, 0]) == 0.0
    # the config keys reach it
    t = _deterministic({"volume_preset": "ct", "ct_window": [center, width], "image_size": [8, 8, 8]})
    out = _run(t, path)
    assert out.shape == (1, 8, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1


# --- the default path is today's -------------------------------------------------------------------------------------


def _old_transforms(image_size, resize_mode, spatial_dims) -> list:
    """deterministic_transforms of train.yaml before presets existed."""
    from ffcl_monai.data.transforms import EnsureChannelsd, LabelToTensord, LoadImageNamedd

    return [
        LoadImageNamedd(keys="image", image_only=True, ensure_channel_first=True),
        EnsureChannelsd(keys="image", channels=1, spatial_dims=spatial_dims),
        ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
        Resized(keys="image", spatial_size=image_size, mode=resize_mode),
        LabelToTensord(keys="label"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ]


@pytest.mark.parametrize("files", [("train.yaml", "3d.yaml"), ("inference.yaml", "3d.yaml"), ("train.yaml",)])
def test_preset_none_is_todays_pipeline(tmp_path, files):
    three_d = "3d.yaml" in files
    size = [12, 12, 12] if three_d else [16, 16]
    if three_d:
        path = _save(tmp_path / "v.nii.gz", *_lps(_head(), AFFINE_RAS))
    else:
        from PIL import Image

        path = str(tmp_path / "i.png")
        Image.fromarray((np.random.default_rng(0).uniform(0, 255, (20, 24))).astype(np.uint8)).save(path)
    mode = "trilinear" if three_d else "area"
    new = _deterministic({"image_size": size}, files)
    old = _old_transforms(size, mode, 3 if three_d else 2)
    assert [type(t) for t in new.transforms] == [type(t) for t in old]
    for a, b in zip(new.transforms, old):
        keep = {k: v for k, v in vars(a).items() if not k.startswith("_") and not callable(v)}
        assert keep.keys() == {k for k in vars(b) if not k.startswith("_") and not callable(vars(b)[k])}
    x, y = _run(new, path), _run(Compose(old), path)
    assert torch.equal(x, y)
    # the builder's none list is the same two transforms
    from ffcl_monai.data.volume_presets import intensity_and_geometry

    built = intensity_and_geometry("none", size, mode)
    assert [type(t) for t in built] == [ScaleIntensityd, Resized]


# --- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_preset_names_the_key(tmp_path):
    from ffcl_monai.data.volume_presets import VolumePresetError, intensity_and_geometry

    with pytest.raises(VolumePresetError, match="volume_preset"):
        intensity_and_geometry("mr", image_size=[8, 8, 8])
    with pytest.raises(Exception) as e:
        _deterministic({"volume_preset": "mr", "image_size": [8, 8, 8]})
    assert "volume_preset" in str(user_error(e.value)) and "'mr'" in str(user_error(e.value))
    for key, value in (("ct_window", [40, 0]), ("target_spacing", [1, 1]), ("volume_fit", "crop")):
        with pytest.raises(Exception) as e:
            _deterministic({"volume_preset": "ct", key: value, "image_size": [8, 8, 8]})
        assert f"`{key}`" in str(user_error(e.value))
    with pytest.raises(Exception) as e:  # a 3D preset on a 2D config
        _deterministic({"volume_preset": "mri"}, ("train.yaml",))
    assert "volume_preset" in str(user_error(e.value)) and "3d.yaml" in str(user_error(e.value))


# --- the datalist header records what the preset needs ---------------------------------------------------------------


def test_data_prep_volumes_header_records_geometry(tmp_path, monkeypatch, caplog):
    from data_prep.__main__ import main
    from data_prep._testing import private_salt_file

    private_salt_file(monkeypatch, tmp_path / "salt")
    src = tmp_path / "src"
    src.mkdir()
    data = _head()
    rows = []
    for i in range(6):
        store = (_lps if i % 2 else _psr)(data, np.diag([1.0 + i * 0.1, 1.2, 1.5, 1.0]))
        _save(src / f"v{i}.nii.gz", store[0].astype(np.int16), store[1])
        rows.append(f"v{i},{i % 2}")
    (src / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "dl" / "mri.json"
    assert main(["volumes", str(src), "--out", str(out), "--modality", "MR", "--val-count", "1", "--test-count", "1",
                 "--no-progress"]) == 0
    d = json.loads(out.read_text())
    v = d["volumes"]
    assert v["modality"] == "mri" and v["suggested_volume_preset"] == "mri"
    assert v["orientations"] == {"LPS": 3, "ASR": 3}
    assert v["dtypes"] == {"int16": 6}
    # per RAS axis (the axes Spacingd resamples after Orientationd), whatever the storage order
    assert v["spacing_mm"]["min"] == pytest.approx([1.0, 1.2, 1.5])
    assert v["spacing_mm"]["median"] == pytest.approx([1.25, 1.2, 1.5])
    assert v["spacing_mm"]["max"] == pytest.approx([1.5, 1.2, 1.5])
    assert v["shape"]["min"] == v["shape"]["max"] == [24, 20, 16]  # voxels per RAS axis, too
    # typed on the way in: the header's suggestion is an enum, a poisoned one is refused naming the key
    from ffcl_monai.workflows.untrusted import UntrustedInputError, header_volume_preset

    assert header_volume_preset(d, "d.json") == "mri"
    with pytest.raises(UntrustedInputError, match="suggested_volume_preset"):
        header_volume_preset({"volumes": {"suggested_volume_preset": "mri; rm"}}, "d.json")
    assert header_volume_preset({"task": "binary"}, "d.json") is None
    # the training run logs the suggestion next to its own preset, and never applies it
    import logging

    from ffcl_monai.data.datalist import check_header

    with caplog.at_level(logging.WARNING, logger="ffcl_monai.data.datalist"):
        check_header(out, 2, 3, "binary", "none")
    assert "--volume_preset mri" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ffcl_monai.data.datalist"):
        check_header(out, 2, 3, "binary", "mri")
    assert "volume_preset" not in caplog.text


def test_mlflow_spec_rebuilds_the_preset_from_plain_data():
    """The preset is one `_target_` entry with plain arguments: preprocessing.json can hold it and rebuild it."""
    from ffcl_monai.serving.mlflow_pyfunc import build_transforms, model_spec_from_config

    parser = ConfigParser()
    parser.read_config(cfg("train.yaml", "3d.yaml"))
    parser.update({"cache_on_device": False, "volume_preset": "ct", "ct_window": [50, 350], "image_size": [8, 8, 8]})
    spec = model_spec_from_config(parser)
    json.dumps(spec)
    names = [t["_target_"].rsplit(".", 1)[1] for t in spec["transforms"]]
    assert names == ["EnsureChannelsd", "VolumePresetd", "LabelToTensord", "EnsureTyped"]
    preset = spec["transforms"][1]
    assert preset["volume_preset"] == "ct" and preset["ct_window"] == [50, 350]
    built = build_transforms(spec)
    arr = MetaTensor(torch.linspace(-500, 500, 10 * 10 * 10).reshape(1, 10, 10, 10))
    assert built({"image": arr})["image"].shape == (1, 8, 8, 8)
