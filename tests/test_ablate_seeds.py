"""`python -m ffcl_monai.ablate --seeds ... --preset ...`: one resumable step per (variant, seed), mean +- std tables,
the paired comparison with RBP recomputed here from the predictions files, MLflow metrics read back from the store.

The fast tests replace the FFCL program by a stand-in that writes real report files (the evaluate workflow's own
TestReport writer) with known predictions; the slow test trains the real thing on a tiny datalist."""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ffcl_monai.evaluation.paired import compare_seeds, read_predictions
from ffcl_program_stand_in import write_evaluations
from test_ffcl_pipeline import _tiny_datalist

VARIANTS = "rbp-random,ffcl-lg-random"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's ablations (creating a SQLite store costs seconds): MLFLOW_TRACKING_URI
    overrides the per-folder store, as for users."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def _fake_pipeline(calls: list):
    """Stands in for ffcl_monai.workflows.ffcl.run_ffcl: writes evaluate_<split>/{metrics.json, predictions.csv}
    with the evaluate workflow's writer; pretrained variants separate the classes better, each seed differently."""

    def run(config_files, overrides, parent_run_id=None):
        out = Path(overrides["output_dir"])
        calls.append((out.name, [Path(f).name for f in config_files], overrides["seed"], overrides["stages"]))
        for step in ("stage1_local", "finetune"):  # what a real run leaves: results and resume checkpoints
            (out / step / "checkpoints").mkdir(parents=True, exist_ok=True)
            for f in ("checkpoints/resume.pt", "checkpoints/resume.prev.pt"):
                (out / step / f).write_bytes(b"x" * 1000)
        (out / "finetune" / "models").mkdir(exist_ok=True)
        (out / "finetune" / "models" / "model.pt").write_bytes(b"m")

        def p1(split, y):
            rng = np.random.default_rng(zlib.crc32(f"{overrides['stages']}/{overrides['seed']}/{split}".encode()))
            strength = 0.4 if overrides["stages"] == "none" else 1.2
            return 1 / (1 + np.exp(-(strength * (2 * y - 1) + rng.normal(size=len(y)))))

        return write_evaluations(overrides, ("validation", "test"), p1)

    return run


@pytest.fixture
def fake(monkeypatch, store):
    import ffcl_monai.workflows.ffcl as ffcl

    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    return calls


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return _tiny_datalist(tmp_path_factory.mktemp("data"), n_per_split=(4, 12, 30))


@pytest.fixture(scope="module")
def two_seeds(store, datalist, tmp_path_factory) -> tuple[Path, list]:
    """``--seeds 0,1 --preset oct`` once for the module's checks (the resume test runs last and extends it)."""
    import ffcl_monai.workflows.ffcl as ffcl

    calls: list = []
    out = tmp_path_factory.mktemp("two") / "abl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
        assert _ablate(datalist, out, "--seeds", "0,1", "--preset", "oct") == 0
    return out, calls


def _parent_run(out: Path):
    client = mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlruns.db'}")
    state = json.loads((out / "state.json").read_text())
    return client.get_run(state["parent_run_id"])


def _paired_rows(out: Path) -> dict[tuple, dict]:
    with open(out / "paired.csv", newline="") as f:
        return {(r["variant"], r["seed"], r["metric"]): r for r in csv.DictReader(f)}


def _ablate(datalist, out, *extra):
    from ffcl_monai.ablate import main

    return main(["--datalist", str(datalist), "--output-dir", str(out), "--variants", VARIANTS,
                 "--paired-bootstrap", "200", *extra])


def test_every_variant_and_seed_is_one_run_with_the_preset_and_mean_std_table(two_seeds):
    out, calls = two_seeds
    # one step per (variant, seed), seed-major; seed 0 keeps the single-seed folder names; seed and preset reach it
    assert [(c[0], c[2]) for c in calls] == [("rbp-random", 0), ("ffcl-lg-random", 0), ("rbp-random-seed1", 1),
                                            ("ffcl-lg-random-seed1", 1)]
    assert all(c[1] == ["train.yaml", "ffcl.yaml", "oct.yaml"] for c in calls)
    for name in ("rbp-random", "ffcl-lg-random", "rbp-random-seed1", "ffcl-lg-random-seed1"):
        assert (out / name / "evaluate_test" / "predictions.csv").is_file()
    md = (out / "table.md").read_text()
    assert "test split (n=30), seeds 0, 1, preset: oct: mean ± std over seeds" in md
    # mean +- std (sample std) of the per-seed accuracies in metrics.json
    for v, label in (("rbp-random", "| RBP | – | random | "),
                     ("ffcl-lg-random", "| FFCL | Local→Global | random | ")):
        a = [json.loads((out / d / "evaluate_test" / "metrics.json").read_text())["metrics"]["accuracy"]["value"]
             for d in (v, f"{v}-seed1")]
        assert f"{label}{100 * np.mean(a):.2f} ± {100 * np.std(a, ddof=1):.2f} |" in md
    assert "| ffcl-lg-random | rbp-random | **pooled (2 seeds)** |" in md
    assert "| ffcl-lg-random | rbp-random | 0 |" in md and "| ffcl-lg-random | rbp-random | 1 |" in md
    assert "DeLong" in md and "Test split, evaluated once" in md
    seed1 = (out / "table_seed1.md").read_text()
    assert "seed 1, preset: oct: value [bootstrap 95% CI]" in seed1 and "| FFCL | Local→Global | random |" in seed1
    assert (out / "table_seed0.md").is_file() and (out / "table.png").stat().st_size > 10_000


def _reference(out: Path) -> tuple[dict, np.ndarray, dict]:
    """paired.py on the predictions files, independently of the ablation's own call."""
    preds = {(v, s): read_predictions(out / (v if s == 0 else f"{v}-seed{s}") / "evaluate_test" / "predictions.csv",
                                      "binary") for v in VARIANTS.split(",") for s in (0, 1)}
    y = preds[("rbp-random", 0)].labels
    ref = compare_seeds({s: preds[("ffcl-lg-random", s)].probs for s in (0, 1)},
                        {s: preds[("rbp-random", s)].probs for s in (0, 1)}, y, "binary", n_bootstrap=200,
                        metrics=("auc", "accuracy"))
    return preds, y, ref


def test_pooled_numbers_are_what_paired_computes_from_the_predictions(two_seeds):
    out, _ = two_seeds
    preds, y, ref = _reference(out)
    rows = _paired_rows(out)
    pooled = rows[("ffcl-lg-random", "pooled", "auc")]
    # the point estimate once more with scikit-learn: mean over seeds of AUC(ffcl seed k) - AUC(rbp seed k)
    d_auc = [roc_auc_score(y, preds[("ffcl-lg-random", s)].probs[:, 1])
             - roc_auc_score(y, preds[("rbp-random", s)].probs[:, 1]) for s in (0, 1)]
    assert float(pooled["delta"]) == pytest.approx(np.mean(d_auc), abs=1e-12)
    assert float(pooled["delta"]) == pytest.approx(ref["pooled"]["auc"].mean, abs=1e-12)
    assert float(pooled["ci_low"]) == pytest.approx(ref["pooled"]["auc"].ci_low, abs=1e-12)
    assert float(pooled["ci_high"]) == pytest.approx(ref["pooled"]["auc"].ci_high, abs=1e-12)
    seed1 = rows[("ffcl-lg-random", "1", "auc")]
    assert float(seed1["ci_low"]) == pytest.approx(ref["per_seed"][1]["auc"]["ci_low"], abs=1e-12)
    assert float(seed1["delong_p"]) == pytest.approx(ref["per_seed"][1]["delong"].p, abs=1e-12)
    acc = rows[("ffcl-lg-random", "pooled", "accuracy")]
    assert float(acc["ci_low"]) == pytest.approx(ref["pooled"]["accuracy"].ci_low, abs=1e-12)
    md = (out / "table.md").read_text()
    p = ref["pooled"]["auc"]
    assert f"**{100 * p.mean:+.2f} [{100 * p.ci_low:+.2f}, {100 * p.ci_high:+.2f}]**" in md


def test_parent_run_has_means_stds_pooled_deltas_and_the_preset(two_seeds):
    out, _ = two_seeds
    _, _, ref = _reference(out)
    run = _parent_run(out)
    m = run.data.metrics
    assert m["ffcl-lg-random.test_delta_auc"] == pytest.approx(ref["pooled"]["auc"].mean)
    assert m["ffcl-lg-random.test_delta_auc_ci_low"] == pytest.approx(ref["pooled"]["auc"].ci_low)
    assert m["ffcl-lg-random.test_delta_accuracy_ci_high"] == pytest.approx(ref["pooled"]["accuracy"].ci_high)
    assert m["ffcl-lg-random.seed0.test_delong_p"] == pytest.approx(ref["per_seed"][0]["delong"].p)
    acc = [json.loads((out / d / "evaluate_test" / "metrics.json").read_text())["metrics"]["accuracy"]["value"]
           for d in ("rbp-random", "rbp-random-seed1")]
    assert m["rbp-random.test_accuracy_mean"] == pytest.approx(np.mean(acc))
    assert m["rbp-random.test_accuracy_std"] == pytest.approx(np.std(acc, ddof=1))
    assert m["rbp-random.seed1.test_accuracy"] == pytest.approx(acc[1])
    assert m["n_seeds"] == 2
    assert run.data.params["preset"] == "oct" and run.data.params["seeds"] == "0,1"
    assert run.data.params["references"] == "ffcl-lg-random:rbp-random"


def test_one_seed_keeps_the_single_seed_layout_and_keys(datalist, tmp_path, fake):
    out = tmp_path / "one"
    assert _ablate(datalist, out, "--split", "validation") == 0
    assert [c[0] for c in fake] == ["rbp-random", "ffcl-lg-random"] and {c[2] for c in fake} == {0}
    assert fake[0][1] == ["train.yaml", "ffcl.yaml"]
    md = (out / "table.md").read_text()
    assert "validation split (n=12), seed 0, preset: none: value [bootstrap 95% CI], in %." in md
    assert "**Validation split**" in md and "optimistic" in md  # the selection split is flagged
    assert "| ffcl-lg-random | rbp-random | 0 |" in md and "pooled" not in md.split("| Variant |")[1]
    assert "With one seed the interval covers the sampling of the images only" in md
    assert not list(out.glob("table_seed*"))
    m = _parent_run(out).data.metrics
    assert "ffcl-lg-random.validation_auc" in m and "ffcl-lg-random.validation_auc_ci_low" in m  # earlier keys
    seed0 = _paired_rows(out)[("ffcl-lg-random", "0", "auc")]
    assert m["ffcl-lg-random.validation_delta_auc"] == pytest.approx(float(seed0["delta"]))
    assert m["ffcl-lg-random.validation_delta_auc_ci_low"] == pytest.approx(float(seed0["ci_low"]))
    assert "ffcl-lg-random.validation_auc_std" not in m


def test_bad_seeds_presets_and_seed_override_are_refused(datalist, tmp_path, fake, capsys):
    from ffcl_monai.ablate import available_presets, parse_seeds, reference_for, step_name

    assert parse_seeds("0, 2,5") == [0, 2, 5]
    for bad, msg in (("0,0", "twice"), ("1,-1", "non-negative"), ("a", "non-negative"), ("", "at least one")):
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)
    assert step_name("rbp-random", 0) == "rbp-random" and step_name("rbp-random", 3) == "rbp-random-seed3"
    assert reference_for("ffcl-lg-imagenet", ["rbp-random", "rbp-imagenet", "ffcl-lg-imagenet"]) == "rbp-imagenet"
    assert reference_for("ffcl-lg-imagenet", ["rbp-random", "ffcl-lg-imagenet"]) == "rbp-random"
    assert reference_for("rbp-imagenet", ["rbp-random", "rbp-imagenet"]) == "rbp-random"
    assert reference_for("rbp-random", ["rbp-random", "local-random"]) is None
    presets = available_presets()
    assert "oct" in presets and "train" not in presets and "ffcl_local" not in presets
    for argv, msg in ((["--preset", "nope"], "available overlays: "), (["--preset", "train"], "no overlay"),
                      (["--seeds", "0,x"], "--seeds"), (["--set", "seed=3"], "--seeds 3")):
        with pytest.raises(SystemExit) as e:
            _ablate(datalist, tmp_path / "bad", *argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err, err
        if argv[0] == "--preset":
            assert ", ".join(presets) in err  # the list of what exists
    assert fake == [] and not (tmp_path / "bad").exists()


def test_rerun_trains_nothing_more_seeds_add_runs_other_settings_refused(two_seeds, datalist, fake):
    # (runs after the checks above: it extends their folder)
    out, _ = two_seeds
    assert _ablate(datalist, out, "--seeds", "0,1", "--preset", "oct") == 0
    assert fake == []  # every (variant, seed) finished earlier: nothing runs again
    assert _ablate(datalist, out, "--seeds", "0,1,2", "--preset", "oct") == 0
    assert [c[0] for c in fake] == ["rbp-random-seed2", "ffcl-lg-random-seed2"]
    assert "**pooled (3 seeds)**" in (out / "table.md").read_text()
    assert _parent_run(out).data.metrics["n_seeds"] == 3
    # another preset into the same folder would mix settings in one table: refused before anything runs
    with pytest.raises(SystemExit) as e:
        _ablate(datalist, out, "--seeds", "0,1", "--preset", "3d")
    assert e.value.code == 2 and len(fake) == 2


@pytest.mark.slow
def test_real_two_seed_ablation_tiny(tmp_path, monkeypatch):
    """The real FFCL program, 16 px, one epoch per stage: the seeds reach the runs, the pooled numbers come from the
    predictions files, the parent run has them, and a rerun trains nothing."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dl = _tiny_datalist(tmp_path / "data", n_per_split=(8, 6, 8))
    out = tmp_path / "abl"
    args = ["--seeds", "0,1", "--backbone", "resnet10", "--image-size", "16", "--local-epochs", "1",
            "--global-epochs", "1", "--max-epochs", "1", "--batch-size", "4", "--set", "n_bootstrap=10",
            "--set", "progress=False", "--set", "monitor_interval=0", "--set", "saliency=False"]
    assert _ablate(dl, out, *args) == 0
    names = ("rbp-random", "ffcl-lg-random", "rbp-random-seed1", "ffcl-lg-random-seed1")
    for name in names:
        resolved = json.loads((out / name / "finetune" / "config_resolved.json").read_text())
        assert resolved["seed"] == (1 if name.endswith("seed1") else 0)
        assert (out / name / "evaluate_test" / "predictions.csv").is_file()
    md = (out / "table.md").read_text()
    assert "mean ± std over seeds" in md and "**pooled (2 seeds)**" in md
    preds = {n: read_predictions(out / n / "evaluate_test" / "predictions.csv", "binary") for n in names}
    y = preds["rbp-random"].labels
    ref = compare_seeds({0: preds["ffcl-lg-random"].probs, 1: preds["ffcl-lg-random-seed1"].probs},
                        {0: preds["rbp-random"].probs, 1: preds["rbp-random-seed1"].probs}, y, "binary",
                        n_bootstrap=200)
    pooled = _paired_rows(out)[("ffcl-lg-random", "pooled", "auc")]
    assert float(pooled["delta"]) == pytest.approx(ref["pooled"]["auc"].mean, abs=1e-12)
    assert math.isnan(ref["pooled"]["auc"].ci_low) or float(pooled["ci_low"]) == pytest.approx(
        ref["pooled"]["auc"].ci_low, abs=1e-12)
    m = _parent_run(out).data.metrics
    assert m["ffcl-lg-random.test_delta_auc"] == pytest.approx(ref["pooled"]["auc"].mean)
    assert "ffcl-lg-random.test_delta_auc_ci_low" in m and "ffcl-lg-random.seed1.test_delong_p" in m
    # a rerun of the same command trains nothing
    mtimes = {n: os.stat(out / n / "finetune" / "models" / "model.pt").st_mtime_ns for n in names}
    assert _ablate(dl, out, *args) == 0
    assert {n: os.stat(out / n / "finetune" / "models" / "model.pt").st_mtime_ns for n in names} == mtimes


def test_prune_resume_deletes_finished_runs_resume_checkpoints_only(datalist, tmp_path, fake):
    """--prune-resume: a finished run's resume checkpoints go (a study would fill the disk with them, ~0.8 GB per
    ResNet-18 run), its results stay; without the flag everything stays."""
    kept, pruned = tmp_path / "kept", tmp_path / "pruned"
    assert _ablate(datalist, kept, "--split", "validation") == 0
    assert _ablate(datalist, pruned, "--split", "validation", "--prune-resume") == 0
    for run in ("rbp-random", "ffcl-lg-random"):
        assert len(list((kept / run).glob("*/checkpoints/resume*.pt"))) == 4
        assert not list((pruned / run).glob("*/checkpoints/resume*.pt"))
        assert (pruned / run / "finetune" / "models" / "model.pt").is_file()
        assert (pruned / run / "evaluate_validation" / "predictions.csv").is_file()
