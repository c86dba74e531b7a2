"""Datasets larger than memory: the cache planner (RAM / partial / disk from counts only), the compact disk cache
(MONAI PersistentDataset; epoch 2 reads no image; a changed preprocessing key invalidates it), and ``cache: ram``
being exactly the old CacheDataset."""

from __future__ import annotations

import builtins
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import LoadImaged

from conftest import CONFIGS, write_datalist
from ffcl_monai.data.transforms import cached_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prefix(image_size=(32, 32), **overrides):
    """train.yaml's deterministic_transforms, instantiated with ``image_size`` (and other key overrides)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["image_size"] = list(image_size)
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content("deterministic_transforms")


def _pngs(root: Path, n: int, size: int, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = root / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        items.append({"image": str(path), "label": i % 2})
    return items


@pytest.fixture
def count_reads(monkeypatch):
    """Every image load (LoadImageNamedd runs MONAI's LoadImaged.__call__) is counted."""
    calls = {"n": 0}
    original = LoadImaged.__call__

    def counting(self, data, reader=None):
        calls["n"] += 1
        return original(self, data, reader)

    monkeypatch.setattr(LoadImaged, "__call__", counting)
    return calls


def _plan(mode, n, image_size, cache_dir, **kw):
    from ffcl_monai.data.cache_planner import plan_cache

    return plan_cache(mode, n, image_size, 1, memory_budget_gb=kw.pop("memory_budget_gb", 1.0),
                      cache_dir=str(cache_dir), **kw)


def _epoch(ds) -> list[torch.Tensor]:
    return [b["image"] for b in DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)]


def test_disk_cache_epoch_two_reads_no_image_and_image_size_invalidates(tmp_path, count_reads):
    items = _pngs(tmp_path / "img", 6, 40)
    cache = tmp_path / "cache"
    ds = cached_dataset(items, _prefix((32, 32)), plan=_plan("disk", len(items), [32, 32], cache))
    assert count_reads["n"] == len(items)  # built once, up front
    first = _epoch(ds)
    second = _epoch(ds)
    assert count_reads["n"] == len(items)  # neither epoch decoded an image
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].shape[1:] == (1, 32, 32) and first[0].dtype == torch.float32
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(list(folders[0].glob("*.pt"))) == len(items)

    # another run with the same preprocessing reuses the files
    ds2 = cached_dataset(items, _prefix((32, 32)), plan=_plan("disk", len(items), [32, 32], cache))
    _epoch(ds2)
    assert count_reads["n"] == len(items)

    # a changed preprocessing key: a new cache folder, every image read again, the old folder left alone
    ds3 = cached_dataset(items, _prefix((24, 24)), plan=_plan("disk", len(items), [24, 24], cache))
    assert count_reads["n"] == 2 * len(items)
    assert _epoch(ds3)[0].shape[1:] == (1, 24, 24)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    ds4 = cached_dataset(items, _prefix((32, 32), resize_mode="bilinear"), plan=_plan("disk", len(items), [32, 32], cache))
    assert count_reads["n"] == 3 * len(items) and ds4.cache_dir not in (ds.cache_dir, ds3.cache_dir)

    # a replaced image file (new size/mtime) is recomputed; the others are not
    from PIL import Image

    Image.fromarray(np.full((40, 40), 7, dtype=np.uint8)).save(items[0]["image"])
    ds5 = cached_dataset(items, _prefix((32, 32)), plan=_plan("disk", len(items), [32, 32], cache))
    assert count_reads["n"] == 3 * len(items) + 1
    assert float(ds5[0]["image"].max()) == 0.0  # ScaleIntensity of a constant image


def test_compact_disk_cache_is_4x_smaller_and_matches_ram(tmp_path):
    items = _pngs(tmp_path / "img", 3, 256)
    prefix = _prefix((224, 224))
    ram = cached_dataset(items, prefix)  # the in-RAM float32 cache, as before
    compact = cached_dataset(items, prefix, plan=_plan("disk", 3, [224, 224], tmp_path / "c"))
    exact = cached_dataset(items, prefix, plan=_plan("disk", 3, [224, 224], tmp_path / "f", compact=False))
    size_c = sum(p.stat().st_size for p in Path(compact.cache_dir).glob("*.pt"))
    size_f = sum(p.stat().st_size for p in Path(exact.cache_dir).glob("*.pt"))
    assert size_f / size_c > 3.5, (size_f, size_c)  # 224*224 uint8 vs float32, plus torch.save's ~3 KB per file
    stored = torch.load(next(Path(compact.cache_dir).glob("*.pt")), weights_only=True)
    assert stored["image"].dtype == torch.uint8
    for i in range(3):
        r, c, f = ram[i]["image"], compact[i]["image"], exact[i]["image"]
        assert c.dtype == f.dtype == torch.float32 and c.shape == r.shape
        assert float((c - r).abs().max()) <= 0.5 / 255 + 1e-6  # half a step of the 8-bit source
        assert torch.equal(f, r)  # cache_compact false: bit-identical to the RAM cache
        assert torch.equal(compact[i]["label"], ram[i]["label"])


def test_compact_16bit_source_is_stored_as_uint16(tmp_path):
    rng = np.random.default_rng(1)
    items = []
    for i in range(2):
        path = tmp_path / f"v{i}.npy"
        np.save(path, rng.integers(0, 4096, (48, 48)).astype(np.uint16))  # a 12-bit detector image
        items.append({"image": str(path), "label": 0})
    prefix = _prefix((32, 32))
    ram = cached_dataset(items, prefix)
    disk = cached_dataset(items, prefix, plan=_plan("disk", 2, [32, 32], tmp_path / "c"))
    stored = torch.load(next(Path(disk.cache_dir).glob("*.pt")), weights_only=True)
    assert stored["image"].dtype == torch.uint16
    for i in range(2):
        assert float((disk[i]["image"] - ram[i]["image"]).abs().max()) <= 0.5 / 65535 + 1e-6


def test_planner_chooses_ram_partial_disk_from_counts_only(tmp_path, monkeypatch):
    from ffcl_monai.data.cache_planner import bytes_per_item, count_items, plan_cache

    n = 100_000
    missing = [{"image": str(tmp_path / "nowhere" / f"{i}.png"), "label": 0} for i in range(n)]
    datalist = write_datalist(tmp_path, {"training": missing[:90_000], "validation": missing[90_000:]})
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    count = count_items(datalist)
    assert count == n
    item = bytes_per_item([224, 224], 1)
    assert item == 224 * 224 * 4
    need_gb = n * item / 2**30  # 18.7 GB as float32
    ram = plan_cache("auto", count, [224, 224], 1, memory_budget_gb=2 * need_gb, device="cpu", log=False)
    partial = plan_cache("auto", count, [224, 224], 1, memory_budget_gb=0.5 * need_gb, device="cpu")
    disk = plan_cache("auto", count, [224, 224], 1, memory_budget_gb=0.02 * need_gb, device="cpu")
    assert (ram.mode, ram.cache_rate, ram.on_device) == ("ram", 1.0, False)
    assert partial.mode == "partial" and 0.45 < partial.cache_rate <= 0.5 and not partial.on_device
    assert (disk.mode, disk.cache_rate) == ("disk", 0.0)
    assert "18.69 GiB" in str(disk) and "budget" in str(disk)
    assert not any("nowhere" in p for p in opened), opened  # no image was opened to decide
    assert opened == [str(datalist)]
    # the default budget comes from the RAM available now; cache: ram keeps cache_rate as given
    assert plan_cache("auto", 10, [32, 32], 1, log=False).mode == "ram"
    assert plan_cache("ram", count, [224, 224], 1, cache_rate=0.3, memory_budget_gb=0.001, log=False).cache_rate == 0.3
    assert plan_cache("ram", count, [224, 224], 1, cache_rate=0.0, log=False).mode == "none"
    assert plan_cache("none", count, [224, 224], 1, log=False).mode == "none"
    with pytest.raises(ValueError, match="cache"):
        plan_cache("sometimes", 1, [32, 32], 1)


def test_cache_ram_is_the_old_cache_dataset(tmp_path):
    items = _pngs(tmp_path / "img", 4, 40)
    prefix = _prefix((32, 32))
    old = cached_dataset(items, prefix, 1.0)
    new = cached_dataset(items, prefix, 1.0, plan=_plan("ram", 4, [32, 32], tmp_path / "c", cache_rate=1.0))
    assert type(old) is type(new) is CacheDataset
    assert new.cache_num == old.cache_num == 4 and new.copy_cache == old.copy_cache
    assert all(torch.equal(old[i]["image"], new[i]["image"]) for i in range(4))
    half = cached_dataset(items, prefix, 0.5, plan=_plan("ram", 4, [32, 32], tmp_path / "c", cache_rate=0.5))
    assert type(half) is CacheDataset and half.cache_num == 2
    none = cached_dataset(items, prefix, 0.0, plan=_plan("ram", 4, [32, 32], tmp_path / "c", cache_rate=0.0))
    assert type(none) is Dataset
    assert not (tmp_path / "c").exists()  # nothing written to disk


def test_partial_cache_ram_part_exact_rest_on_disk(tmp_path, count_reads):
    from ffcl_monai.data.disk_cache import PartialCacheDataset

    items = _pngs(tmp_path / "img", 6, 40)
    prefix = _prefix((32, 32))
    ram = cached_dataset(items, prefix)
    count_reads["n"] = 0
    plan = _plan("auto", 6, [32, 32], tmp_path / "c", memory_budget_gb=6 * 32 * 32 * 4 * 0.5 / 2**30)
    assert plan.mode == "partial" and plan.cache_rate == 0.5
    ds = cached_dataset(items, prefix, plan=plan)
    assert isinstance(ds, PartialCacheDataset) and ds.n_ram == 3
    assert count_reads["n"] == 6
    _epoch(ds), _epoch(ds)
    assert count_reads["n"] == 6
    for i in range(6):
        diff = float((ds[i]["image"] - ram[i]["image"]).abs().max())
        assert diff == 0.0 if i < 3 else diff <= 0.5 / 255 + 1e-6


def test_two_view_dataset_on_disk(tmp_path, count_reads):
    from ffcl_monai.data.two_view import two_view_dataset

    items = [{"image": d["image"]} for d in _pngs(tmp_path / "img", 4, 40)]
    augment = {"flip": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 1}}
    ds = two_view_dataset(items, _prefix((32, 32)), augment, plan=_plan("disk", 4, [32, 32], tmp_path / "c"))
    n = count_reads["n"]
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["view1"].shape == batch["view2"].shape == (4, 1, 32, 32) and "image" not in batch
    assert count_reads["n"] == n


def test_train_yaml_cache_auto_is_ram_for_small_data(tiny2d):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["datalist"] = str(tiny2d)
    parser["image_size"] = [32, 32]
    assert parser["cache"] == "auto"
    plan = parser.get_parsed_content("cache_plan")
    content = json.loads(Path(tiny2d).read_text())
    assert plan.mode == "ram" and plan.cache_rate == 1.0 and plan.n_items == len(content["training"]) + len(content["validation"])
    assert parser.get_parsed_content("cache_on_device") == (plan.on_device)
    if not torch.cuda.is_available():
        assert plan.on_device is False
    import yaml

    assert "$import ffcl_monai.data.cache_planner" in yaml.safe_load((CONFIGS / "train.yaml").read_text())["imports"]


def test_train_yaml_runs_with_the_disk_cache(tiny2d, tmp_path, count_reads):
    """train.yaml end to end with `cache: disk` (train + validation datasets on disk, then a second run reuses them)."""
    from conftest import FAST, cfg, run_bundle

    cache = tmp_path / "cache"
    common = {**FAST, "max_epochs": 2, "cache": "disk", "cache_dir": str(cache), "datalist": str(tiny2d),
              "log_model": False}
    run_bundle(cfg("train.yaml"), output_dir=str(tmp_path / "a"), **common)
    content = json.loads(Path(tiny2d).read_text())
    n = len(content["training"]) + len(content["validation"])
    assert (tmp_path / "a" / "models" / "model.pt").is_file()
    assert count_reads["n"] == n  # once each, although 2 epochs trained and validated
    assert sum(len(list(p.glob("*.pt"))) for p in cache.iterdir()) == n
    run_bundle(cfg("train.yaml"), output_dir=str(tmp_path / "b"), **common)
    assert count_reads["n"] == n  # the second run decoded nothing


def test_cache_key_is_the_same_after_the_transforms_ran(tmp_path):
    """The cached prefix is shared by the validation and training datasets: the key of the second must not change
    because the first ran the transforms (MONAI readers remember their last file, transforms their tracing switch)."""
    from monai.transforms import Compose

    from conftest import make_3d
    from ffcl_monai.data.disk_cache import compact_pipeline, prefix_hash

    vol = make_3d(tmp_path / "v")
    first = json.loads(vol.read_text())["training"][0]["image"]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "3d.yaml")])
    for prefix, item in ((parser.get_parsed_content("deterministic_transforms"), {"image": str(tmp_path / "v" / first)}),
                         (_prefix((32, 32)), _pngs(tmp_path / "img", 1, 40)[0])):
        cached = compact_pipeline(prefix)[1]
        before = prefix_hash(cached, True)
        Compose(cached)(dict(item, label=0))
        assert prefix_hash(cached, True) == before


@pytest.mark.parametrize("overlay", ["pretrain_simclr.yaml", "pretrain_barlow.yaml", "ff.yaml"])
def test_overlays_use_the_plan(tiny2d, tmp_path, overlay):
    """Every YAML dataset built by cached_dataset / two_view_dataset follows `cache` (here: disk)."""
    from ffcl_monai.data.disk_cache import DiskCacheDataset

    files = ["train.yaml", overlay] if overlay != "pretrain_barlow.yaml" else ["train.yaml", "pretrain_simclr.yaml", overlay]
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"datalist": str(tiny2d), "cache": "disk", "cache_dir": str(tmp_path / "c"), "image_size": [16, 16]})
    ds = parser.get_parsed_content("train#dataset")
    assert isinstance(ds, DiskCacheDataset) and len(ds) > 0
    item = ds[0]
    assert ("view1" in item) if overlay != "ff.yaml" else (item["image"].shape[-2:] == (16, 16))
