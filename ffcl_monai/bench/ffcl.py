"""FFCL local-stage cost, measured side by side on the same backbone, data and batch size.

Contenders (one "epoch" = one pass over the same in-memory images, so data loading is excluded):
    - ``supervised``: Classifier forward, cross-entropy, backward, one Adam step (a plain fine-tuning epoch).
    - ``local_single_pass``: FFCL local stage as implemented: one forward through all blocks with detached inputs,
      Eq. 1 per block, one backward of the summed losses, one Adam step.
    - ``local_step_per_block``: the authors' notebook style: per block a forward, Eq. 1, backward and Adam step
      before the detached output moves on (n optimizer steps per batch).
    - ``global``: FFCL global stage (Eq. 1 on the pooled final embedding, end to end).

Headline ratios: local-stage epoch / supervised epoch (target <= 1.5) and single pass / step-per-block.
Real images: ``--data-root`` containing ``kermany_chest_xray/train/{NORMAL,PNEUMONIA}``; otherwise random images
with random labels (the compute is the same).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ffcl_monai.bench.common import BenchResult, time_interleaved
from ffcl_monai.engines.ffcl import local_step_per_block
from ffcl_monai.losses.ffcl_pair import FFCLPairLoss
from ffcl_monai.networks.classifier import Classifier
from ffcl_monai.networks.projection import GlobalContrastModel


def _images(data_root: str | None, n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    root = Path(data_root, "kermany_chest_xray", "train") if data_root else None
    if root is not None and root.is_dir():
        from PIL import Image

        files = []
        for label, cls in enumerate(["NORMAL", "PNEUMONIA"]):
            files += [(f, label) for f in sorted((root / cls).glob("*.jpeg"))[: n // 2]]
        xs, ys = [], []
        for f, label in files:
            img = Image.open(f).convert("L").resize((size, size), Image.BILINEAR)
            xs.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, size, size).float() / 255)
            ys.append(label)
        if len(xs) >= 8:
            return torch.stack(xs), torch.tensor(ys), f"Kermany train, {len(xs)} images"
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g), f"random, {n} images"


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Run the FFCL bench; see the module docstring."""
    if quick:
        n, size, batch = 128, 32, 32
    elif torch.device(device).type == "cuda":  # the paper's resolution, where a GPU is meant to run it
        n, size, batch = 1024, 224, 64
    else:
        n, size, batch = 512, 32, 32
    backbone = "resnet18"
    x_all, y_all, source = _images(data_root, n, size)
    x_all, y_all = x_all.to(device), y_all.to(device)
    batches = [(x_all[i : i + batch], y_all[i : i + batch]) for i in range(0, len(x_all), batch)]
    loss_fn = FFCLPairLoss()

    def fresh() -> Classifier:
        torch.manual_seed(0)
        return Classifier(backbone, num_classes=2).to(device)

    sup, loc, per, glo = fresh(), fresh(), fresh(), fresh()
    gmodel = GlobalContrastModel(glo.backbone)
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, m in
            {"sup": sup, "loc": loc.backbone, "per": per.backbone, "glo": gmodel}.items()}

    def supervised_epoch() -> None:
        sup.train()
        for x, y in batches:
            opts["sup"].zero_grad(set_to_none=True)
            F.cross_entropy(sup(x), y).backward()
            opts["sup"].step()

    def local_single_pass_epoch() -> None:
        loc.train()
        for x, y in batches:
            opts["loc"].zero_grad(set_to_none=True)
            embs = loc.backbone.block_embeddings(x, detach_inputs=True)
            torch.stack([loss_fn(e, y) for e in embs]).sum().backward()
            opts["loc"].step()

    def local_step_per_block_epoch() -> None:
        for x, y in batches:
            local_step_per_block(per.backbone, opts["per"], loss_fn, x, y)

    def global_epoch() -> None:
        gmodel.train()
        for x, y in batches:
            opts["glo"].zero_grad(set_to_none=True)
            loss_fn(gmodel(x), y).backward()
            opts["glo"].step()

    contenders = {
        "supervised": supervised_epoch,
        "local_single_pass": local_single_pass_epoch,
        "local_step_per_block": local_step_per_block_epoch,
        "global": global_epoch,
    }
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    times = time_interleaved(contenders, warmup=1, repeats=2 if quick else 5, device=device)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sup_s = times["supervised"]["median_s"]
    rows = [
        {"contender": k, "epoch_median_s": v["median_s"], "epoch_min_s": v["min_s"],
         "img_per_s": len(x_all) / v["median_s"], "vs_supervised": v["median_s"] / sup_s}
        for k, v in times.items()
    ]
    res = BenchResult(name="ffcl", rows=rows)
    res.ratios["local_single_pass / supervised epoch"] = times["local_single_pass"]["median_s"] / sup_s
    res.ratios["local_single_pass / local_step_per_block epoch"] = (
        times["local_single_pass"]["median_s"] / times["local_step_per_block"]["median_s"]
    )
    res.ratios["global / supervised epoch"] = times["global"]["median_s"] / sup_s
    res.targets["local_single_pass / supervised epoch"] = "<= 1.5"
    res.notes.append(
        f"{backbone} 2D, {size} px, batch {batch}, data: {source}, device {device}, torch threads "
        f"{torch.get_num_threads()}, 1-min load average {load_before:.1f} before / {load_after:.1f} after"
    )
    return res
