"""Two-view pipeline: cached deterministic base, two independently random views, config-driven augmentations."""

from __future__ import annotations

import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import EnsureTyped

from ffcl_monai.data.augmentations import build_augmentations, default_augment
from ffcl_monai.data.two_view import TwoViewd, strip_labels, two_view_dataset

DET = [EnsureTyped(keys="image", track_meta=False)]


def _items(n: int, dims: int = 2, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand((1,) + (size,) * dims, generator=g), "label": i % 2} for i in range(n)]


def test_views_differ_and_cache_holds_only_the_base() -> None:
    items = _items(4)
    ds = two_view_dataset(items, DET, default_augment(2, [16, 16]))
    assert isinstance(ds, CacheDataset)
    base = [c["image"].clone() for c in ds._cache]
    assert all(set(c) == {"image", "label"} for c in ds._cache)  # cache stops before the first random transform
    a, b = ds[0], ds[0]
    assert set(a) >= {"view1", "view2"} and "image" not in a
    assert a["view1"].shape == a["view2"].shape == (1, 16, 16)
    assert not torch.allclose(a["view1"], a["view2"])
    assert not torch.allclose(a["view1"], b["view1"])  # a new draw per iteration
    for c, ref in zip(ds._cache, base):
        assert torch.equal(c["image"], ref)  # the cached base is never modified by the views


def test_each_view_has_its_own_random_draw() -> None:
    """One RandFlipd call on two keys flips both or neither; TwoViewd must flip them independently."""
    img = torch.arange(16.0).reshape(1, 4, 4)
    t = TwoViewd({"flip": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 1}})
    t.set_random_state(seed=0)
    same = [torch.equal(o["view1"], o["view2"]) for o in (t({"image": img}) for _ in range(40))]
    assert 5 < sum(same) < 35  # independent coin flips agree about half of the time, not always


def test_seeded_views_are_reproducible() -> None:
    aug = default_augment(2, [16, 16])
    img = {"image": _items(1)[0]["image"]}
    t1, t2 = TwoViewd(aug), TwoViewd(aug)
    t1.set_random_state(seed=3)
    t2.set_random_state(seed=3)
    o1, o2 = t1(img), t2(img)
    assert torch.equal(o1["view1"], o2["view1"]) and torch.equal(o1["view2"], o2["view2"])


def test_3d_views() -> None:
    ds = two_view_dataset(_items(2, dims=3), DET, default_augment(3, [16, 16, 16]))
    out = ds[1]
    assert out["view1"].shape == (1, 16, 16, 16) and not torch.allclose(out["view1"], out["view2"])


def test_augmentations_come_from_config() -> None:
    aug = {"flip": {"transform": "RandFlipd", "prob": 1.0, "spatial_axis": 1}, "noise": None}
    compose = build_augmentations(aug, "view1")
    assert [type(t).__name__ for t in compose.transforms] == ["RandFlipd"]
    img = torch.arange(4.0).reshape(1, 2, 2)
    assert torch.equal(compose({"view1": img})["view1"], img.flip(-1))
    with pytest.raises(ValueError, match="unknown transform"):
        build_augmentations({"x": {"transform": "NoSuchTransformd"}}, "view1")
    with pytest.raises(ValueError, match="augment_"):
        build_augmentations({"flip": {"transform": "RandFlipd", "bogus": 1}}, "view1")


def test_unlabeled_entries_are_accepted() -> None:
    items = [{"image": torch.rand(1, 8, 8)} for _ in range(3)] + [{"image": torch.rand(1, 8, 8), "label": 1}]
    stripped = strip_labels(items)
    assert all(set(d) == {"image"} for d in stripped)
    ds = two_view_dataset(stripped, DET, {"flip": {"transform": "RandFlipd", "prob": 0.5}})
    assert len(ds) == 4 and "view2" in ds[3]
