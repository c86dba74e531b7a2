"""FFCL program and ablation command: stage parsing, the runner's override semantics and 3D rule, the table, and
(slow) one tiny end-to-end pipeline run through `python -m monai.bundle run --workflow_name` on a synthetic datalist
written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ffcl_monai.ablate import parse_variant, write_table
from ffcl_monai.workflows import runner
from ffcl_monai.workflows.ffcl import parse_stages


def test_parse_stages_orders_and_errors():
    assert parse_stages("local,global") == ["local", "global"]
    assert parse_stages("global, local") == ["global", "local"]
    assert parse_stages(["local"]) == ["local"]
    assert parse_stages("none") == [] and parse_stages("") == [] and parse_stages(None) == []
    with pytest.raises(ValueError, match="`stages`"):
        parse_stages("local,supervised")


def test_parse_variant():
    assert parse_variant("ffcl-lg-random") == ("ffcl-lg", "random")
    assert parse_variant("rbp-imagenet") == ("rbp", "imagenet")
    assert parse_variant("global-random") == ("global", "random")
    with pytest.raises(ValueError, match="approach"):
        parse_variant("simclr-random")


def test_override_values_are_read_as_yaml():
    assert runner.parse_overrides(["a=3", "b=1e-3", "c=True", "d=false", "e=[32, 32]", "f=null", "g=resnet18",
                                   "train#dataloader#num_workers=2", "h=x=y"]) == {
        "a": 3, "b": 1e-3, "c": True, "d": False, "e": [32, 32], "f": None, "g": "resnet18",
        "train#dataloader#num_workers": 2, "h": "x=y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        runner.parse_overrides(["local_lr"])


def test_the_3d_rule_adds_the_overlay_before_multi_gpu(tmp_path):
    d3 = tmp_path / "d3.json"
    d3.write_text(json.dumps({"spatial_dims": 3, "training": []}))
    d2 = tmp_path / "d2.json"
    d2.write_text(json.dumps({"spatial_dims": 2, "training": []}))
    names = lambda files: [Path(f).name for f in files]  # noqa: E731
    assert names(runner.config_files(["train.yaml", "multi_gpu_train.yaml"], d3)) == [
        "train.yaml", "3d.yaml", "multi_gpu_train.yaml"]
    assert names(runner.config_files(["train.yaml", "3d.yaml"], d3)) == ["train.yaml", "3d.yaml"]
    assert names(runner.config_files(["train.yaml"], d2)) == ["train.yaml"]
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        runner.config_files(["train.yaml", "nope.yaml"])


def test_write_table_layout_and_files(tmp_path):
    m = {k: {"value": 0.9, "ci_low": 0.85, "ci_high": 0.95} for k in ["accuracy", "f1", "precision", "recall", "auc"]}
    rows = [
        {"variant": "rbp-random", "approach": "RBP", "contrastive": "–", "init": "random", "metrics": m, "wall_s": 10.0},
        {"variant": "ffcl-lg-random", "approach": "FFCL", "contrastive": "Local→Global", "init": "random",
         "metrics": m, "wall_s": 20.0},
    ]
    files = write_table(rows, tmp_path, "resnet18", "validation", 262)
    md = (tmp_path / "table.md").read_text()
    assert "| Backbone | Approach | Contrastive | Initialization | Accuracy | F1 | Precision | Recall | AUC |" in md
    assert "| resnet18 | FFCL | Local→Global | random | 90.00 [85.00, 95.00]" in md
    csv_lines = (tmp_path / "table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,backbone,approach") and len(csv_lines) == 3
    assert all(Path(f).is_file() for f in files)


def _tiny_datalist(root: Path, n_per_split=(8, 6, 6), size=20) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    data = {}
    for split, n in zip(["training", "validation", "test"], n_per_split):
        items = []
        for i in range(n):
            label = i % 2
            arr = (rng.random((size, size)) * 80 + 100 * label).astype(np.uint8)
            path = root / split / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            items.append({"image": f"{split}/{i}.png", "label": label, "patient": f"{split}{i}"})
        data[split] = items
    header = {"name": "tiny", "task": "binary", "labels": {"0": "A", "1": "B"}, "num_classes": 2, "spatial_dims": 2}
    path = root / "tiny.json"
    path.write_text(json.dumps({**header, **data}))
    return path


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path):
    """local -> global -> fine-tune -> evaluate in one command; every stage's checkpoint feeds the next; every CLI key
    reaches every step; MLflow nesting; a rerun skips every finished step."""
    import mlflow
    from monai.bundle import run

    dl = _tiny_datalist(tmp_path / "data")
    out = tmp_path / "run"
    cdir = runner.configs_dir()
    kwargs = dict(workflow_name="ffcl_monai.workflows.ffcl.FFCLWorkflow",
                  config_file=[str(cdir / "train.yaml"), str(cdir / "ffcl.yaml")], meta_file=str(cdir / "metadata.json"),
                  logging_file=str(cdir / "logging.conf"), datalist=str(dl), output_dir=str(out), image_size=[16, 16],
                  backbone="resnet10", batch_size=4, local_epochs=1, global_epochs=1, max_epochs=1, n_bootstrap=10,
                  class_names=["A", "B"], progress=False, monitor_interval=0)
    run(**kwargs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "ffcl" and summary["status"] == "FINISHED"
    assert summary["params"]["stages"] == "local,global"
    assert (out / "stage1_local" / "backbone.pt").is_file() and (out / "stage2_global" / "backbone.pt").is_file()
    assert (out / "finetune" / "models" / "model.pt").is_file()
    assert "test_auc" in summary["metrics"] and "validation_auc" in summary["metrics"]
    # the CLI keys reached the steps (explicitly passed, not read back from a parser)
    for step in ("stage1_local", "stage2_global", "finetune", "evaluate_test"):
        resolved = json.loads((out / step / "config_resolved.json").read_text()) if step != "evaluate_test" else None
        if resolved:
            assert resolved["backbone"] == "resnet10" and resolved["image_size"] == [16, 16], step
    ft = json.loads((out / "finetune" / "config_resolved.json").read_text())
    assert ft["loss_name"] == "bce"  # ffcl.yaml's fine-tuning default travels to the fine-tuning step
    assert ft["pretrained_ckpt"] == str(out / "stage2_global" / "backbone.pt")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.info.run_id == summary["parent_run_id"]][0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"stage1_local", "stage2_global", "finetune", "evaluate_validation", "evaluate_test"} <= set(children)
    assert "local_loss_layer4" in children["stage1_local"].data.metrics
    assert "global_loss" in children["stage2_global"].data.metrics
    # A rerun of the same command is the owner continuing: every finished step is skipped, nothing is trained again.
    model_mtime = (out / "finetune" / "models" / "model.pt").stat().st_mtime_ns
    run(**kwargs)
    assert (out / "finetune" / "models" / "model.pt").stat().st_mtime_ns == model_mtime
    assert json.loads((out / "summary.json").read_text())["metrics"]["test_auc"] == summary["metrics"]["test_auc"]


def test_ffcl_yaml_without_workflow_name_says_how_to_run_it(tmp_path):
    from monai.bundle import run

    from conftest import user_error

    dl = _tiny_datalist(tmp_path / "data")
    cdir = runner.configs_dir()
    with pytest.raises(Exception) as info:
        run(config_file=[str(cdir / "train.yaml"), str(cdir / "ffcl.yaml")], datalist=str(dl),
            output_dir=str(tmp_path / "o"), progress=False, class_names=["A", "B"])
    assert "--workflow_name ffcl_monai.workflows.ffcl.FFCLWorkflow" in str(user_error(info.value))
    assert not (tmp_path / "o" / "models").exists()  # refused before any training


def test_robust_binary_auc_uses_the_unsaturated_column():
    from ffcl_monai.ablate import robust_binary_auc

    sat = {"auc": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5},
           "auc_NORMAL": {"value": 0.93, "ci_low": 0.9, "ci_high": 0.96},
           "auc_PNEUMONIA": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5}}
    fixed, changed = robust_binary_auc(sat, ["NORMAL", "PNEUMONIA"])
    assert changed and fixed["auc"]["value"] == 0.93
    ok = {**sat, "auc": sat["auc_NORMAL"], "auc_PNEUMONIA": sat["auc_NORMAL"]}
    assert robust_binary_auc(ok, ["NORMAL", "PNEUMONIA"]) == (ok, False)
