"""One SimCLR epoch on the same 3D NIfTI volumes and model, three ways, side by side in one process.

Contenders (each one epoch over the same ``n`` volumes, same batch size, same ContrastiveModel, alternating; epoch 1
is a warm-up, then the median of the repeats):
    - ``project``: the bundle's own workflow, ``train.yaml`` + ``pretrain_simclr.yaml`` + ``3d.yaml`` built by
      ``monai.bundle.ConfigWorkflow`` as ``python -m monai.bundle run`` builds it: CacheDataset of the deterministic
      prefix (load, scale, resize: once), two views per image drawn on the fly (``TwoViewd``), the ``loader_class`` loader,
      ``TwoViewTrainer`` (one forward over both views), NT-Xent, and all of the workflow's handlers.
    - ``seed_style``: a loop in the style of seed 001: a torch ``Dataset`` that reloads and preprocesses the NIfTI file
      every step (no cache), the same two augmentation pipelines, ``torch.utils.data.DataLoader`` (no workers), one
      forward per view and ``monai.losses.ContrastiveLoss``.
    - ``model_only``: the same network, optimizer and NT-Xent on pre-made two-view batches of tensors on the device.

A fourth, smaller comparison times the two views' augmentations alone on the cached volumes (ms per view): the
project's defaults (RandAffined with a fixed output size and ``cache_grid``, ``RandGaussianNoiseTorchd``) against the
same list as plain MONAI would run it (RandAffined rebuilding its grid per view, ``RandGaussianNoised`` drawing
float64 numpy noise). It keeps the measurement behind those two choices.

Headlines: ``project_over_model_only`` (target >= 0.90) and ``speedup_over_seed_style`` (seed-style epoch time /
project epoch time). Data: ``adrenal3d_64`` (64^3 NIfTI) from ``--data-root`` if present, else synthetic NIfTI volumes
of the same size in a temporary folder. On GPU the defaults are batch 64 and 96^3, where loading dominates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from ffcl_monai.bench.common import BenchResult
from ffcl_monai.bench.pipeline import EpochInterleaver, as_plain, bench_datalist, build_workflow


class SeedStyleDataset(torch.utils.data.Dataset):
    """Seed 001's data path: every item is read from disk and preprocessed again, then augmented twice."""

    def __init__(self, items: list[dict], deterministic: Any, views: list[Any]) -> None:
        self.items = items
        self.deterministic = deterministic
        self.views = views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.deterministic(dict(self.items[i]))
        v1 = self.views[0]({"view1": d["image"]})["view1"]
        v2 = self.views[1]({"view2": d["image"].clone()})["view2"]
        return torch.as_tensor(v1), torch.as_tensor(v2)


def plain_monai_augment(augment: dict[str, Any]) -> dict[str, Any]:
    """The same augmentation mapping without the project's two speed choices (see the module docstring)."""
    plain: dict[str, Any] = {}
    for name, spec in augment.items():
        if spec and spec.get("transform") == "RandAffined":
            spec = {k: v for k, v in spec.items() if k not in ("spatial_size", "cache_grid")}
        elif spec and str(spec.get("transform", "")).endswith("RandGaussianNoiseTorchd"):
            spec = {**spec, "transform": "RandGaussianNoised"}
        plain[name] = spec
    return plain


def _augment_ms_per_view(augment: dict[str, Any], bases: list[torch.Tensor], device: str) -> dict[str, float]:
    """Median ms per view of the two-view augmentation, project defaults vs plain MONAI, alternating."""
    from monai.data import get_track_meta, set_track_meta

    from ffcl_monai.bench.common import time_interleaved
    from ffcl_monai.data.two_view import TwoViewd

    def runner(aug: dict[str, Any]) -> Any:
        two_view = TwoViewd(aug).set_random_state(0)
        return lambda: [two_view({"image": b}) for b in bases]

    track = get_track_meta()
    set_track_meta(False)  # as in the workflow's epochs: the run list switches metadata tracking off after caching
    try:
        timed = time_interleaved({"project": runner(augment), "plain_monai": runner(plain_monai_augment(augment))},
                                 warmup=1, repeats=5, device=device)
    finally:
        set_track_meta(track)
    return {k: 1e3 * v["median_s"] / (2 * len(bases)) for k, v in timed.items()}


def _measure(device: str, quick: bool, data_root: str | None, tmp: Path) -> dict[str, Any]:
    on_gpu = torch.device(device).type == "cuda"
    if quick:
        size, n, batch = 32, 16, 8
    elif on_gpu:
        size, n, batch = 96, 512, 64
    else:
        size, n, batch = 64, 64, 16
    datalist, source = bench_datalist(data_root, "adrenal3d_64", tmp / "d3", 3, 64, n)
    warmup, repeats = (1, 2) if quick else (1, 4)  # 4 timed epochs: epochs of 4 steps vary by several %
    overrides: dict[str, Any] = {
        "datalist": str(datalist), "output_dir": str(tmp / "simclr"), "image_size": [size] * 3,
        "backbone": "resnet10", "batch_size": batch, "max_epochs": warmup + repeats, "progress": False,
        "device": device,
        "monitor_interval": 0,  # the embedding monitor's cost has its own side-by-side bench: `bench monitor`
    }
    wf = build_workflow(["train.yaml", "pretrain_simclr.yaml", "3d.yaml"], overrides)
    get = wf.parser.get_parsed_content
    trainer, network, optimizer, loss_fn = get("train#trainer"), get("network"), get("optimizer"), get("loss")
    amp = bool(get("amp"))
    steps = len(get("train#dataloader"))
    dev_type = torch.device(device).type

    # --- seed-style loop: same volumes, same model, same augmentations, no cache, ContrastiveLoss ---
    from monai.data import set_track_meta
    from monai.losses import ContrastiveLoss
    from monai.transforms import Compose

    from ffcl_monai.data.augmentations import build_augmentations

    augment = get("augment")
    deterministic = Compose(get("deterministic_transforms"))
    views = [build_augmentations(augment, "view1"), build_augmentations(augment, "view2")]
    items = get("train#datalist")
    seed_loader = torch.utils.data.DataLoader(SeedStyleDataset(items, deterministic, views), batch_size=batch,
                                              shuffle=True, drop_last=True, num_workers=0)
    contrastive = ContrastiveLoss(temperature=float(get("temperature")))

    def seed_style_epoch() -> None:
        network.train()
        set_track_meta(True)  # the seed's loop keeps MONAI's default metadata tracking
        try:
            for v1, v2 in seed_loader:
                v1, v2 = v1.to(device), v2.to(device)
                optimizer.zero_grad()
                with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
                    _, z1 = network(v1)
                    _, z2 = network(v2)
                loss = contrastive(z1.float(), z2.float())
                loss.backward()
                optimizer.step()
        finally:
            set_track_meta(False)  # the project's run list switched it off after caching

    # --- model-only: one pre-made two-view batch already on the device ---
    dataset = get("train#dataset")
    # One pre-made pair of view batches per iteration (a single repeated batch would drift into slow denormals).
    premade = []
    for i in range(steps):
        samples = [dataset[(i * batch + j) % len(dataset)] for j in range(batch)]
        premade.append((torch.stack([as_plain(s["view1"], device) for s in samples]),
                        torch.stack([as_plain(s["view2"], device) for s in samples])))

    def model_only_epoch() -> None:
        network.train()
        for x1, x2 in premade:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=amp):
                _, z = network(torch.cat([x1, x2]))
                loss = loss_fn(z[:batch], z[batch:])
            loss.backward()
            optimizer.step()

    timer = EpochInterleaver("project", {"seed_style": seed_style_epoch, "model_only": model_only_epoch}, warmup,
                             device)
    timer.attach(trainer)
    wf.run()  # pretrain_simclr.yaml's run: build the cache, set_track_meta(False), train
    wf.finalize()
    set_track_meta(True)
    med = timer.medians()
    bases = [as_plain(deterministic(dict(item))["image"], device) for item in items[:32]]
    augment_ms = _augment_ms_per_view(augment, bases, device)
    n_img = steps * batch
    return {
        "data": source,
        "volume": f"{size}^3",
        "backbone": "resnet10",
        "batch": batch,
        "iters_per_epoch": steps,
        "amp": amp,
        "project_img_s": n_img / med["project"],
        "seed_style_img_s": n_img / med["seed_style"],
        "model_only_img_s": n_img / med["model_only"],
        "project_over_model_only": med["model_only"] / med["project"],
        "seed_style_over_model_only": med["model_only"] / med["seed_style"],
        "speedup_over_seed_style": med["seed_style"] / med["project"],
        "epochs_timed": len(timer.samples["project"]),
        "augment_ms_per_view": augment_ms["project"],
        "plain_monai_augment_ms_per_view": augment_ms["plain_monai"],
        "augment_speedup_over_plain_monai": augment_ms["plain_monai"] / augment_ms["project"],
    }


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Run the SimCLR-epoch bench; see the module docstring."""
    result = BenchResult(name="simclr_epoch")
    with tempfile.TemporaryDirectory(prefix="ffcl_bench_simclr_") as tmp:
        row = _measure(device, quick, data_root, Path(tmp))
    result.rows.append(row)
    for k in ("project_over_model_only", "seed_style_over_model_only", "speedup_over_seed_style",
              "augment_speedup_over_plain_monai"):
        result.ratios[k] = row[k]
    result.targets["project_over_model_only"] = ">= 0.90"
    result.notes.append("ratios of median epoch times; seed_style reloads every NIfTI each step and uses "
                        "monai.losses.ContrastiveLoss")
    return result
