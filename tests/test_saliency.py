"""Grad-CAM saliency: target layer per backbone, maps that find the evidence, the evaluate grid and inference maps.

The central check (``test_cam_peak_lies_in_the_class_patch``) trains a small classifier on synthetic noise images in
which class 1 carries a bright square at a fixed place, and asserts that the Grad-CAM peak of class-1 images lies in
that square. A flipped normaliser (MONAI's default maps max -> 0), a transposed map or a wrong target layer fail it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import cfg, make_2d, run_bundle, write_datalist
from ffcl_monai.networks.backbones import BACKBONES
from ffcl_monai.networks.classifier import Classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {2: [64, 48], 3: [40, 32, 32]}  # DenseNet-121 needs >= 32 per axis


def _untrained_checkpoint(path: Path, backbone: str = "resnet10", spatial_dims: int = 2, num_classes: int = 2,
                          seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = Classifier(backbone, num_classes, spatial_dims, 1)
    state = net.state_dict()
    for k in state:  # spread the probabilities so that every outcome of the grid is likely to occur
        if k.startswith("head."):
            state[k] = state[k] * 20.0
    torch.save({"model": state}, path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# target layer and map shape, every backbone, 2D and 3D
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_has_a_target_layer_and_cam_has_input_shape(backbone, spatial_dims):
    from ffcl_monai.handlers.saliency import SaliencyMapper, default_target_layer, target_layer_candidates

    torch.manual_seed(0)
    net = Classifier(backbone, 2, spatial_dims, 1).eval()
    size = SMALL[spatial_dims]
    layer = default_target_layer(net, size)
    assert layer in target_layer_candidates(backbone)
    assert layer in dict(net.named_modules())
    x = torch.rand(3, 1, *size)
    with torch.no_grad():
        before = net(x)
    for method in ("gradcam", "gradcampp"):
        mapper = SaliencyMapper(net, size, method=method)
        assert mapper.layer == layer
        maps = mapper(x, [0, 1, 1])
        assert maps.shape == (3, *size), (backbone, spatial_dims, method, maps.shape)
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # the served / evaluated network is untouched: no hooks left on it, same outputs
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)


def test_layer_rule_deepest_block_with_enough_cells():
    from ffcl_monai.handlers.saliency import MIN_CAM_SIZE, default_target_layer, feature_shapes, target_layer_candidates

    assert MIN_CAM_SIZE == 7  # Grad-CAM's own setting: ResNet layer4 at 224 px
    net = Classifier("resnet18", 2, 2, 1)
    # ResNet strides: layer4 /32, layer3 /16, layer2 /8, layer1 /4
    assert default_target_layer(net, [224, 224]) == "backbone.blocks.4"  # 7x7: the last conv block
    assert default_target_layer(net, [64, 64]) == "backbone.blocks.2"  # layer4 would be 2x2, layer3 4x4
    assert default_target_layer(net, [32, 32]) == "backbone.blocks.1"
    shapes = feature_shapes(net, [64, 64], target_layer_candidates("resnet18"))
    assert shapes == {"backbone.blocks.4": (2, 2), "backbone.blocks.3": (4, 4), "backbone.blocks.2": (8, 8),
                      "backbone.blocks.1": (16, 16)}
    net3d = Classifier("resnet10", 2, 3, 1)
    assert default_target_layer(net3d, [28, 28, 28]) == "backbone.blocks.1"  # 7x7x7 at the 3D default size
    assert default_target_layer(net3d, [96, 96, 96]) == "backbone.blocks.2"  # 12^3 (layer3 would be 6^3)
    dense = Classifier("densenet121", 2, 2, 1)
    assert default_target_layer(dense, [224, 224]) == "backbone.blocks.4"
    assert default_target_layer(dense, [64, 64]) == "backbone.blocks.2.0"  # denseblock2, 8x8


def test_explicit_layer_and_bad_values():
    from ffcl_monai.handlers.saliency import SaliencyMapper

    torch.manual_seed(0)
    net = Classifier("resnet10", 2, 2, 1)
    assert SaliencyMapper(net, [32, 32], layer="backbone.blocks.1").layer == "backbone.blocks.1"
    with pytest.raises(ValueError, match="saliency_layer"):
        SaliencyMapper(net, [32, 32], layer="backbone.nope")
    with pytest.raises(ValueError, match="saliency_method"):
        SaliencyMapper(net, [32, 32], method="lime")
    # a linear probe (frozen backbone): the gradient still reaches the target layer through the input
    frozen = Classifier("resnet10", 2, 2, 1, freeze_backbone=True).eval()
    maps = SaliencyMapper(frozen, [32, 32])(torch.rand(2, 1, 32, 32), [0, 1])
    assert maps.shape == (2, 32, 32) and maps.max() > 0


# ------------------------------------------------------------------------------------------------------------------
# the map finds the evidence
# ------------------------------------------------------------------------------------------------------------------
# 40 px: resnet10's default target layer is then layer1, a 10x10 grid of 4-px cells. The patch (12 x 10 px) is fixed,
# off-centre, straddles cell edges and stays off the border cells (whose upsampled values are flat up to the edge).
SIZE = 40
PATCH = (slice(22, 34), slice(6, 16))  # axis 0, axis 1 of the tensor


def _patch_images(n: int, rng: np.random.Generator, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    x = rng.uniform(0.0, 0.5, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    x[y == 1, 0, PATCH[0], PATCH[1]] += 0.5
    return torch.from_numpy(x), torch.from_numpy(y)


def test_cam_peak_lies_in_the_class_patch():
    from ffcl_monai.handlers.saliency import SaliencyMapper

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    x, y = _patch_images(160, rng)
    net = Classifier("resnet10", 2, 2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(5):
        for idx in torch.randperm(len(x)).split(16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    # BatchNorm running statistics lag after 50 steps (eval-mode accuracy 0.5 while train-mode is 1.0): recompute
    # them as plain averages over the training set ("precise BN").
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for idx in torch.arange(len(x)).split(32):
            net(x[idx])
    net.eval()
    xt, yt = _patch_images(40, rng)
    with torch.no_grad():
        acc = (net(xt).argmax(1) == yt).float().mean().item()
    assert acc >= 0.95, f"the tiny classifier did not separate the classes (accuracy {acc:.2f})"

    inside = np.zeros((SIZE, SIZE), bool)
    inside[PATCH] = True
    pos = xt[yt == 1]
    for method in ("gradcam", "gradcampp"):
        mapper = SaliencyMapper(net, [SIZE, SIZE], method=method)
        assert mapper.layer == "backbone.blocks.1"
        maps = mapper(pos, [1] * len(pos))
        peaks = [np.unravel_index(np.argmax(m), m.shape) for m in maps]
        hit = np.mean([inside[p] for p in peaks])
        # Grad-CAM: 100% on 6 training seeds; Grad-CAM++ spreads wider (70-95%), "most" is asked of it
        assert hit >= (0.9 if method == "gradcam" else 0.6), \
            f"{method}: CAM peak inside the patch for {hit:.0%} of class-1 images; peaks {peaks}"
        # and the map is concentrated there: mean inside clearly above mean outside (measured 2.8-6.5 / 1.8-2.2)
        assert maps[:, inside].mean() > (2.0 if method == "gradcam" else 1.5) * maps[:, ~inside].mean(), method


def test_display_orientation_and_heatmap_composites_to_overlay():
    from ffcl_monai.handlers.saliency import display_slice, heatmap_rgba, overlay_rgb

    # MONAI loads a PNG of H rows x W columns as (W, H): display transposes back
    img = torch.zeros(1, 40, 20)
    img[0, :, :5] = 1  # the first 5 rows of the file
    shown = display_slice(img, channel_first=True)
    assert shown.shape == (20, 40) and shown[:5].min() == 1 and shown[5:].max() == 0
    assert display_slice(np.zeros((8, 6, 4)), channel_first=False).shape == (6, 8)  # 3D: middle slice of the last axis
    rng = np.random.default_rng(0)
    grey, cam = rng.uniform(0, 1, (16, 16)), rng.uniform(0, 1, (16, 16))
    cam[:4] = 0
    rgba = heatmap_rgba(cam).astype(float) / 255
    assert (rgba[:4, :, 3] == 0).all()  # no evidence: fully transparent
    composite = rgba[..., 3:] * rgba[..., :3] + (1 - rgba[..., 3:]) * grey[..., None]
    np.testing.assert_allclose(composite * 255, overlay_rgb(grey, cam).astype(float), atol=2.5)


# ------------------------------------------------------------------------------------------------------------------
# sampling per outcome
# ------------------------------------------------------------------------------------------------------------------
def test_outcome_sample_binary_fixed_size_and_seeded():
    from ffcl_monai.handlers.saliency import select_outcomes

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(labels * 0.6 + rng.uniform(0, 0.4, 200) + rng.normal(0, 0.2, 200), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    rows = select_outcomes(probs, labels, "binary", ["NORMAL", "PNEUMONIA"], per_outcome=4, seed=0)
    assert [r.name for r in rows] == ["TP", "FP", "FN", "TN"]
    pred = probs.argmax(1)
    truth = {"TP": (labels == 1) & (pred == 1), "FP": (labels == 0) & (pred == 1),
             "FN": (labels == 1) & (pred == 0), "TN": (labels == 0) & (pred == 0)}
    for r in rows:
        assert r.total == truth[r.name].sum()
        assert len(r.indices) == min(4, r.total) and truth[r.name][r.indices].all()
        assert list(r.cam_classes) == [int(pred[i]) for i in r.indices]  # the map explains the predicted class
    again = select_outcomes(probs, labels, "binary", ["NORMAL", "PNEUMONIA"], per_outcome=4, seed=0)
    assert [list(r.indices) for r in rows] == [list(r.indices) for r in again]
    other = select_outcomes(probs, labels, "binary", ["NORMAL", "PNEUMONIA"], per_outcome=4, seed=1)
    assert [list(r.indices) for r in rows] != [list(r.indices) for r in other]


def test_outcome_sample_multiclass_and_multilabel():
    from ffcl_monai.handlers.saliency import select_outcomes

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    rows = select_outcomes(probs, labels, "multiclass", ["a", "b", "c"], per_outcome=2, seed=0)
    assert [r.name for r in rows] == ["a correct", "a wrong", "b correct", "b wrong", "c correct", "c wrong"]
    pred = probs.argmax(1)
    for r in rows:
        c = "abc".index(r.name[0])
        ok = r.name.endswith("correct")
        assert all(labels[i] == c and (pred[i] == c) == ok for i in r.indices)
    ml = np.stack([rng.integers(0, 2, 60), rng.integers(0, 2, 60), np.full(60, -1)], 1)
    mp = rng.uniform(0, 1, (60, 3))
    rows = select_outcomes(mp, ml, "multilabel", ["a", "b", "c"], per_outcome=3, seed=0)
    assert [r.name for r in rows][:3] == ["a TP", "a FP", "a FN"]
    assert all(r.total == 0 for r in rows if r.name.startswith("c "))  # -1 = ignored label
    for r in rows:
        j = "abc".index(r.name[0])
        assert all(c == j for c in r.cam_classes)


# ------------------------------------------------------------------------------------------------------------------
# the workflows
# ------------------------------------------------------------------------------------------------------------------
def test_evaluate_writes_gradcam_grid_and_logs_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_2d(tmp_path / "data", counts=(4, 2, 12))
    out = tmp_path / "run"
    ckpt = _untrained_checkpoint(tmp_path / "m.pt")
    run_bundle(cfg("train.yaml", "evaluate.yaml"), datalist=str(data), output_dir=str(out), checkpoint=str(ckpt),
               image_size=[32, 32], backbone="resnet10", batch_size=8, n_bootstrap=10, saliency_per_outcome=2)
    grid = out / "gradcam_grid.png"
    assert grid.is_file() and grid.stat().st_size > 5000
    from PIL import Image

    with Image.open(grid) as im:
        w, h = im.size
    assert w > 300 and h > 300
    meta = json.loads((out / "gradcam_grid.json").read_text())
    assert [r["outcome"] for r in meta["rows"]] == ["TP", "FP", "FN", "TN"]
    assert sum(r["total"] for r in meta["rows"]) == 12
    assert all(len(r["shown"]) == min(2, r["total"]) for r in meta["rows"])
    assert meta["method"] == "gradcam" and meta["layer"] == "backbone.blocks.1"  # 8x8 at 32 px
    # no identifiers: neither the titles nor the sidecar name the images
    text = json.dumps(meta)
    assert "img_" not in text and ".png" not in text.replace("gradcam_grid.png", "")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("ffcl_monai").experiment_id])[0]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"gradcam_grid.png", "metrics.json", "roc.png"} <= arts

    off = tmp_path / "off"
    run_bundle(cfg("train.yaml", "evaluate.yaml"), datalist=str(data), output_dir=str(off), checkpoint=str(ckpt),
               image_size=[32, 32], backbone="resnet10", batch_size=8, n_bootstrap=10, saliency="false")  # as the CLI
    assert (off / "metrics.json").is_file() and not (off / "gradcam_grid.png").exists()


def test_evaluate_3d_gradcampp_grid(tiny3d, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "r3d"
    ckpt = _untrained_checkpoint(tmp_path / "m3d.pt", spatial_dims=3)
    run_bundle(cfg("train.yaml", "evaluate.yaml", "3d.yaml"), datalist=str(tiny3d), output_dir=str(out),
               checkpoint=str(ckpt), image_size=[16, 16, 16], batch_size=4, n_bootstrap=10,
               class_names=["absent", "present"], saliency_method="gradcampp")
    assert (out / "gradcam_grid.png").stat().st_size > 3000
    meta = json.loads((out / "gradcam_grid.json").read_text())
    assert meta["method"] == "gradcampp" and sum(r["total"] for r in meta["rows"]) == 4


def test_evaluate_multiclass_grid_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "data"
    base = json.loads(make_2d(root, counts=(3, 3, 9)).read_text())
    for split in ("training", "validation", "test"):
        for i, e in enumerate(base[split]):
            e["label"] = i % 3
    names = ["a", "b", "c"]
    data = write_datalist(root, {s: base[s] for s in ("training", "validation", "test")}, task="multiclass",
                          num_classes=3, labels={str(i): n for i, n in enumerate(names)})
    out = tmp_path / "run"
    ckpt = _untrained_checkpoint(tmp_path / "m.pt", num_classes=3)
    run_bundle(cfg("train.yaml", "evaluate.yaml"), datalist=str(data), output_dir=str(out), checkpoint=str(ckpt),
               task="multiclass", num_classes=3, class_names=names, image_size=[32, 32], backbone="resnet10",
               batch_size=8, n_bootstrap=10)
    meta = json.loads((out / "gradcam_grid.json").read_text())
    assert [r["outcome"] for r in meta["rows"]] == [f"{c} {o}" for c in names for o in ("correct", "wrong")]
    assert sum(r["total"] for r in meta["rows"]) == 9


def test_cli_flags_arrive_as_strings():
    """``python -m monai.bundle run ... --saliency false`` passes the string 'false' (fire keeps lower-case words)."""
    from ffcl_monai.handlers.saliency import SaliencyReport, SaliencyWriter, as_bool, as_layer

    assert [as_bool(v, "k") for v in (True, "true", "True", 1, "yes")] == [True] * 5
    assert [as_bool(v, "k") for v in (False, "false", "FALSE", 0, "no", None)] == [False] * 6
    with pytest.raises(ValueError, match="`saliency` must be true or false"):
        as_bool("sometimes", "saliency")
    assert as_layer("null") is None and as_layer("backbone.blocks.1") == "backbone.blocks.1"
    net = Classifier("resnet10", 2, 2, 1)
    common = dict(output_dir="unused", class_names=["a", "b"], image_size=[32, 32])
    assert not SaliencyReport(None, net, task="binary", enabled="false", **common).enabled
    assert SaliencyWriter(net, enabled="true", layer="null", **common).enabled


def test_inference_saves_per_image_maps_on_request(tiny2d, tmp_path):
    ckpt = _untrained_checkpoint(tmp_path / "m.pt")
    common = dict(datalist=str(tiny2d), checkpoint=str(ckpt), image_size=[32, 32], backbone="resnet10", batch_size=4)
    plain = tmp_path / "plain"
    run_bundle(cfg("inference.yaml"), output_dir=str(plain), **common)
    header = next(csv.reader(io.StringIO((plain / "inference.csv").read_text())))
    assert header == ["image", "NORMAL", "PNEUMONIA"] and not (plain / "saliency").exists()

    out = tmp_path / "sal"
    run_bundle(cfg("inference.yaml"), output_dir=str(out), save_saliency="true", **common)
    rows = list(csv.DictReader(io.StringIO((out / "inference.csv").read_text())))
    plain_rows = list(csv.DictReader(io.StringIO((plain / "inference.csv").read_text())))
    assert len(rows) == 6 and {"saliency", "saliency_png", "saliency_class"} <= set(rows[0])
    for r, p in zip(rows, plain_rows):
        assert r["image"] == p["image"] and r["PNEUMONIA"] == p["PNEUMONIA"]  # the scores do not change
        m = np.load(out / r["saliency"])
        assert m.shape == (32, 32) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1 + 1e-6
        assert (out / r["saliency_png"]).stat().st_size > 200
        probs = [float(r["NORMAL"]), float(r["PNEUMONIA"])]
        assert r["saliency_class"] == ["NORMAL", "PNEUMONIA"][int(np.argmax(probs))]
        assert "img_" not in r["saliency"]  # map files are numbered, not named after the image
    js = json.loads((out / "inference.json").read_text())
    assert js[0]["saliency"] == rows[0]["saliency"]
