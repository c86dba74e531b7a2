"""The two speed choices in the default augmentations: torch-drawn Gaussian noise and RandAffined's fixed grid.

Both must leave the augmentation itself unchanged: same distribution of noise, same reproducibility under
``set_random_state``, same output size, and the YAML defaults must equal :func:`default_augment`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import RandAffined

from ffcl_monai.bench.simclr_epoch import plain_monai_augment
from ffcl_monai.data.transforms import RandGaussianNoiseTorchd
from ffcl_monai.data.augmentations import build_augmentations, default_augment

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def test_noise_has_the_requested_mean_and_std() -> None:
    t = RandGaussianNoiseTorchd(keys="image", prob=1.0, mean=0.1, std=0.5, sample_std=False).set_random_state(0)
    out = t({"image": torch.zeros(1, 128, 128)})["image"]
    assert out.dtype == torch.float32
    assert abs(float(out.mean()) - 0.1) < 0.01
    assert abs(float(out.std()) - 0.5) < 0.01


def test_sampled_std_is_uniform_between_zero_and_std() -> None:
    t = RandGaussianNoiseTorchd(keys="image", prob=1.0, std=0.2, sample_std=True).set_random_state(1)
    stds = torch.tensor([float(t({"image": torch.zeros(1, 64, 64)})["image"].std()) for _ in range(200)])
    assert float(stds.max()) <= 0.2 * 1.05  # never above `std` (up to the sampling error of a 64x64 field)
    assert abs(float(stds.mean()) - 0.1) < 0.015  # U(0, 0.2) has mean 0.1


def test_noise_is_reproducible_probabilistic_and_leaves_the_input_alone() -> None:
    img = torch.rand(1, 16, 16, 16)
    before = img.clone()
    a = RandGaussianNoiseTorchd(keys="image", prob=0.5, std=0.1).set_random_state(7)
    b = RandGaussianNoiseTorchd(keys="image", prob=0.5, std=0.1).set_random_state(7)
    outs_a = [a({"image": img})["image"] for _ in range(20)]
    outs_b = [b({"image": img})["image"] for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))  # same seed, same draws
    fired = [not torch.equal(x, img) for x in outs_a]
    assert 3 < sum(fired) < 17  # prob 0.5 fires about half of the time
    assert not torch.equal(outs_a[fired.index(True)], outs_a[len(fired) - 1 - fired[::-1].index(True)])
    assert torch.equal(img, before)


def test_noise_is_shared_by_keys_and_makes_integers_float() -> None:
    t = RandGaussianNoiseTorchd(keys=["a", "b"], prob=1.0, std=1.0).set_random_state(0)
    out = t({"a": torch.zeros(1, 8, 8, dtype=torch.int64), "b": torch.ones(1, 8, 8)})
    assert out["a"].dtype == torch.float32
    assert torch.allclose(out["b"] - 1.0, out["a"])  # one noise field for all keys, as RandGaussianNoised


def test_negative_std_is_rejected() -> None:
    with pytest.raises(ValueError, match="std must be >= 0"):
        RandGaussianNoiseTorchd(keys="image", std=-0.1)


@pytest.mark.parametrize("dims", [2, 3])
def test_fixed_grid_affine_keeps_size_and_reuses_its_grid(dims: int) -> None:
    size = [24] * dims
    compose = build_augmentations({"affine": {**default_augment(dims, size)["affine"], "prob": 1.0}}, "image")
    affine = compose.transforms[0]
    assert isinstance(affine, RandAffined) and affine.rand_affine._cached_grid is not None
    img = torch.rand(1, *size)
    out = compose({"image": img})["image"]
    assert tuple(out.shape) == (1, *size) and not torch.allclose(out, img)


@pytest.mark.parametrize("dims", [2, 3])
def test_fixed_grid_gives_the_same_views_as_monai_without_it(dims: int) -> None:
    """cache_grid only reuses the identity grid: seeded outputs equal plain RandAffined's to float precision."""
    size = [20] * dims
    spec = {"affine": {**default_augment(dims, size)["affine"], "prob": 1.0}}
    fast = build_augmentations(spec, "image").set_random_state(3)
    plain = build_augmentations(plain_monai_augment(spec), "image").set_random_state(3)
    img = torch.rand(1, *size)
    for _ in range(3):
        assert torch.allclose(fast({"image": img})["image"], plain({"image": img})["image"], atol=1e-5)


@pytest.mark.parametrize("config,dims", [("pretrain_simclr.yaml", 2), ("pretrain_simclr.yaml", 3)])
def test_yaml_augment_defaults_equal_default_augment(config: str, dims: int) -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / config)])
    size = [32] * dims
    parser["spatial_dims"] = dims
    parser["image_size"] = size
    parser["device"] = "cpu"
    parser["cache_on_device"] = False
    yaml_augment = parser.get_parsed_content(f"augment_{dims}d")
    for spec in yaml_augment.values():
        spec.pop("device", None)  # where the grid lives: a run-time choice, not part of the augmentation
    assert yaml_augment == default_augment(dims, size)
