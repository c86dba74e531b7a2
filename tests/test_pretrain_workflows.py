"""Pretraining workflows end to end on tiny 2D/3D data: SimCLR through `python -m monai.bundle run`, Barlow Twins,
auxiliary targets, the overfit switch, MLflow contents, and the backbone checkpoint loaded by train.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import bundle_cli, cfg, overrides_cli, run_bundle
from ffcl_monai.networks.checkpoints import load_backbone
from ffcl_monai.networks.classifier import Classifier

TINY = {"image_size": [16, 16], "backbone": "resnet10", "batch_size": 8}  # 16 px: seconds per epoch on 2 cores


def _chain(exc: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps config errors in RuntimeError)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def _runs(out: Path) -> dict:
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ffcl_monai")
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_simclr_cli_checkpoint_loads_in_train_and_mlflow_has_the_run(tiny2d, tmp_path):
    out = tmp_path / "simclr"
    r = bundle_cli(["run", "--config_file", str(cfg("train.yaml", "pretrain_simclr.yaml")), "--datalist", str(tiny2d),
                    "--output_dir", str(out), *overrides_cli({**TINY, "max_epochs": 2})])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    assert ckpt["backbone_name"] == "resnet10" and ckpt["method"] == "simclr" and ckpt["epochs"] == 2
    assert not any(k.startswith("projector") for k in ckpt["backbone"])  # the projection head is not kept
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in history)
    assert (out / "view_pairs.png").stat().st_size > 1000

    client, runs = _runs(out)
    run = runs["simclr:simclr"]
    for key in ("train_loss_epoch", "lr", "collapse_std", "collapse_rank"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert len(hist) == 2 and all(np.isfinite(m.value) for m in hist), key
    assert run.data.params["temperature"] == "0.5" and run.data.params["method"] == "simclr"
    assert "view_pairs.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # train.yaml loads it directly through `pretrained_ckpt`, and the weights arrive unchanged
    clf = Classifier("resnet10", num_classes=2)
    assert load_backbone(clf, out / "backbone.pt") == {"missing": [], "unexpected": []}
    torch.testing.assert_close(clf.backbone.state_dict()["blocks.0.conv1.weight"], ckpt["backbone"]["blocks.0.conv1.weight"])
    run_bundle(cfg("train.yaml"), datalist=str(tiny2d), output_dir=str(tmp_path / "ft"),
               pretrained_ckpt=str(out / "backbone.pt"), freeze_backbone=True, **{**TINY, "max_epochs": 1})
    assert (tmp_path / "ft" / "models" / "model.pt").is_file()


def test_simclr_3d_and_mismatch_is_refused(tiny3d, tmp_path):
    out = tmp_path / "s3d"
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml", "3d.yaml"), datalist=str(tiny3d), output_dir=str(out),
               image_size=[16, 16, 16], batch_size=4, max_epochs=1, amp=False)
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    assert ckpt["spatial_dims"] == 3 and ckpt["backbone_name"] == "resnet10"
    assert load_backbone(Classifier("resnet10", spatial_dims=3), out / "backbone.pt")["missing"] == []
    with pytest.raises(ValueError, match="spatial_dims"):
        load_backbone(Classifier("resnet10", spatial_dims=2), out / "backbone.pt")
    with pytest.raises(ValueError, match="resnet18"):
        load_backbone(Classifier("resnet18", spatial_dims=3), out / "backbone.pt")


def test_barlow_twins_workflow(tiny2d, tmp_path):
    out = tmp_path / "barlow"
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml", "pretrain_barlow.yaml"), datalist=str(tiny2d),
               output_dir=str(out), proj_hidden_dim=64, proj_dim=64, lambd=0.01, max_epochs=1, **{**TINY})
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    assert ckpt["method"] == "barlow" and ckpt["lambd"] == 0.01
    _, runs = _runs(out)
    assert runs["barlow:barlow"].data.params["lambd"] == "0.01"


def _distinct_images(root: Path, n: int = 8, size: int = 16) -> Path:
    """n unlabeled images, each a different smooth random pattern (easy to tell apart after augmentation)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        low = rng.uniform(0, 1, (4, 4))
        img = np.kron(low, np.ones((size // 4, size // 4)))
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"img/{i}.png")
        entries.append({"image": f"img/{i}.png"})  # no `label`: an unlabeled datalist
    path = root / "unlabeled.json"
    path.write_text(json.dumps({"spatial_dims": 2, "training": entries}))
    return path


def test_overfit_switch(tmp_path):
    datalist = _distinct_images(tmp_path)
    # Mild views (flip + noise): the sanity check is about the model, loss and optimizer being able to memorise a
    # handful of images in a few steps, which strong crops would slow down on 2 CPU cores.
    mild = {"flip": {"transform": "RandFlipd", "prob": 0.5, "spatial_axis": 1},
            "noise": {"transform": "RandGaussianNoised", "prob": 1.0, "std": 0.05}}
    common = dict(datalist=str(datalist), overfit=True, overfit_n=8, image_size=[16, 16], backbone="resnet10",
                  learning_rate=0.003, temperature=0.2, augment_2d=mild)
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml"), output_dir=str(tmp_path / "ok"), max_epochs=8, **common)
    rows = [json.loads(x) for x in (tmp_path / "ok" / "history.jsonl").read_text().splitlines()]
    assert np.mean([r["train_loss"] for r in rows[-2:]]) < 0.8 * np.mean([r["train_loss"] for r in rows[:2]])
    with pytest.raises(Exception) as err:
        run_bundle(cfg("train.yaml", "pretrain_simclr.yaml"), output_dir=str(tmp_path / "bad"), max_epochs=2,
                   overfit_max_ratio=0.0, **common)
    assert "overfit check failed" in _chain(err.value)


def test_auxiliary_targets_workflow(tmp_path):
    from conftest import make_2d

    datalist = make_2d(tmp_path, counts=(12, 4, 4))
    content = json.loads(datalist.read_text())
    for i, e in enumerate(content["training"]):
        e["view"] = None if i % 5 == 0 else i % 2
        e["sex"] = None if i % 3 == 0 else (i // 2) % 2
        e["age"] = None if i % 4 == 0 else 20.0 + 3 * i
    datalist.write_text(json.dumps(content))
    out = tmp_path / "aux"
    run_bundle(cfg("train.yaml", "pretrain_aux.yaml"), datalist=str(datalist), output_dir=str(out), max_epochs=1,
               **TINY)
    assert load_backbone(Classifier("resnet10"), out / "backbone.pt")["missing"] == []
    client, runs = _runs(out)
    run = runs["aux:aux"]
    for key in ("aux_loss_view", "aux_loss_sex", "aux_loss_age", "train_loss_epoch"):
        assert np.isfinite(client.get_metric_history(run.info.run_id, key)[0].value), key
    with pytest.raises(Exception) as err:
        run_bundle(cfg("train.yaml", "pretrain_aux.yaml"), datalist=str(datalist), output_dir=str(tmp_path / "x"),
                   max_epochs=1, aux_heads={"bmi": {"kind": "smooth_l1"}}, **TINY)
    assert "auxiliary target 'bmi'" in _chain(err.value)


def test_label_efficiency_outputs_and_checkpoint_check(tmp_path):
    from ffcl_monai.evaluation.label_efficiency import check_checkpoint, write_outputs
    from ffcl_monai.networks.checkpoints import save_backbone
    from ffcl_monai.networks.backbones import build_backbone

    rows = [{"label_fraction": f, "n_train": int(100 * f), "init": i, "mode": m, "epochs": 2, "best_epoch": 1,
             "val_auc": 0.5 + 0.1 * (i == "pretrained") + 0.2 * f, "wall_s": 1.0}
            for f in (0.1, 1.0) for i in ("random", "pretrained") for m in ("probe", "finetune")]
    csv_path, md_path, png_path = write_outputs(rows, tmp_path, "curve")
    assert len(csv_path.read_text().splitlines()) == 9 and png_path.stat().st_size > 1000
    assert "| 0.1 | probe | +0.1000 |" in md_path.read_text()
    ckpt = save_backbone(tmp_path / "b.pt", build_backbone("resnet10"))
    files = cfg("train.yaml")
    assert check_checkpoint(str(ckpt), files, {"backbone": "resnet10"}) == {"missing": [], "unexpected": []}
    with pytest.raises(ValueError, match="backbone"):
        check_checkpoint(str(ckpt), files, {"backbone": "resnet18"})


@pytest.mark.slow
def test_label_efficiency_command(tiny2d, tmp_path):
    """One command: fractions x {random, pretrained} x {probe, finetune}, MLflow parent run with child runs."""
    from ffcl_monai.evaluation.label_efficiency import main
    from ffcl_monai.networks.backbones import build_backbone
    from ffcl_monai.networks.checkpoints import save_backbone

    ckpt = save_backbone(tmp_path / "b.pt", build_backbone("resnet10"))
    out = tmp_path / "curve"
    code = main(["--pretrained_ckpt", str(ckpt), "--datalist", str(tiny2d), "--output_dir", str(out),
                 "--fractions", "0.5,1.0", "--image_size", "[16, 16]", "--backbone", "resnet10", "--batch_size", "8",
                 "--max_epochs", "1"])
    assert code == 0
    rows = (out / "label_efficiency.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2
    client, runs = _runs(out)
    parent = runs["label_efficiency:curve"]
    children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 8
    assert {"label_efficiency.csv", "label_efficiency.md", "label_efficiency.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
