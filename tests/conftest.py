"""Shared fixtures: tiny real-format datasets built in the test session (PNG 2D, NIfTI 3D) and bundle helpers.

Nothing here reads ../shared: CI and users' clones may not have it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
FAST = {"image_size": [32, 32], "backbone": "resnet10", "batch_size": 8, "max_epochs": 2, "n_bootstrap": 50}


def cfg(*names: str) -> list[str]:
    """Absolute paths of bundle config files."""
    return [str(CONFIGS / n) for n in names]


def write_datalist(root: Path, splits: dict[str, list[dict]], **header) -> Path:
    """Write a decathlon datalist JSON next to the images (paths relative to it)."""
    content = {"task": "binary", "labels": {"0": "NORMAL", "1": "PNEUMONIA"}, "num_classes": 2, "spatial_dims": 2}
    content.update(header)
    content.update(splits)
    path = root / "datalist.json"
    path.write_text(json.dumps(content, indent=2))
    return path


def _disk(size: int, radius: float, dims: int) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2] * dims, indexing="ij"))
    return (np.sqrt((grid**2).sum(0)) < radius).astype(np.float32)


def make_2d(root: Path, counts=(12, 6, 6), size: int = 32, seed: int = 0) -> Path:
    """Two visually separable classes: background noise (0) vs noise plus a bright disk (1), as 8-bit PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in zip(("training", "validation", "test"), counts):
        entries = []
        for i in range(n):
            label = i % 2
            img = rng.uniform(0, 0.4, (size, size)) + label * 0.6 * _disk(size, size / 4, 2)
            rel = f"{split}/img_{i:03d}.png"
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / rel)
            entries.append({"image": rel, "label": label, "patient": f"p{split}{i}"})
        splits[split] = entries
    return write_datalist(root, splits)


def make_3d(root: Path, counts=(8, 4, 4), size: int = 16, seed: int = 0) -> Path:
    """Two classes of small NIfTI volumes (noise vs noise plus a bright ball)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in zip(("training", "validation", "test"), counts):
        entries = []
        for i in range(n):
            label = i % 2
            vol = rng.uniform(0, 0.4, (size,) * 3) + label * 0.6 * _disk(size, size / 4, 3)
            rel = f"{split}/vol_{i:03d}.nii.gz"
            (root / split).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(root / rel))
            entries.append({"image": rel, "label": label})
        splits[split] = entries
    return write_datalist(root, splits, spatial_dims=3, labels={"0": "absent", "1": "present"})


@pytest.fixture(autouse=True, scope="session")
def private_salt_file(tmp_path_factory):
    """data_prep stores a generated pseudonym salt in ~/.config by default; tests keep theirs in a temporary folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DATA_PREP_SALT_FILE", str(tmp_path_factory.mktemp("salt") / "data_prep_salt"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def fresh_tracking_state():
    """Each test starts as a fresh process would: tracking has not worked yet (an unreachable store fails fast)."""
    mod = sys.modules.get("ffcl_monai.handlers.mlflow_tracking")
    if mod is not None:
        mod._TRACKING["started"] = False
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: small CPU kernels on a shared 2-core machine run many times faster
    without OpenMP threads spinning against other processes. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny2d(tmp_path_factory) -> Path:
    return make_2d(tmp_path_factory.mktemp("tiny2d"))


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory) -> Path:
    return make_3d(tmp_path_factory.mktemp("tiny3d"))


def user_error(exc: BaseException) -> BaseException:
    """The user-facing error (UserInputError or FloatingPointError) inside MONAI's RuntimeError wrapping."""
    from ffcl_monai.errors import UserInputError

    seen = exc
    while seen is not None:
        if isinstance(seen, (UserInputError, FloatingPointError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no user-facing error in {exc!r}")


def tree_digest(root: Path) -> str:
    """Hash of every file's path and bytes under root: proves inputs were not modified."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_bundle(configs: list[str], **overrides) -> None:
    """Run a bundle workflow in-process, like `python -m monai.bundle run`."""
    from monai.bundle import run

    run(config_file=configs, meta_file=str(CONFIGS / "metadata.json"), logging_file=str(CONFIGS / "logging.conf"),
        **overrides)


def bundle_cli(args: list[str], timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m monai.bundle ...` in a subprocess from the repo root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def cli_value(v) -> str:
    """A value as `python -m monai.bundle run` (fire) must see it: booleans as True/False (fire keeps lower-case
    true/false as strings, and the string 'false' is truthy), other non-strings as JSON."""
    if isinstance(v, bool):
        return str(v)
    return v if isinstance(v, str) else json.dumps(v)


def overrides_cli(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", cli_value(v)]
    return out
