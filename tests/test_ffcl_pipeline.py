"""FFCL pipeline and ablation command: stage parsing, override forwarding, the table, and (slow) one tiny end-to-end
pipeline run on a synthetic datalist written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ffcl_monai.ablate import parse_variant, write_table
from ffcl_monai.pipeline import forwarded_overrides, parse_stages


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


def test_forwarded_overrides_keep_cli_changes_only():
    base = {"datalist": "a.json", "image_size": [64, 64], "network_def": {"dropout": 0.0}, "batch_size": 32}
    raw = {
        "datalist": "b.json", "image_size": [64, 64], "batch_size": 32, "network_def": {"dropout": 0.2},
        "max_epochs": 3, "local_epochs": 1, "output_dir": "x", "run": ["$..."], "stages": "local", "train": {"x": 1},
        "imports": ["$import os"],
    }
    fwd = forwarded_overrides(raw, base)
    assert fwd == {"datalist": "b.json", "network_def": {"dropout": 0.2}, "max_epochs": 3, "local_epochs": 1}


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
    """local -> global -> fine-tune -> evaluate in one call; every stage's checkpoint feeds the next; MLflow nesting."""
    import mlflow
    from monai.bundle import run

    from ffcl_monai.pipeline import configs_dir

    dl = _tiny_datalist(tmp_path / "data")
    out = tmp_path / "run"
    cdir = configs_dir()
    run(config_file=[str(cdir / "common.yaml"), str(cdir / "ffcl.yaml")], meta_file=str(cdir / "metadata.json"),
        logging_file=str(cdir / "logging.conf"), datalist=str(dl), output_dir=str(out), image_size=[16, 16],
        backbone="resnet10", batch_size=4, local_epochs=1, global_epochs=1, max_epochs=1, n_bootstrap=10,
        class_names=["A", "B"], progress=False)
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["stages"] == ["local", "global"]
    assert (out / "stage1_local" / "backbone.pt").is_file() and (out / "stage2_global" / "backbone.pt").is_file()
    assert "test_auc" in summary["metrics"] and "validation_auc" in summary["metrics"]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.info.run_id == summary["parent_run_id"]][0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"stage1_local", "stage2_global", "downstream", "evaluate_validation", "evaluate_test"} <= set(children)
    assert "local_loss_layer4" in children["stage1_local"].data.metrics
    assert "global_loss" in children["stage2_global"].data.metrics
    # A rerun skips every finished step.
    run(config_file=[str(cdir / "common.yaml"), str(cdir / "ffcl.yaml")], meta_file=str(cdir / "metadata.json"),
        logging_file=str(cdir / "logging.conf"), datalist=str(dl), output_dir=str(out), image_size=[16, 16],
        backbone="resnet10", batch_size=4, local_epochs=1, global_epochs=1, max_epochs=1, n_bootstrap=10,
        class_names=["A", "B"], progress=False)


def test_robust_binary_auc_uses_the_unsaturated_column():
    from ffcl_monai.ablate import robust_binary_auc

    sat = {"auc": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5},
           "auc_NORMAL": {"value": 0.93, "ci_low": 0.9, "ci_high": 0.96},
           "auc_PNEUMONIA": {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5}}
    fixed, changed = robust_binary_auc(sat, ["NORMAL", "PNEUMONIA"])
    assert changed and fixed["auc"]["value"] == 0.93
    ok = {**sat, "auc": sat["auc_NORMAL"], "auc_PNEUMONIA": sat["auc_NORMAL"]}
    assert robust_binary_auc(ok, ["NORMAL", "PNEUMONIA"]) == (ok, False)
