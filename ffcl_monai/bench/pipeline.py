"""Data and engine overhead of the classification workflow: end-to-end training vs model-only, 2D and 3D.

Contenders, measured side by side in one process, one epoch each, alternating (warm-up epochs first, then the median):
    - ``end_to_end``: the bundle's own ``train.yaml`` workflow (``train.yaml`` [+ ``3d.yaml``]) built
      by ``monai.bundle.ConfigWorkflow`` exactly as ``python -m monai.bundle run`` builds it: CacheDataset of the
      deterministic prefix, random augmentations, the ``loader_class`` loader, ``SupervisedTrainer`` and every training handler
      (seeding, NaN guard, LR schedule, history, resume checkpoint, stats, MLflow). Epochs >= 2 only (the cache is
      built before epoch 1; epoch 1 is a warm-up).
    - ``model_only``: the same network, optimizer, loss and batch size on pre-made batches of tensors already on the
      device (the epoch's images, augmented once), same number of iterations (forward, loss, backward, step).

Headline: ``<dims>_ratio`` = model-only epoch time / end-to-end epoch time (1.0 = no data or engine overhead;
target >= 0.85 on CPU). Validation is not part of a training epoch here (``validation: false``).

Data: ``--data-root`` pointing at a folder with the project datalists (``kermany/kermany.json``,
``adrenal3d/adrenal3d.json``; or the ``shared/data`` folder next to ``datalists/``) uses real JPEGs / NIfTI volumes;
otherwise synthetic PNGs / NIfTI volumes of the same sizes are written to a temporary folder.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffcl_monai.bench.common import BenchResult, sync



# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
def find_datalist(data_root: str | None, name: str) -> Path | None:
    """``<name>.json`` under ``data_root`` (``data_root/<name>/<name>.json``, ``data_root/<name>.json``, or the
    ``datalists`` folder next to ``data_root`` when that is ``shared/data``), or None."""
    if not data_root:
        return None
    root = Path(data_root)
    for cand in (root / name / f"{name}.json", root / f"{name}.json", root.parent.parent / "datalists" / name / f"{name}.json",
                 root.parent / "datalists" / name / f"{name}.json"):
        if cand.is_file():
            return cand
    return None


def subset_datalist(src: Path, out_dir: Path, n_train: int, n_val: int = 4) -> Path:
    """A copy of ``src`` (header kept) with the first ``n_train`` training and ``n_val`` validation entries (classes
    alternating), paths made absolute so that the copy can live elsewhere."""
    content = json.loads(src.read_text())
    base = src.parent

    def fix(items: list[dict], n: int) -> list[dict]:
        out = []
        for it in items[:n]:
            it = dict(it)
            it["image"] = str((base / it["image"]).resolve())
            out.append(it)
        return out

    content["training"] = fix(content.get("training", []), n_train)
    # the validation subset alternates classes: a single-class split has no AUC, and the workflow refuses it
    pool = content.get("validation", []) or content.get("training", [])[n_train:]
    by_class: dict[str, list[dict]] = {}
    for it in pool:
        by_class.setdefault(json.dumps(it.get("label")), []).append(it)
    mixed = [it for group in zip(*by_class.values()) for it in group] if len(by_class) > 1 else pool
    content["validation"] = fix(mixed, n_val)
    content["test"] = []
    if len(content["training"]) < n_train:
        raise ValueError(f"{src} has only {len(content['training'])} training images, the bench needs {n_train}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_{src.stem}.json"
    path.write_text(json.dumps(content))
    return path


def synthetic_datalist(out_dir: Path, spatial_dims: int, size: int, n_train: int, n_val: int = 4, seed: int = 0) -> Path:
    """Two-class synthetic images (noise, plus a bright disk/ball for class 1) as PNG (2D) or NIfTI (3D)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2] * spatial_dims, indexing="ij"))
    disk = (np.sqrt((grid**2).sum(0)) < size / 4).astype(np.float32)
    splits: dict[str, list[dict]] = {}
    for split, n in (("training", n_train), ("validation", n_val)):
        items = []
        for i in range(n):
            label = i % 2
            img = np.clip(rng.uniform(0, 0.4, (size,) * spatial_dims) + label * 0.6 * disk, 0, 1)
            if spatial_dims == 2:
                from PIL import Image

                path = out_dir / f"{split}_{i:04d}.png"
                Image.fromarray((img * 255).astype(np.uint8)).save(path)
            else:
                import nibabel as nib

                path = out_dir / f"{split}_{i:04d}.nii.gz"
                nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), str(path))
            items.append({"image": str(path), "label": label})
        splits[split] = items
    header = {"task": "binary", "labels": {"0": "a", "1": "b"}, "num_classes": 2, "spatial_dims": spatial_dims}
    path = out_dir / "datalist.json"
    path.write_text(json.dumps({**header, **splits, "test": []}))
    return path


def bench_datalist(data_root: str | None, real_name: str, out_dir: Path, spatial_dims: int, size: int,
                   n_train: int) -> tuple[Path, str]:
    """Real datalist subset if available, else synthetic; returns (path, description)."""
    real = find_datalist(data_root, real_name)
    if real is not None:
        try:
            return subset_datalist(real, out_dir, n_train), f"{real_name} ({n_train} training images)"
        except ValueError:
            pass
    kind = "PNG" if spatial_dims == 2 else "NIfTI"
    return (synthetic_datalist(out_dir / f"synthetic{spatial_dims}d", spatial_dims, size, n_train),
            f"synthetic {kind} {size}^{spatial_dims} ({n_train} training images)")


# ------------------------------------------------------------------------------------------------------------------
# timing: contenders run between the workflow's epochs
# ------------------------------------------------------------------------------------------------------------------
class EpochInterleaver:
    """Times the engine's epochs and runs other contenders, timed, right after each epoch (so the machine's slow
    drifts hit all of them alike, like :func:`~ffcl_monai.bench.common.time_interleaved`).

    Registered last on ``EPOCH_COMPLETED``, so an engine epoch's time covers its ``EPOCH_STARTED`` handlers, every
    iteration (loader included) and every other ``EPOCH_COMPLETED`` handler. The first ``warmup`` epochs of every
    contender are dropped.
    """

    def __init__(self, engine_name: str, others: dict[str, Callable[[], Any]], warmup: int, device: str) -> None:
        self.engine_name = engine_name
        self.others = others
        self.warmup = warmup
        self.device = device
        self.samples: dict[str, list[float]] = {engine_name: [], **{k: [] for k in others}}
        self._mark = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_done)

    def _start(self, engine: Any) -> None:
        sync(self.device)
        self._mark = time.perf_counter()

    def _epoch_done(self, engine: Any) -> None:
        sync(self.device)
        elapsed = time.perf_counter() - self._mark
        keep = engine.state.epoch > self.warmup
        if keep:
            self.samples[self.engine_name].append(elapsed)
        for name, fn in self.others.items():
            sync(self.device)
            t0 = time.perf_counter()
            fn()
            sync(self.device)
            if keep:
                self.samples[name].append(time.perf_counter() - t0)
        sync(self.device)
        self._mark = time.perf_counter()

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items() if v}


def as_plain(x: Any, device: str | torch.device) -> torch.Tensor:
    """MetaTensor or array -> plain tensor on ``device``."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device)


def build_workflow(config_names: Sequence[str], overrides: dict[str, Any]) -> Any:
    """A ``ConfigWorkflow`` of bundle config files, initialised (``initialize`` ids run), as ``monai.bundle run``."""
    from ffcl_monai.workflows import runner

    wf = runner.workflow(runner.config_files(config_names), overrides)
    wf.initialize()
    return wf


# ------------------------------------------------------------------------------------------------------------------
# the bench
# ------------------------------------------------------------------------------------------------------------------
def _measure(spatial_dims: int, device: str, quick: bool, data_root: str | None, tmp: Path) -> dict[str, Any]:
    if spatial_dims == 2:
        size, n_train, batch = (64, 64, 32) if quick else (64, 192, 32)
        datalist, source = bench_datalist(data_root, "kermany", tmp / "d2", 2, 128, n_train)
        configs = ["train.yaml"]
        overrides: dict[str, Any] = {"image_size": [size, size], "backbone": "resnet18"}
    else:
        size, n_train, batch = (28, 32, 16) if quick else (28, 96, 16)
        datalist, source = bench_datalist(data_root, "adrenal3d", tmp / "d3", 3, size, n_train)
        configs = ["train.yaml", "3d.yaml"]
        overrides = {"image_size": [size] * 3, "backbone": "resnet10"}
    warmup, repeats = (1, 2) if quick else (1, 5)
    overrides.update(
        datalist=str(datalist), output_dir=str(tmp / f"run{spatial_dims}d"), batch_size=batch,
        max_epochs=warmup + repeats, validation=False, progress=False, device=device,
    )
    wf = build_workflow(configs, overrides)
    get = wf.parser.get_parsed_content
    trainer, network, optimizer, loss_fn = get("train#trainer"), get("network"), get("optimizer"), get("loss")
    dataset = get("train#dataset")
    amp = bool(get("amp"))
    steps = len(get("train#dataloader"))
    from monai.data import list_data_collate

    # One pre-made batch per iteration (the epoch's images, augmented once): training again and again on a single
    # batch drives activations and gradients into float32 denormals, which are many times slower on CPUs.
    premade = []
    for i in range(steps):
        b = list_data_collate([dataset[(i * batch + j) % len(dataset)] for j in range(batch)])
        premade.append((as_plain(b["image"], device), as_plain(b["label"], device)))
    dev_type = torch.device(device).type
    scaler = torch.amp.GradScaler(dev_type) if amp and dev_type == "cuda" else None

    def model_only_epoch() -> None:
        network.train()
        for x, y in premade:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev_type, enabled=amp):
                loss = loss_fn(network(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

    timer = EpochInterleaver("end_to_end", {"model_only": model_only_epoch}, warmup, device)
    timer.attach(trainer)
    wf.run()
    wf.finalize()
    med = timer.medians()
    n_img = steps * batch
    return {
        "dims": f"{spatial_dims}D",
        "data": source,
        "image_size": "x".join(str(s) for s in ([size] * spatial_dims)),
        "backbone": overrides["backbone"],
        "batch": batch,
        "iters_per_epoch": steps,
        "end_to_end_img_s": n_img / med["end_to_end"],
        "model_only_img_s": n_img / med["model_only"],
        "ratio": med["model_only"] / med["end_to_end"],
        "epochs_timed": len(timer.samples["end_to_end"]),
    }


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Run the pipeline bench; see the module docstring."""
    result = BenchResult(name="pipeline")
    with tempfile.TemporaryDirectory(prefix="ffcl_bench_pipeline_") as tmp:
        for dims in (2, 3):
            row = _measure(dims, device, quick, data_root, Path(tmp))
            result.rows.append(row)
            result.ratios[f"{dims}d_end_to_end_over_model_only"] = row["ratio"]
            if torch.device(device).type == "cpu":
                result.targets[f"{dims}d_end_to_end_over_model_only"] = ">= 0.85"
    result.notes.append("ratio = model-only epoch time / end-to-end epoch time (median of epochs >= 2, alternating)")
    return result
