"""The bundle's train, evaluate and inference workflows, through the real CLI and in-process, 2D and 3D."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import CONFIGS, FAST, bundle_cli, cfg, overrides_cli, run_bundle


def _workflow(workflow_type: str, files: list[str], **override) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        workflow_type=workflow_type, config_file=files, meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), **override,
    )
    wf.initialize()
    return wf


def test_check_properties_train_and_infer(tiny2d, tmp_path):
    train = _workflow("train", cfg("train.yaml"), datalist=str(tiny2d), output_dir=str(tmp_path / "t"))
    assert not train.check_properties()  # None or [] when every required/optional id is where MONAI expects it
    for key in ("bundle_root", "dataset_dir", "device", "network_def", "train#trainer", "train#dataset",
                "train#handlers", "validate#evaluator", "validate#handlers", "val_interval"):
        assert key in train.parser, key
    from ffcl_monai.networks.classifier import Classifier

    ckpt = tmp_path / "model.pt"
    torch.save({"model": Classifier("resnet18", 2, 2, 1).state_dict()}, ckpt)
    infer = _workflow("infer", cfg("inference.yaml"), datalist=str(tiny2d), output_dir=str(tmp_path / "i"),
                      checkpoint=str(ckpt))
    assert not infer.check_properties()
    for key in ("preprocessing", "inferer", "postprocessing", "evaluator", "dataset"):
        assert key in infer.parser, key


def test_standalone_inference_yaml_agrees_with_train_yaml():
    """inference.yaml repeats the data and network keys of train.yaml (both must load alone); they may not drift."""
    import yaml

    train = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    infer = yaml.safe_load((CONFIGS / "inference.yaml").read_text())
    # training reads task and classes from the datalist header; inference has no labelled datalist to read them from
    from_header = ("task", "num_classes", "class_names")
    shared = [k for k in infer if k in train and k not in ("imports", "initialize", "run", "network", "checkpoint",
                                                          "network_def", "output_dir", *from_header)]
    assert {"deterministic_transforms", "image_size", "backbone", "amp_dtype", "datalist"} <= set(shared)
    for key in shared:
        assert infer[key] == train[key], key
    # the inference network is train.yaml's without its training-only switches
    training_only = {"dropout", "freeze_backbone"}
    assert {k: v for k, v in train["network_def"].items() if k not in training_only} == infer["network_def"]
    assert set(infer["imports"]) - set(train["imports"]) <= {"$import ffcl_monai.handlers.saliency", "$import ffcl_monai.engines.precision"}


def test_train_evaluate_infer_cli(tiny2d, tmp_path):
    out = tmp_path / "run"
    common = ["--datalist", str(tiny2d), "--output_dir", str(out), *overrides_cli({k: v for k, v in FAST.items() if k != "n_bootstrap"})]
    r = bundle_cli(["run", "--config_file", str(cfg("train.yaml")), *common])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = out / "models" / "model.pt"
    assert model.is_file() and (out / "checkpoints" / "resume.pt").is_file()
    ckpt = torch.load(model, weights_only=True)
    assert set(ckpt) == {"model", "input"}  # the weights and the inputs they were trained on
    assert ckpt["input"] == {"in_channels": 1, "input_norm": "none", "image_size": [32, 32]}
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all({"train_loss", "lr", "val_auc", "val_accuracy", "val_f1"} <= set(h) for h in history)

    r = bundle_cli(["run", "--config_file", str(cfg("train.yaml", "evaluate.yaml")), *common, "--n_bootstrap", "50"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6
    for k in ("accuracy", "f1", "precision", "recall", "auc"):
        m = metrics["metrics"][k]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], (k, m)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 6 and {"image", "label", "predicted", "prob_NORMAL", "prob_PNEUMONIA"} <= set(rows[0])
    probs = np.array([[float(r["prob_NORMAL"]), float(r["prob_PNEUMONIA"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (out / "roc.png").stat().st_size > 1000 and (out / "confusion_matrix.png").stat().st_size > 1000

    r = bundle_cli(["run", "--config_file", str(cfg("inference.yaml")), *common,
                    "--checkpoint", str(model), "--output_dir", str(out / "infer")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    inferred = json.loads((out / "infer" / "inference.json").read_text())
    assert len(inferred) == 6
    # inference and evaluation see the same test images through the same network: same probabilities
    by_name = {Path(r["image"]).name: float(r["prob_PNEUMONIA"]) for r in rows}
    for item in inferred:
        assert abs(item["PNEUMONIA"] - by_name[Path(item["image"]).name]) < 1e-4

    # the model fed other inputs would run and predict nonsense: refused, naming the key and the training's value
    r = bundle_cli(["run", "--config_file", str(cfg("inference.yaml")), *common, "--input_norm", "imagenet",
                    "--checkpoint", str(model), "--output_dir", str(out / "infer_wrong")])
    assert r.returncode != 0 and "input_norm='none'" in r.stderr + r.stdout and "--input_norm 'none'" in r.stderr + r.stdout
    assert not (out / "infer_wrong" / "inference.json").exists()

    # MLflow: params, per-epoch curves, validation metrics, test metrics with CIs and artifacts are in the store
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ffcl_monai")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    train_run, eval_run = runs["train:run"], runs["evaluate:run"]
    assert train_run.data.params["backbone"] == "resnet10" and train_run.data.params["learning_rate"] == "0.001"
    assert len(client.get_metric_history(train_run.info.run_id, "val_auc")) == 2
    assert len(client.get_metric_history(train_run.info.run_id, "train_loss_epoch")) == 2
    assert client.get_metric_history(train_run.info.run_id, "lr_group_0")
    assert client.get_metric_history(train_run.info.run_id, "train_loss")
    arts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"config_resolved.json", "dataset_summary.json", "training_curves.png", "history.jsonl"} <= arts
    for k in ("accuracy", "f1", "precision", "recall", "auc"):
        assert f"test_{k}" in eval_run.data.metrics and f"test_{k}_ci_low" in eval_run.data.metrics
    arts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert {"metrics.json", "predictions.csv", "roc.png", "confusion_matrix.png", "dataset_summary.json"} <= arts
    summary = json.loads((out / "dataset_summary.json").read_text())
    assert summary["training"]["total"] == 12 and "patient" not in json.dumps(summary)

    # MONAI's own bundle tools work on the trained checkpoint
    r = bundle_cli(["verify_net_in_out", "network_def", "--meta_file", str(CONFIGS / "metadata.json"),
                    "--config_file", str(CONFIGS / "train.yaml")])
    assert r.returncode == 0 and "verified" in (r.stdout + r.stderr), r.stderr[-2000:]
    ts = tmp_path / "model.ts"
    r = bundle_cli(["ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(model), "--key_in_ckpt", "model",
                    "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.yaml"),
                    "--backbone", "resnet10"])
    assert r.returncode == 0, r.stderr[-2000:]
    scripted = torch.jit.load(str(ts))
    assert scripted(torch.rand(1, 1, 32, 32)).shape == (1, 2)


def test_3d_train_and_evaluate(tiny3d, tmp_path):
    out = tmp_path / "r3d"
    o = dict(datalist=str(tiny3d), output_dir=str(out), image_size=[16, 16, 16], batch_size=4, max_epochs=1,
             class_names=["absent", "present"])
    run_bundle(cfg("train.yaml", "3d.yaml"), **o)
    run_bundle(cfg("train.yaml", "evaluate.yaml", "3d.yaml"), n_bootstrap=20, **o)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and 0 <= metrics["metrics"]["auc"]["value"] <= 1
    state = torch.load(out / "models" / "model.pt", weights_only=True)["model"]
    assert state["backbone.blocks.0.conv1.weight"].ndim == 5  # 3D convolutions


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_multiclass_and_multilabel(tmp_path, task):
    from conftest import make_2d, write_datalist

    root = tmp_path / "data"
    base = json.loads(make_2d(root, counts=(9, 6, 6)).read_text())
    for split in ("training", "validation", "test"):
        for i, e in enumerate(base[split]):
            if task == "multiclass":
                e["label"] = i % 3
            else:  # 3 labels, one uncertain (-1 = ignored by loss and metrics)
                e["label"] = [i % 2, (i + 1) % 2, -1 if i % 3 == 0 else 1]
    names = ["a", "b", "c"]
    datalist = write_datalist(root, {s: base[s] for s in ("training", "validation", "test")}, task=task,
                              num_classes=3, labels={str(i): n for i, n in enumerate(names)})
    out = tmp_path / "run"
    o = dict(datalist=str(datalist), output_dir=str(out), task=task, num_classes=3, class_names=names,
             image_size=[32, 32], backbone="resnet10", batch_size=6, max_epochs=1)
    run_bundle(cfg("train.yaml"), **o)
    run_bundle(cfg("train.yaml", "evaluate.yaml"), n_bootstrap=20, **o)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"auc_a", "auc_b", "auc_c", "accuracy", "f1"} <= set(metrics)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 6


def test_one_owner_per_folder_a_finished_run_is_never_silently_replaced(tiny2d, tmp_path):
    """A second run into a folder holding a finished run's checkpoints is refused, naming --resume and --overwrite;
    --overwrite moves the old results aside (nothing deleted) and the new history rows carry the new run's id."""
    from conftest import user_error

    out = tmp_path / "run"
    kw = dict(datalist=str(tiny2d), output_dir=str(out), **{**FAST, "max_epochs": 1}, log_model=False, progress=False)
    run_bundle(cfg("train.yaml"), **kw)
    model = (out / "models" / "model.pt").read_bytes()
    first_ids = {json.loads(x)["run_id"] for x in (out / "history.jsonl").read_text().splitlines()}
    with pytest.raises(Exception) as info:
        run_bundle(cfg("train.yaml"), **kw)
    said = str(user_error(info.value))
    assert "--resume True" in said and "--overwrite True" in said and str(out) in said
    assert (out / "models" / "model.pt").read_bytes() == model  # untouched

    run_bundle(cfg("train.yaml"), **kw, overwrite=True)
    moved = list((out / ".overwritten").glob("*/models/model.pt"))
    assert len(moved) == 1 and moved[0].read_bytes() == model
    ids = {json.loads(x)["run_id"] for x in (out / "history.jsonl").read_text().splitlines()}
    assert len(first_ids) == 1 and len(ids) == 1 and ids != first_ids  # one run per history file, told apart


def test_validation_false_trains_without_model_selection(tiny2d, tmp_path):
    """`validation: false` (the pretraining overlays' switch; the bench uses it on train.yaml): no validation split is
    read, no evaluator runs, no best model is required, the resume checkpoint and history are still written. With no
    models/model.pt there is no MLflow model to log, so the model logger is off rather than warning that the file is
    missing (with `log_model` left at its default)."""
    import warnings

    out = tmp_path / "noval"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_bundle(cfg("train.yaml"), datalist=str(tiny2d), output_dir=str(out), **{**FAST, "max_epochs": 1},
                   validation=False, progress=False)
    assert not [str(w.message) for w in caught if "model" in str(w.message) and "MLflow" in str(w.message)]
    assert not (out / "models" / "model.pt").exists() and (out / "checkpoints" / "resume.pt").is_file()
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "val_auc" not in rows[0] and "train_loss" in rows[0]


@pytest.mark.parametrize("overlay", [[], ["ffcl.yaml"]])
def test_a_last_training_batch_of_one_image_is_dropped(tiny2d, tmp_path, overlay):
    """12 training images in batches of 11 leave a last batch of one image; at 32 px a ResNet's last feature map is
    1 x 1, so BatchNorm in training mode cannot normalise it ("Expected more than 1 value per channel when training":
    the defaults study died on this on BreastMNIST, 545 images in batches of 32). The training loader drops that one
    batch and only that one: fine-tuning and the FFCL stages (the same loader) train through it."""
    out = tmp_path / "run"
    keys = dict(datalist=str(tiny2d), output_dir=str(out), **{**FAST, "batch_size": 11, "max_epochs": 1},
                progress=False, log_model=False)
    if overlay:
        from ffcl_monai.workflows.ffcl import run_ffcl

        run_ffcl(cfg("train.yaml", *overlay), {**keys, "local_epochs": 1, "global_epochs": 1, "saliency": False})
        assert (out / "finetune" / "models" / "model.pt").is_file()
    else:
        run_bundle(cfg("train.yaml"), **keys)
        assert (out / "models" / "model.pt").is_file()
    train = _workflow("train", cfg("train.yaml"), datalist=str(tiny2d), output_dir=str(tmp_path / "t"),
                      **{**FAST, "batch_size": 11})
    assert train.parser.get_parsed_content("train#dataloader").drop_last is True
    train = _workflow("train", cfg("train.yaml"), datalist=str(tiny2d), output_dir=str(tmp_path / "t2"),
                      **{**FAST, "batch_size": 5})        # last batch of 2 images: kept
    assert train.parser.get_parsed_content("train#dataloader").drop_last is False
