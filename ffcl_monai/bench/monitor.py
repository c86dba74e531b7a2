"""Cost of the online embedding monitor (``ffcl_monai/handlers/embedding_monitor.py``) in a real SimCLR run.

One run of the bundle's own ``train.yaml`` + ``pretrain_simclr.yaml`` workflow (built by
``monai.bundle.ConfigWorkflow`` as ``python -m monai.bundle run`` builds it) with ``monitor_interval: 2``: odd epochs
are plain, even epochs are monitored, so both kinds are measured side by side, alternating, on the same machine
state. The monitor runs with the
workflow's default settings (``monitor_max_images``, ``monitor_k``, ``monitor_plot: pca+tsne``), and
``monitor_max_images`` is at least the validation size, so every validation image is embedded. Epoch 1 (cache
warm-up, and the epoch-0 reference the monitor computes before it) is dropped; the median of the rest is reported.
An epoch's time (``EpochInterleaver``, registered last) covers every iteration and every handler, MLflow included.

Headlines:
    - ``monitored_over_plain_at_default_interval``: mean epoch time with the monitor at the default
      ``monitor_interval`` over the plain epoch time, ``((I - 1) * plain + monitored) / (I * plain)``
      (target <= 1.10 on CPU);
    - ``one_monitored_epoch_over_plain``: a monitored epoch over a plain one (the monitor's whole cost in one epoch).

Data: ``--data-root`` holding ``kermany/kermany.json`` (or ``kermany.json``; e.g. made by ``python -m data_prep kermany
... --out <root>/kermany.json``): a seeded, class-stratified subset of the training split and the whole validation
split (up to ``n_val``). Otherwise synthetic two-class PNGs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from ffcl_monai.bench.common import BenchResult
from ffcl_monai.bench.pipeline import EpochInterleaver, build_workflow, find_datalist, synthetic_datalist


def _subset(src: Path, out_dir: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, int, int]:
    """A copy of ``src`` with a stratified ``n_train`` training subset and the first ``n_val`` validation images."""
    from ffcl_monai.handlers.embedding_monitor import capped_subset

    content = json.loads(src.read_text())
    base = src.parent

    def absolute(items: list[dict]) -> list[dict]:
        return [{**it, "image": str((base / it["image"]).resolve())} for it in items]

    train = capped_subset(content.get("training", []), n_train, seed)
    val = capped_subset(content.get("validation", []), n_val, seed)
    content.update(training=absolute(train), validation=absolute(val), test=[])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_monitor_{src.stem}.json"
    path.write_text(json.dumps(content))
    return path, len(train), len(val)


def _measure(device: str, quick: bool, data_root: str | None, tmp: Path) -> dict[str, Any]:
    on_gpu = torch.device(device).type == "cuda"
    if quick:
        size, n_train, n_val, batch, backbone, repeats = 32, 64, 32, 16, "resnet10", 1
    elif on_gpu:
        size, n_train, n_val, batch, backbone, repeats = 64, 4096, 262, 256, "resnet18", 2
    else:
        size, n_train, n_val, batch, backbone, repeats = 32, 1024, 262, 64, "resnet18", 2
    real = find_datalist(data_root, "kermany")
    if real is not None:
        datalist, n_train, n_val = _subset(real, tmp / "data", n_train, n_val)
        source = f"kermany ({n_train} training / {n_val} validation images)"
    else:
        datalist = synthetic_datalist(tmp / "synthetic", 2, 64, n_train, n_val)
        source = f"synthetic PNG 64^2 ({n_train} training / {n_val} validation images)"
    # epoch 1: warm-up; then monitored (even) and plain (odd) alternate; the last epoch (always monitored) is even
    max_epochs = 2 + 2 * repeats
    overrides: dict[str, Any] = {
        "datalist": str(datalist), "output_dir": str(tmp / "simclr"), "image_size": [size, size],
        "backbone": backbone, "batch_size": batch, "max_epochs": max_epochs, "progress": False, "device": device,
        "monitor_interval": 2,
    }
    wf = build_workflow(["train.yaml", "pretrain_simclr.yaml"], overrides)
    get = wf.parser.get_parsed_content
    defaults = wf.parser.get  # the workflow file's own values of the keys the bench does not override
    trainer, monitor = get("train#trainer"), get("embedding_monitor")
    steps = len(get("train#dataloader"))
    timer = EpochInterleaver("epoch", {}, warmup=1, device=device)
    timer.attach(trainer)
    wf.run()
    wf.finalize()
    from monai.data import set_track_meta

    set_track_meta(True)
    epochs = timer.samples["epoch"]  # epochs 2 .. max_epochs
    plain = [t for e, t in zip(range(2, max_epochs + 1), epochs) if e % 2 == 1]
    monitored = [t for e, t in zip(range(2, max_epochs + 1), epochs) if e % 2 == 0]
    t_plain, t_mon = statistics.median(plain), statistics.median(monitored)
    interval = _default_interval()
    rows = monitor.history
    n_bank, n_val_emb = len(monitor._data["train"][1]), len(monitor._data["val"][1])
    return {
        "data": source,
        "image_size": f"{size}x{size}",
        "backbone": backbone,
        "batch": batch,
        "iters_per_epoch": steps,
        "monitor_bank_images": n_bank,
        "monitor_val_images": n_val_emb,
        "monitor_max_images": int(defaults("monitor_max_images")),
        "monitor_k": defaults("monitor_k"),
        "monitor_plot": defaults("monitor_plot"),
        "plain_epoch_s": t_plain,
        "monitored_epoch_s": t_mon,
        "monitored_minus_plain_s": t_mon - t_plain,
        "monitor_s_median": statistics.median(r["monitor_time_s"] for r in rows if r["epoch"] > 0),
        "default_interval": interval,
        "one_monitored_epoch_over_plain": t_mon / t_plain,
        "monitored_over_plain_at_default_interval": ((interval - 1) * t_plain + t_mon) / (interval * t_plain),
        "epochs_timed": len(epochs),
        "knn_auc_by_epoch": {r["epoch"]: round(r["knn_auc"], 4) for r in rows},
        "probe_auc_by_epoch": {r["epoch"]: round(r["probe_auc"], 4) for r in rows},
    }


def _default_interval() -> int:
    """``monitor_interval`` of a SimCLR pretraining (train.yaml + pretrain_simclr.yaml, as the bundle composes it)."""
    from ffcl_monai.workflows.runner import config_files, load

    return int(load(config_files(["train.yaml", "pretrain_simclr.yaml"])).get("monitor_interval"))


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Run the monitor bench; see the module docstring."""
    result = BenchResult(name="monitor")
    with tempfile.TemporaryDirectory(prefix="ffcl_bench_monitor_") as tmp:
        row = _measure(device, quick, data_root, Path(tmp))
    result.rows.append(row)
    result.ratios["monitored_over_plain_at_default_interval"] = row["monitored_over_plain_at_default_interval"]
    result.ratios["one_monitored_epoch_over_plain"] = row["one_monitored_epoch_over_plain"]
    if torch.device(device).type == "cpu":
        result.targets["monitored_over_plain_at_default_interval"] = "<= 1.10"
    result.notes.append(
        "one SimCLR run with monitor_interval 2: odd epochs plain, even epochs monitored (alternating, epoch 1 "
        "dropped); the ratio at the default interval I is ((I - 1) * plain + monitored) / (I * plain)")
    if row["monitor_max_images"] < row["monitor_val_images"]:
        result.notes.append("monitor_max_images is below the validation size: not every validation image was embedded")
    return result
