"""Forward-Forward bench: batched all-label prediction against loops, and training throughput per schedule.

``python -m ffcl_monai.bench ff [--quick] [--data-root ../shared/data]``

Prediction contenders (same trained-for-a-moment 784-500-500 net, same images, timed side by side):
    - ``batched``: :meth:`FFNet.predict_goodness`, all ``m`` labels in one pass (factorised first layer, later layers
      on a ``(B*m, H)`` batch),
    - ``batched_naive``: the ``(B, m, D)`` labelled images materialised and pushed through every layer at once,
    - ``label_loop``: one forward per label (mpezeshki's ``predict``),
    - ``sample_loop``: one forward per image and label (seed 002's ``predict_one_sample``), on a subset.
Training throughput: images per second of one epoch for ``simultaneous`` and ``greedy`` (wrong-label negatives),
and ``simultaneous`` with hard negatives.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ffcl_monai.bench.common import BenchResult, time_interleaved
from ffcl_monai.engines.forward_forward import TensorBatches, create_ff_trainer
from ffcl_monai.networks.forward_forward import FFNet


def _data(data_root: str | None, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """MNIST-5k images when ``data_root`` has them, else uniform noise of the same shape (speed only)."""
    if data_root:
        path = os.path.join(data_root, "mnist", "mnist_5k.npz")
        if os.path.exists(path):
            d = np.load(path)
            x = torch.from_numpy(d["images"][:n].reshape(-1, 784).astype(np.float32) / 255.0)
            return x, torch.from_numpy(d["labels"][:n].astype(np.int64)), "mnist_5k"
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g), "synthetic"


def run(device: str, quick: bool, data_root: str | None) -> BenchResult:
    """Run the FF bench; see the module docstring."""
    torch.manual_seed(0)
    n_train = 1000 if quick else 4000
    n_pred = 200 if quick else 1000
    n_sample_loop = 20 if quick else 100
    repeats = 3 if quick else 5
    x, y, source = _data(data_root, max(n_train, n_pred))
    x, y = x.to(device), y.to(device)
    res = BenchResult(name="ff")
    res.notes.append(f"data: {source}; device {device}; torch threads {torch.get_num_threads()}")
    try:
        res.notes.append(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    except OSError:  # pragma: no cover - not available on every OS
        pass

    # a net trained for one short epoch, so that activations are realistic (not all-zero ReLUs)
    net = FFNet(784, 10, (500, 500), norm="rms", goodness="sum").to(device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    create_ff_trainer(net, opt, threshold=500.0).run(TensorBatches(x[:n_train], y[:n_train], 200), max_epochs=1)
    net.eval()

    # ---------------------------------------------------------------- prediction
    for batch in ([1, 16, n_pred] if not quick else [1, n_pred]):
        res.targets[f"predict B={batch}: label_loop / batched"] = ">= 5"
        xb = x[:batch]
        with torch.no_grad():
            same = bool((net.predict_goodness(xb) == net.predict_label_loop(xb)).all())
        contenders = {
            "batched": lambda: net.predict_goodness(xb),
            "batched_naive": lambda: net.goodness_all_labels(xb, factorised=False).sum(-1).argmax(-1),
            "label_loop": lambda: net.predict_label_loop(xb),
        }
        with torch.no_grad():
            t = time_interleaved(contenders, warmup=1, repeats=repeats, device=device)
        for name, v in t.items():
            res.rows.append(
                {"what": f"predict B={batch}", "contender": name, "median_s": v["median_s"],
                 "images_per_s": batch / v["median_s"], "equal_to_loop": same}
            )
        res.ratios[f"predict B={batch}: label_loop / batched"] = t["label_loop"]["median_s"] / t["batched"]["median_s"]
        res.ratios[f"predict B={batch}: batched_naive / batched"] = (
            t["batched_naive"]["median_s"] / t["batched"]["median_s"]
        )
    # why large batches cannot reach 5x on a CPU: batching saves Python calls and the repeated first-layer product,
    # not the (B*m, H) x (H, H) products of the later layers, which both paths must do
    d_in, widths = 784, [500, 500]
    loop_macs = 10 * (d_in * widths[0] + widths[0] * widths[1])
    batched_macs = d_in * widths[0] + 10 * widths[0] * widths[1]
    res.notes.append(
        f"multiply-adds per image: label loop {loop_macs / 1e6:.2f} M, batched {batched_macs / 1e6:.2f} M, so with "
        f"large batches (compute-bound) the loop/batched ratio is at most {loop_macs / batched_macs:.2f}x on any "
        "device; the >= 5x comes from per-call overhead, i.e. small batches or a GPU"
    )

    # seed 002: one call per image (and label); per-image time against the batched path
    xs = x[:n_sample_loop]

    def sample_loop() -> None:
        with torch.no_grad():
            for i in range(len(xs)):
                net.predict_label_loop(xs[i : i + 1])

    xb = x[:n_pred]
    t = time_interleaved(
        {"batched": lambda: net.predict_goodness(xb), "sample_loop": sample_loop},
        warmup=1, repeats=max(repeats - 2, 1), device=device,
    )
    per_img_batched = t["batched"]["median_s"] / n_pred
    per_img_loop = t["sample_loop"]["median_s"] / n_sample_loop
    res.rows.append({"what": "predict per image", "contender": "sample_loop (seed 002)", "median_s": per_img_loop,
                     "images_per_s": 1 / per_img_loop, "equal_to_loop": True})
    res.ratios["predict per image: sample_loop / batched"] = per_img_loop / per_img_batched

    # ---------------------------------------------------------------- training throughput
    xt, yt = x[:n_train], y[:n_train]
    nets, engines = {}, {}
    for name, kw in {
        "simultaneous": dict(schedule="simultaneous", negatives="wrong_label"),
        "greedy": dict(schedule="greedy", negatives="wrong_label", epochs_per_layer=1),
        "simultaneous_hard": dict(schedule="simultaneous", negatives="hard"),
    }.items():
        torch.manual_seed(0)
        nets[name] = FFNet(784, 10, (500, 500), norm="rms", goodness="sum").to(device)
        o = torch.optim.Adam(nets[name].parameters(), lr=3e-3)
        engines[name] = create_ff_trainer(nets[name], o, threshold=500.0, **kw)

    def one_epoch(name: str):
        # greedy: an epoch on layer 0 and one on layer 1 (the engine's 2 epochs = 1 epoch per layer)
        eng = engines[name]
        epochs = 2 if name == "greedy" else 1
        return lambda: eng.run(TensorBatches(xt, yt, 200), max_epochs=epochs)

    t = time_interleaved({k: one_epoch(k) for k in engines}, warmup=1, repeats=max(repeats - 2, 2), device=device)
    for name, v in t.items():
        # images per second per layer-epoch: greedy needs L epochs to give every layer one pass
        passes = 2 if name == "greedy" else 1
        res.rows.append({"what": "train (every layer one pass)", "contender": name, "median_s": v["median_s"],
                         "images_per_s": n_train * passes / v["median_s"], "equal_to_loop": ""})
    res.ratios["train: simultaneous images/s"] = n_train / t["simultaneous"]["median_s"]
    res.ratios["train: greedy images/s (per layer-epoch)"] = 2 * n_train / t["greedy"]["median_s"]
    res.ratios["train: simultaneous_hard images/s"] = n_train / t["simultaneous_hard"]["median_s"]
    res.ratios["train: greedy time for every layer once / simultaneous epoch"] = (
        t["greedy"]["median_s"] / t["simultaneous"]["median_s"]
    )
    res.notes.append("train images/s: images through the FF step per second; one simultaneous epoch trains all layers "
                     "on every image, greedy needs one epoch per layer")
    res.notes.append(f"measured at {time.strftime('%H:%M:%S')}")
    return res
