"""Unit checks of the MONAI Label app's own code (no server): --conf parsing, label mapping, config merging.

Run in the label environment: ``.label-venv/bin/python -m pytest -m label tests/label``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.label

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "monailabel_app"
CONFIGS = REPO / "bundle" / "configs"
NAMES = {0: "NORMAL", 1: "PNEUMONIA"}


@pytest.fixture(scope="module")
def lib():
    pytest.importorskip("monailabel", reason="MONAI Label runs in its own environment: bash monailabel_app/setup_env.sh")
    sys.path.insert(0, str(APP))
    try:
        import lib.configs
        import lib.models
        import lib.trainers.classifier

        yield lib
    finally:
        sys.path.remove(str(APP))


def test_parse_models_defaults_and_overrides(lib, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    specs = lib.models.parse_models({"models": "xray,volume3d", "model_path": str(ckpt), "model_dir": str(tmp_path)})
    xray, vol = specs
    assert (xray.dimension, xray.overlays, xray.checkpoint) == (2, (), ckpt.resolve())
    assert (vol.dimension, vol.overlays) == (3, ("3d.yaml",))
    assert vol.checkpoint == CONFIGS.parent / "models" / "model_3d.pt"  # model_path is the first model's only
    assert xray.trained_checkpoint == tmp_path.resolve() / "xray" / "models" / "model.pt"
    assert [p.name for p in vol.config_files("inference")] == ["common.yaml", "inference.yaml", "3d.yaml"]
    custom = lib.models.parse_models({"models": "oct", "oct_overlays": ""})[0]
    assert (custom.dimension, custom.overlays) == (2, ())


@pytest.mark.parametrize(
    "conf, message",
    [
        ({"models": "ct"}, "unknown model name"),
        ({"models": ""}, "empty"),
        ({"models": "xray", "model_path": "/nonexistent/model.pt"}, "does not exist"),
        ({"models": "xray", "bundle_path": "/tmp"}, "is not a bundle"),
    ],
)
def test_parse_models_errors(lib, conf: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lib.models.parse_models(conf)


def test_class_names_from_channel_def(lib) -> None:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    names = lib.models.class_names(meta)
    assert names == {int(k): v for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}


@pytest.mark.parametrize(
    "file_name, content, info, expected",
    [
        ("a.json", '{"label": "PNEUMONIA"}', None, 1),
        ("a.json", '{"class": "normal"}', None, 0),
        ("a.json", '"Pneumonia"', None, 1),
        ("a.json", "1", None, 1),
        ("a.txt", "NORMAL\n", None, 0),
        ("a.txt", "0", None, 0),
        ("a.json", "{}", {"label": "PNEUMONIA"}, 1),
        ("a.nii.gz", "not read", {"label": 0}, 0),
    ],
)
def test_read_class_label(lib, tmp_path: Path, file_name: str, content: str, info, expected: int) -> None:
    path = tmp_path / file_name
    path.write_text(content)
    assert lib.trainers.classifier.read_class_label(str(path), info, NAMES) == expected


@pytest.mark.parametrize("content, info", [('{"label": "COVID"}', None), ("2", None), ("{}", None), ("{", None)])
def test_read_class_label_errors(lib, tmp_path: Path, content: str, info) -> None:
    path = tmp_path / "a.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"label|JSON"):
        lib.trainers.classifier.read_class_label(str(path), info, NAMES)


def test_overlay_merge_matches_monai_and_skips_other_workflow_sections(lib, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    files = [CONFIGS / "common.yaml", CONFIGS / "train.yaml", CONFIGS / "3d.yaml"]
    merged = lib.configs.merge_config_files(files)
    assert merged == ConfigParser.load_config_files([str(f) for f in files]), "must merge exactly as MONAI does"
    assert merged["spatial_dims"] == 3
    # an overlay key for another workflow's section: MONAI raises KeyError, the app skips it
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("spatial_dims: 3\ntrain#augmentations: []\n+deterministic_transforms: []\n")
    infer = lib.configs.merge_config_files([CONFIGS / "common.yaml", CONFIGS / "inference.yaml", overlay])
    assert infer["spatial_dims"] == 3 and "train" not in infer


def test_torchvision_stub_only_covers_utils(lib) -> None:
    code = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1])\n"
        "from lib.compat import install_torchvision_stub\n"
        "real = importlib.util.find_spec('torchvision') is not None\n"
        "installed = install_torchvision_stub()\n"
        "assert installed != real\n"
        "from torchvision.utils import make_grid\n"
        "if installed:\n"
        "    try:\n"
        "        import torchvision\n"
        "        raise SystemExit('torchvision must stay un-importable')\n"
        "    except ImportError:\n"
        "        pass\n"
        "    try:\n"
        "        make_grid(None)\n"
        "        raise SystemExit('the stand-in must raise')\n"
        "    except ImportError as e:\n"
        "        assert 'not available' in str(e)\n"
        "import monailabel.transform.post  # the import that needs it\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(APP)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
