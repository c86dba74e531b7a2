"""`python -m ffcl_monai.study` (issue 17): spec validation, the run plan (one RBP run per distinct RBP setting and
seed), the selection rule, the tables and the summary against ffcl_monai.evaluation.paired computed here from the
predictions files, resume and --max-runs, the estimate arithmetic, the MLflow parent run.

The fast tests replace the FFCL program by a stand-in (as tests/test_ablate_seeds.py does) that writes real report
files with known predictions: RBP separates the classes moderately; FFCL L->G separates them a little worse at the
base, much better with `pair_mode: random_partner`, worse still with `projection: mlp`, and slightly worse with the
lower learning rate. The slow test runs a 1-factor, 2-level study for real on a tiny datalist."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from ffcl_monai.evaluation.paired import compare_seeds, read_predictions
from ffcl_program_stand_in import write_evaluations
from test_ffcl_pipeline import _tiny_datalist

SEL_SEEDS, CONF_SEEDS = [0, 1, 2], [3, 4, 5]
BOOT = 50


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's studies (creating a SQLite store costs seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def _strength(o: dict) -> float:
    """How well a run separates the classes: RBP 0.6; FFCL 0.5 at the base, 2.0 with random partners, 0.15 with the
    MLP head, 0.35 at the lower learning rate."""
    if o["stages"] == "none":
        return 0.6
    if o.get("pair_mode") == "random_partner":
        return 2.0
    if o.get("projection") == "mlp":
        return 0.15
    return 0.35 if float(o.get("local_lr", 1e-3)) < 1e-3 else 0.5


def _fake_pipeline(calls: list):
    """Stands in for run_ffcl: evaluate_<split>/{metrics.json, predictions.csv} for each of `eval_splits`, written by
    the evaluate workflow's own TestReport, with the class separation of `_strength` and per-run noise."""

    def run(config_files, overrides, parent_run_id=None):
        out = Path(overrides["output_dir"])
        calls.append({"dir": str(out), "seed": overrides["seed"], "stages": overrides["stages"],
                      "files": [Path(f).name for f in config_files], "overrides": dict(overrides)})
        dl = Path(overrides["datalist"])

        def p1(split, y):
            # images hard for one model are hard for the others of the same seed (as real models on the same
            # images): a shared noise per (seed, split, datalist) and a smaller one of the run's own
            shared = np.random.default_rng(zlib.crc32(f"{overrides['seed']}/{split}/{dl.parent.name}/{dl.name}".encode()))
            own = np.random.default_rng(zlib.crc32(f"{overrides['stages']}/{_strength(overrides)}/{overrides['seed']}"
                                                   f"/{split}/{dl.parent.name}/{dl.name}".encode()))
            noise = 0.5 * shared.normal(size=len(y)) + 0.25 * own.normal(size=len(y))
            return 1 / (1 + np.exp(-(_strength(overrides) * (2 * y - 1) + noise)))

        return write_evaluations(overrides, overrides.get("eval_splits", ["validation"]), p1)

    return run


def _skip_run_plots(mp) -> None:
    """Speed only: the per-run ROC / confusion PNGs and each ablation's own table.png (tested in their own modules)
    become empty files; the study's plots stay real."""
    import ffcl_monai.ablate as ablate
    import ffcl_monai.handlers.reports as reports

    def touch(*args):
        path = Path(next(a for a in reversed(args) if isinstance(a, Path)))
        path.write_bytes(b"")
        return path

    mp.setattr(reports, "plot_roc", touch)
    mp.setattr(reports, "plot_confusion", touch)
    mp.setattr(ablate, "plot_summary", touch)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"sel": _tiny_datalist(root / "sel", n_per_split=(10, 40, 0)),
            "conf": _tiny_datalist(root / "conf", n_per_split=(12, 36, 0))}


def _raw_spec(data: dict[str, Path]) -> dict:
    return {
        "name": "t", "split": "validation", "paired_bootstrap": BOOT, "step_overhead_s": 5,
        "seeds": {"select": SEL_SEEDS, "confirm": CONF_SEEDS},
        "common": {"eval_splits": ["validation"], "saliency": False},
        "datasets": {
            "sel": {"role": "select", "datalist": str(data["sel"]), "backbone": "resnet10", "image_size": 16,
                    "epochs": {"local": 1, "global": 2, "finetune": 3}, "set": {"label_fraction": 0.5},
                    "img_per_s": 100},
            "conf": {"role": "confirm", "datalist": str(data["conf"]), "backbone": "resnet10", "image_size": 16,
                     "epochs": {"local": 1, "global": 1, "finetune": 2}, "img_per_s": 50},
        },
        "base": {"set": {"learning_rate": 0.001, "local_lr": 0.001}, "rbp": ["learning_rate"]},
        "factors": {
            "pairing": {"levels": {"random_partner": {"set": {"pair_mode": "random_partner"}}}},
            "projection": {"levels": {"mlp": {"set": {"projection": "mlp"}}}},
            "lr": {"levels": {"1e-4": {"set": {"learning_rate": 0.0001, "local_lr": 0.0001},
                                       "rbp": ["learning_rate"]}}},
            "loss": {"tasks": ["multiclass"], "levels": {"bce": {"set": {"loss_name": "bce"}, "rbp": ["loss_name"]}}},
        },
    }


def _spec(raw: dict):
    from ffcl_monai.study import parse_spec

    return parse_spec(copy.deepcopy(raw), "test-spec")


def _no_measure(*args, **kwargs):
    raise AssertionError("the spec gives img_per_s: nothing is measured")


@pytest.fixture(scope="module")
def full(store, data, tmp_path_factory):
    """The whole study once (select + confirm) with the stand-in; the checks below read its folder."""
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import run_study

    calls: list = []
    out = tmp_path_factory.mktemp("study") / "s"
    lines: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
        _skip_run_plots(mp)
        res = run_study(_spec(_raw_spec(data)), out, say=lines.append, measure=_no_measure)
    return out, calls, res, lines


# ------------------------------------------------------------------------------------------------ the spec
def _refused(raw: dict, match: str) -> None:
    from ffcl_monai.study import StudySpecError

    with pytest.raises(StudySpecError, match=match):
        _spec(raw)


@pytest.mark.parametrize("edit, match", [
    (lambda r: r.update(factor={}), r"`factor` is not a key of the study spec"),
    (lambda r: r["datasets"]["sel"].update(epoch=3), r"`datasets.sel.epoch` is not a key"),
    (lambda r: r["datasets"]["sel"].pop("epochs"), r"`datasets.sel.epochs` is missing"),
    (lambda r: r["factors"]["pairing"]["levels"]["random_partner"]["set"].update(pair_mode="$print(1)"),
     r"factors.pairing.levels.random_partner.set.pair_mode.*starts with '\$'"),
    (lambda r: r["common"].update(augment_2d={"x": {"_target_": "os.system"}}),
     r"`common.augment_2d.x` is a dict with the key '_target_'.*study spec is data"),
    (lambda r: r["base"]["set"].update(local_Lr=0.1), r"`base.set.local_Lr` is not a key of the bundle configs"),
    (lambda r: r["datasets"]["sel"]["set"].update(seed=3), r"`datasets.sel.set.seed` is set by the study"),
    (lambda r: r["datasets"]["sel"]["set"].update(max_epochs=3), r"`datasets.sel.set.max_epochs` has its own place: "
                                                                 r"epochs.finetune"),
    (lambda r: r["base"]["set"].update(local_epochs=3), r"`base.set.local_epochs` has its own place"),
    (lambda r: r["factors"]["pairing"]["levels"]["random_partner"].update(rbp=["averaging"]),
     r"names `averaging`, which `factors.pairing.levels.random_partner.set` does not set"),
    (lambda r: r["factors"]["pairing"]["levels"]["random_partner"].update(rbp=["pair_mode"]),
     r"names `pair_mode`, which an RBP run never reads"),
    (lambda r: r["factors"]["lr"]["levels"]["1e-4"].update(rbp=[]), r"`base.rbp` disagree on whether RBP gets "
                                                                     r"`learning_rate`"),
    (lambda r: r["factors"]["projection"]["levels"]["mlp"]["set"].update(pair_mode="random_partner"),
     r"`factors.projection.levels.mlp.set.pair_mode` is also varied by the factor `pairing`"),
    (lambda r: r["factors"]["lr"]["levels"].update(same={"set": {"learning_rate": 0.001}, "rbp": ["learning_rate"]}),
     r"`factors.lr.levels.same` sets exactly the base's values"),
    (lambda r: r["seeds"].update(confirm=[2, 7]), r"`seeds.confirm` repeats selection seed\(s\) \[2\]"),
    (lambda r: r["seeds"].update(select=[0, 0]), r"`seeds.select`.*repeats a seed"),
    (lambda r: r["datasets"]["sel"].update(role="train"), r"`datasets.sel.role` = 'train' must be one of select, "
                                                          r"confirm"),
    (lambda r: r["datasets"]["sel"].update(role="confirm"), r"no dataset with `role: select`"),
    (lambda r: r["datasets"]["sel"].update(preset="nope"), r"`datasets.sel.preset`.*available overlays"),
    (lambda r: r["factors"].update({"bad/name": r["factors"]["pairing"]}), r"`factors.bad/name` = 'bad/name'"),
    (lambda r: r["factors"]["loss"].update(tasks=["regression"]), r"`factors.loss.tasks\[0\]` = 'regression'"),
    (lambda r: r["datasets"]["sel"].update(image_size=[16]), r"`datasets.sel.image_size`"),
    (lambda r: r.update(paired_bootstrap=0), r"`paired_bootstrap` = 0 must be an integer >= 1"),
    (lambda r: r["common"].update(eval_splits=["test"]), r"`common.eval_splits` = \['test'\] leaves out the study's "
                                                        r"split 'validation'"),
])
def test_spec_errors_name_the_key(data, edit, match):
    raw = _raw_spec(data)
    edit(raw)
    _refused(raw, match)


def test_the_default_spec_is_valid_and_sized_as_its_comment_says(tmp_path):
    """The shipped spec parses; with the speeds its comment assumes, the estimate is the comment's ~6210 s."""
    from ffcl_monai.study import default_spec_path, estimate, parse_spec

    raw = yaml.safe_load(default_spec_path().read_text())
    assert set(raw["factors"]) >= {"lr", "stage_epochs", "pairing", "averaging", "projection", "stage_augment",
                                   "loss", "global_objective"}
    sizes = {"kermany32": ((4954, 262, 0), 2, 2, 170), "oct64": ((548, 137, 0), 4, 2, 40),
             "breastmnist": ((546, 78, 156), 2, 2, 200), "adrenal3d": ((1188, 98, 298), 2, 3, 8)}
    paths = {}
    for name, ((tr, va, te), k, dims, rate) in sizes.items():
        header = {"task": "binary" if k == 2 else "multiclass", "labels": {str(i): f"c{i}" for i in range(k)},
                  "num_classes": k, "spatial_dims": dims}
        body = {s: [{"image": f"{s}/{i}.png", "label": i % k} for i in range(n)]
                for s, n in (("training", tr), ("validation", va), ("test", te))}
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps({**header, **body}))
        raw["datasets"][name]["img_per_s"] = rate
    spec = parse_spec(raw, "default", {k: str(v) for k, v in paths.items()})
    from ffcl_monai.study import _header_info

    infos = {d: _header_info(ds) for d, ds in spec.datasets.items()}
    est = estimate(spec, tmp_path / "out", ["select", "confirm"], list(spec.datasets), None, infos, _no_measure)
    assert est.runs == 114 and est.done == 0
    assert 6100 < est.seconds < 6350 and est.seconds < 2 * 3600  # the comment's arithmetic: ~6210 s, under 2 h


# ------------------------------------------------------------------------------------------------ plan and dedup
def _ran(calls, folder: str) -> list[int]:
    return sorted(c["seed"] for c in calls if str(Path(c["dir"]).parent).endswith(folder))


def test_plan_runs_each_rbp_setting_once_per_seed_and_each_level(full):
    out, calls, res, _ = full
    rbp = [c for c in calls if c["stages"] == "none"]
    ffcl = [c for c in calls if c["stages"] != "none"]
    # selection: 2 RBP settings (base, lr) x 3 seeds; FFCL: base + 3 levels x 3 seeds (the multi-class loss factor
    # does not apply to these binary datalists); confirmation: chosen (pairing) + base, both with the base's RBP
    assert len(rbp) == 2 * 3 + 2 * 3 and len(ffcl) == 4 * 3 + 2 * 2 * 3
    assert len({(c["dir"]) for c in calls}) == len(calls)  # nothing ran twice
    assert _ran(calls, "s/sel/rbp/base") == SEL_SEEDS
    assert _ran(calls, "s/sel/rbp/learning_rate=0.0001") == SEL_SEEDS
    assert _ran(calls, "s/confirm/sel/rbp/base") == CONF_SEEDS and _ran(calls, "s/confirm/conf/rbp/base") == CONF_SEEDS
    for level in ("base", "pairing=random_partner", "projection=mlp", "lr=1e-4"):
        assert _ran(calls, f"s/sel/{level}") == SEL_SEEDS
    assert not [c for c in calls if "loss=" in c["dir"]]
    for ds in ("sel", "conf"):
        assert _ran(calls, f"s/confirm/{ds}/chosen") == CONF_SEEDS and _ran(calls, f"s/confirm/{ds}/base") == CONF_SEEDS
    # the keys each run got: RBP only the rbp keys; the levels their own; dataset keys and common everywhere
    lr_rbp = next(c for c in rbp if "learning_rate=0.0001" in c["dir"])["overrides"]
    assert lr_rbp["learning_rate"] == 0.0001 and "local_lr" not in lr_rbp and "pair_mode" not in lr_rbp
    lr_ffcl = next(c for c in ffcl if "/lr=1e-4/" in c["dir"])["overrides"]
    assert lr_ffcl["local_lr"] == 0.0001 and lr_ffcl["learning_rate"] == 0.0001
    chosen = next(c for c in ffcl if "/confirm/conf/chosen/" in c["dir"])["overrides"]
    assert chosen["pair_mode"] == "random_partner" and "projection" not in chosen
    assert chosen["local_epochs"] == 1 and chosen["max_epochs"] == 2 and chosen["image_size"] == [16, 16]
    sel = next(c for c in ffcl if "/sel/base/" in c["dir"])["overrides"]
    assert (sel["local_epochs"], sel["global_epochs"], sel["max_epochs"], sel["label_fraction"]) == (1, 2, 3, 0.5)
    assert all(c["overrides"]["eval_splits"] == ["validation"] and c["overrides"]["saliency"] is False for c in calls)
    assert all(c["files"] == ["train.yaml", "ffcl.yaml"] for c in calls)
    # the level ablation reads the shared RBP runs: its folder has no RBP run of its own, its table has them
    assert not (out / "sel" / "pairing=random_partner" / "rbp-random").exists()
    assert "| RBP | – | random |" in (out / "sel" / "pairing=random_partner" / "table.md").read_text()


def test_selection_rule_picks_the_best_mean_lower_bound_and_keeps_the_base_on_ties(full, data):
    from ffcl_monai.study import choose_levels

    out, _, res, _ = full
    chosen = json.loads((out / "chosen.json").read_text())
    assert {f: c["chosen"] for f, c in chosen["factors"].items()} == {
        "pairing": "random_partner", "projection": "base", "lr": "base", "loss": "base"}
    assert chosen["keys"] == {"pair_mode": "random_partner"}
    # the scores are the table's pooled CI lower bounds (one selection dataset: the mean is that value)
    with open(out / "sel" / "table.csv", newline="") as f:
        lows = {(r["factor"], r["level"]): float(r["delta_auc_ci_low"]) for r in csv.DictReader(f)}
    assert chosen["factors"]["pairing"]["scores"] == pytest.approx(
        {"base": lows[("base", "base")], "random_partner": lows[("pairing", "random_partner")]})
    assert chosen["factors"]["lr"]["scores"]["1e-4"] == pytest.approx(lows[("lr", "1e-4")])
    spec = _spec(_raw_spec(data))
    # by hand: averaged over the datasets each factor ran on; NaN never wins; a tie keeps the base
    bounds = {"a": {"base": -0.02, "pairing=random_partner": 0.01, "projection=mlp": -0.02, "lr=1e-4": math.nan},
              "b": {"base": 0.00, "pairing=random_partner": -0.005, "projection=mlp": 0.00, "lr=1e-4": 0.5}}
    pick = choose_levels(spec, bounds)
    assert pick["pairing"]["chosen"] == "random_partner"
    assert pick["pairing"]["scores"]["random_partner"] == pytest.approx(0.0025)
    assert pick["pairing"]["scores"]["base"] == pytest.approx(-0.01)
    assert pick["projection"]["chosen"] == "base"  # equal means: the base stays
    assert pick["lr"]["chosen"] == "base" and math.isnan(pick["lr"]["scores"]["1e-4"])
    assert pick["loss"]["chosen"] == "base" and pick["loss"]["datasets"] == []


# ------------------------------------------------------------------------------------------------ tables, summary
def _preds(folder: Path, variant: str, seeds) -> dict:
    return {s: read_predictions(folder / (variant if s == 0 else f"{variant}-seed{s}") / "evaluate_validation"
                                / "predictions.csv", "binary") for s in seeds}


def _by_hand(ffcl_dir: Path, rbp_dir: Path, seeds) -> tuple[object, list, list]:
    f, r = _preds(ffcl_dir, "ffcl-lg-random", seeds), _preds(rbp_dir, "rbp-random", seeds)
    y = r[seeds[0]].labels
    ref = compare_seeds({s: f[s].probs for s in seeds}, {s: r[s].probs for s in seeds}, y, "binary",
                        n_bootstrap=BOOT, metrics=("auc", "accuracy"))
    auc = lambda d, v, s: json.loads((d / (v if s == 0 else f"{v}-seed{s}") / "evaluate_validation"
                                      / "metrics.json").read_text())["metrics"]["auc"]["value"]
    return ref["pooled"]["auc"], [auc(ffcl_dir, "ffcl-lg-random", s) for s in seeds], [
        auc(rbp_dir, "rbp-random", s) for s in seeds]


def _verdict(lo: float) -> str:
    return "better" if lo > 0 else ("not worse" if lo > -0.01 else "worse")


def test_selection_table_holds_what_paired_computes_from_the_predictions(full):
    out, _, _, _ = full
    with open(out / "sel" / "table.csv", newline="") as f:
        rows = {(r["factor"], r["level"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("base", "base"), ("pairing", "random_partner"), ("projection", "mlp"), ("lr", "1e-4")}
    md = (out / "sel" / "table.md").read_text()
    for (factor, level), rbp in ((("pairing", "random_partner"), "base"), (("lr", "1e-4"), "learning_rate=0.0001"),
                                 (("base", "base"), "base")):
        folder = out / "sel" / ("base" if factor == "base" else f"{factor}={level}")
        pooled, ffcl_auc, rbp_auc = _by_hand(folder, out / "sel" / "rbp" / rbp, SEL_SEEDS)
        row = rows[(factor, level)]
        assert float(row["delta_auc"]) == pytest.approx(pooled.mean, abs=1e-12)
        assert float(row["delta_auc_ci_low"]) == pytest.approx(pooled.ci_low, abs=1e-12)
        assert float(row["delta_auc_ci_high"]) == pytest.approx(pooled.ci_high, abs=1e-12)
        assert float(row["ffcl_auc_mean"]) == pytest.approx(np.mean(ffcl_auc))
        assert float(row["ffcl_auc_std"]) == pytest.approx(np.std(ffcl_auc, ddof=1))
        assert float(row["rbp_auc_mean"]) == pytest.approx(np.mean(rbp_auc))
        assert row["verdict"] == _verdict(pooled.ci_low) and row["rbp_runs"] == f"rbp/{rbp}"
        assert f"{100 * pooled.mean:+.2f} [{100 * pooled.ci_low:+.2f}, {100 * pooled.ci_high:+.2f}] | " \
               f"{_verdict(pooled.ci_low)} |" in md
        assert float(row["ffcl_wall_s"]) == pytest.approx(2.0 * 3)  # the stand-in's wall_s, summed over seeds
    assert rows[("pairing", "random_partner")]["verdict"] == "better"  # the stand-in's clear winner
    assert rows[("projection", "mlp")]["verdict"] == "worse"
    assert "interactions" not in md and "non-inferiority" in md
    assert (out / "sel" / "table.png").stat().st_size > 5_000
    assert "interactions are not tested" in (out / "chosen.md").read_text()


def test_confirmation_summary_and_acceptance_from_the_predictions(full):
    out, _, res, _ = full
    summary = json.loads((out / "confirm" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(res["summary"], default=str))
    assert summary["chosen_keys"] == {"pair_mode": "random_partner"} and summary["confirm_seeds"] == CONF_SEEDS
    verdicts = {}
    for ds in ("sel", "conf"):
        for setting in ("chosen", "base"):
            pooled, _, rbp_auc = _by_hand(out / "confirm" / ds / setting, out / "confirm" / ds / "rbp" / "base",
                                          CONF_SEEDS)
            got = summary["datasets"][ds][setting]
            assert got["delta_auc"] == pytest.approx(pooled.mean, abs=1e-12)
            assert got["ci_low"] == pytest.approx(pooled.ci_low, abs=1e-12)
            assert got["ci_high"] == pytest.approx(pooled.ci_high, abs=1e-12)
            assert got["rbp_auc_mean"] == pytest.approx(np.mean(rbp_auc))
            assert got["verdict"] == _verdict(pooled.ci_low)
            verdicts[(ds, setting)] = got["verdict"]
    # the criterion by hand: not worse everywhere and better somewhere
    for setting in ("chosen", "base"):
        v = [verdicts[(ds, setting)] for ds in ("sel", "conf")]
        assert summary["acceptance"][setting]["accepted"] == ("worse" not in v and "better" in v)
    assert summary["accepted"] is True and verdicts[("conf", "base")] == "worse"
    md = (out / "confirm" / "summary.md").read_text()
    assert "**Accepted**" in md and "| conf | confirm | chosen |" in md and "| sel | select | base |" in md
    assert (out / "confirm" / "summary.png").stat().st_size > 5_000


def test_study_parent_run_has_the_pooled_deltas_and_nests_the_ablations(full):
    out, _, _, _ = full
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    state = json.loads((out / "state.json").read_text())
    run = client.get_run(state["parent_run_id"])
    m = run.data.metrics
    with open(out / "sel" / "table.csv", newline="") as f:
        rows = {(r["factor"], r["level"]): r for r in csv.DictReader(f)}
    assert m["select.sel.pairing.random_partner.delta_auc"] == pytest.approx(
        float(rows[("pairing", "random_partner")]["delta_auc"]))
    assert m["select.sel.lr.1e-4.delta_auc_ci_low"] == pytest.approx(float(rows[("lr", "1e-4")]["delta_auc_ci_low"]))
    assert m["select.sel.base.base.delta_auc_ci_high"] == pytest.approx(
        float(rows[("base", "base")]["delta_auc_ci_high"]))
    summary = json.loads((out / "confirm" / "summary.json").read_text())
    assert m["confirm.conf.chosen.delta_auc"] == pytest.approx(summary["datasets"]["conf"]["chosen"]["delta_auc"])
    assert m["confirm.accepted"] == 1.0
    assert run.data.params["chosen.pairing"] == "random_partner" and run.data.params["chosen.projection"] == "base"
    assert run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"table.md", "chosen.md", "summary.md", "summary.png"} <= arts
    # every ablation's parent run is a child of the study run
    abl = json.loads((out / "sel" / "pairing=random_partner" / "state.json").read_text())
    assert client.get_run(abl["parent_run_id"]).data.tags["mlflow.parentRunId"] == run.info.run_id


# ------------------------------------------------------------------------------------------------ resume, estimate
def test_rerun_runs_nothing_and_a_changed_spec_is_refused(full, data, monkeypatch):
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import StudySpecError, run_study

    out, _, res, _ = full
    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    _skip_run_plots(monkeypatch)
    lines: list = []
    again = run_study(_spec(_raw_spec(data)), out, say=lines.append, measure=_no_measure)
    assert calls == [] and again["new_runs"] == 0 and not again["stopped"]
    # every run is done now; before selection the confirmation was counted as an upper bound (chosen and base with
    # their own RBP runs: 2 x 2 x 3 per dataset), now as planned (the chosen setting shares the base's RBP)
    assert again["estimate"].todo == 0 and again["estimate"].done == again["estimate"].runs == 36
    assert res["estimate"].runs == 18 + 2 * 12 and res["estimate"].done == 0
    assert again["summary"]["datasets"] == json.loads(json.dumps(res["summary"]["datasets"], default=str))
    raw = _raw_spec(data)
    raw["factors"]["pairing"]["levels"]["random_partner"]["set"]["pair_mode"] = "all_pairs"
    raw["seeds"]["confirm"] = [3, 4, 6]
    with pytest.raises(StudySpecError) as e:
        run_study(_spec(raw), out, say=lines.append, measure=_no_measure)
    assert "factors.random_partner" not in str(e.value)
    assert "factors.pairing.levels.random_partner.set.pair_mode: 'random_partner' -> 'all_pairs'" in str(e.value)
    assert "seeds.confirm: [3, 4, 5] -> [3, 4, 6]" in str(e.value)
    assert calls == []


def _small(data) -> dict:
    raw = _raw_spec(data)
    raw["seeds"] = {"select": [0, 1], "confirm": [2]}
    raw["factors"] = {"pairing": raw["factors"]["pairing"]}
    return raw


def test_max_runs_stops_cleanly_and_the_next_invocation_continues(store, data, tmp_path, monkeypatch):
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import run_study

    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    _skip_run_plots(monkeypatch)
    out = tmp_path / "s"
    spec = _spec(_small(data))
    lines: list = []
    first = run_study(spec, out, phase="select", max_runs=3, say=lines.append, measure=_no_measure)
    # RBP base (2 seeds), then the base setting's FFCL seed 0: 3 runs, then a clean stop
    assert first["stopped"] and first["new_runs"] == 3 and len(calls) == 3
    assert [Path(c["dir"]).name for c in calls] == ["rbp-random", "rbp-random-seed1", "ffcl-lg-random"]
    assert any("stopped after 3 new run(s)" in x for x in lines)
    assert first["estimate"].todo == 6 and first["estimate"].done == 0
    md = (out / "sel" / "table.md").read_text()
    assert "incomplete (1/2 seeds)" in md and "not run yet" in md  # the tables show what is done
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "FINISHED" and "select/sel/rbp/base" in state["done"]
    second = run_study(spec, out, phase="select", max_runs=2, say=lines.append, measure=_no_measure)
    assert second["new_runs"] == 2 and len(calls) == 5 and second["estimate"].done == 3
    third = run_study(spec, out, phase="select", say=lines.append, measure=_no_measure)
    assert third["new_runs"] == 1 and len(calls) == 6 and not third["stopped"]
    assert len({c["dir"] for c in calls}) == 6 and third["chosen"]["pairing"]["chosen"] == "random_partner"
    assert "incomplete" not in (out / "sel" / "table.md").read_text()
    # the confirmation needs the finished selection: here it is; --datasets limits an invocation
    fourth = run_study(spec, out, phase="confirm", datasets=["conf"], say=lines.append, measure=_no_measure)
    assert fourth["summary"]["acceptance"]["chosen"]["pending"] == ["sel"]
    assert "Not decided yet" in (out / "confirm" / "summary.md").read_text()
    assert {str(Path(c["dir"]).parent.relative_to(out)) for c in calls[6:]} == {
        "confirm/conf/rbp/base", "confirm/conf/chosen", "confirm/conf/base"}


def test_a_chosen_learning_rate_is_also_compared_with_plain_training_at_its_defaults(store, data, tmp_path,
                                                                                    monkeypatch):
    """A lower learning rate that hurts RBP (0.6 -> 0.1) more than FFCL (0.5 -> 0.35) wins the fair comparison (both
    arms at 1e-4) and is chosen; the summary then also compares the chosen FFCL with RBP at the base's keys, what a
    user who keeps plain training at its defaults sees: worse here, computed from the same predictions by hand."""
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import run_study

    def strength(o: dict) -> float:
        low = float(o.get("learning_rate", 1e-3)) < 1e-3
        if o["stages"] == "none":
            return 0.1 if low else 0.6
        return 0.35 if low else 0.5

    monkeypatch.setitem(globals(), "_strength", strength)
    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    _skip_run_plots(monkeypatch)
    raw = _raw_spec(data)
    raw["factors"] = {"lr": raw["factors"]["lr"]}
    out = tmp_path / "s"
    res = run_study(_spec(raw), out, say=lambda x: None, measure=_no_measure)
    assert res["chosen"]["lr"]["chosen"] == "1e-4"
    summary = json.loads((out / "confirm" / "summary.json").read_text())
    plain = summary["against_plain_defaults"]
    assert set(plain) == {"sel", "conf"}
    for ds in ("sel", "conf"):
        fair, _, _ = _by_hand(out / "confirm" / ds / "chosen", out / "confirm" / ds / "rbp" / "learning_rate=0.0001",
                              CONF_SEEDS)
        assert summary["datasets"][ds]["chosen"]["delta_auc"] == pytest.approx(fair.mean, abs=1e-12)
        pooled, _, _ = _by_hand(out / "confirm" / ds / "chosen", out / "confirm" / ds / "rbp" / "base", CONF_SEEDS)
        assert plain[ds]["delta_auc"] == pytest.approx(pooled.mean, abs=1e-12)
        assert plain[ds]["ci_low"] == pytest.approx(pooled.ci_low, abs=1e-12)
        assert plain[ds]["ci_high"] == pytest.approx(pooled.ci_high, abs=1e-12)
        assert plain[ds]["verdict"] == _verdict(pooled.ci_low) and pooled.mean < 0 < fair.mean
    md = (out / "confirm" / "summary.md").read_text()
    assert "Against plain training at its own defaults" in md and "| conf | " in md.split("own defaults")[1]


def test_confirm_before_selection_is_refused(store, data, tmp_path, monkeypatch):
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import StudySpecError, run_study

    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    _skip_run_plots(monkeypatch)
    with pytest.raises(StudySpecError, match=r"needs the finished selection: 6 selection run\(s\) left"):
        run_study(_spec(_small(data)), tmp_path / "s", phase="confirm", say=lambda x: None, measure=_no_measure)
    assert calls == [] and not (tmp_path / "s").exists()  # refused before the folder is claimed
    # --phase all with a dataset filter that leaves a selection dataset out: selects what it may, then says why
    # the confirmation waits (no error)
    raw = _small(data)
    raw["datasets"]["sel2"] = {**raw["datasets"]["sel"], "datalist": str(data["conf"])}
    lines: list = []
    res = run_study(_spec(raw), tmp_path / "t", datasets=["sel"], say=lines.append, measure=_no_measure)
    assert res["chosen"] is None and res["summary"] is None and len(calls) == 6
    assert any("the confirmation waits for the selection: 6 selection run(s) left" in x for x in lines)


def test_estimate_arithmetic_from_the_spec_and_from_completed_runs(store, data, tmp_path, monkeypatch):
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import _header_info, estimate, run_study, run_units

    spec = _spec(_small(data))
    infos = {d: _header_info(ds) for d, ds in spec.datasets.items()}
    # by hand, "sel": 10 training images at label_fraction 0.5 -> 5; 40 validation images; epochs 1 + 2 + 3;
    # validation after each of the 3 fine-tuning epochs and one evaluation: 4 x 40 forward passes at 1/3
    ffcl_units = 5 * (1 + 2 + 3) + 4 * 40 / 3
    rbp_units = 5 * 3 + 4 * 40 / 3
    assert run_units("ffcl-lg-random", {**spec.common, **spec.datasets["sel"].keys()}, infos["sel"]) == (
        pytest.approx(ffcl_units), 4)
    assert run_units("rbp-random", {**spec.common, **spec.datasets["sel"].keys()}, infos["sel"]) == (
        pytest.approx(rbp_units), 2)
    # selection: base + pairing FFCL (2 seeds each), RBP base (2 seeds); 100 img/s + 5 s per bundle step
    sel = 4 * (ffcl_units / 100 + 4 * 5) + 2 * (rbp_units / 100 + 2 * 5)
    # confirmation (upper bound before selection): "conf" 12 training images, 36 validation, epochs 1 + 1 + 2, 50
    # img/s, 1 seed; chosen and base, each with an RBP run; and "sel" at its own numbers, 1 seed
    c_ffcl, c_rbp = 12 * 4 + 3 * 36 / 3, 12 * 2 + 3 * 36 / 3
    conf = 2 * (c_ffcl / 50 + 20) + 2 * (c_rbp / 50 + 10) + 2 * (ffcl_units / 100 + 20) + 2 * (rbp_units / 100 + 10)
    est = estimate(spec, tmp_path / "s", ["select", "confirm"], ["sel", "conf"], None, infos, _no_measure)
    assert est.runs == 6 + 8 and est.todo == 14 and est.seconds == pytest.approx(sel + conf)
    text = est.text()
    assert "select: 6 runs (4 FFCL, 2 RBP), 0 done, 6 to do" in text and "upper bound" in text
    assert f"({round(sel + conf)} s)" in text and "100.0 img/s (spec img_per_s) + 5 s per bundle step" in text
    # after 3 completed runs (the stand-in reports 2.0 s each): img/s = their units / their seconds, no overhead
    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    _skip_run_plots(monkeypatch)
    run_study(spec, tmp_path / "s", phase="select", max_runs=3, say=lambda x: None, measure=_no_measure)
    est = estimate(spec, tmp_path / "s", ["select"], ["sel"], None, infos, _no_measure)
    rate = (2 * rbp_units + ffcl_units) / (3 * 2.0)
    assert est.calibration["sel"]["img_per_s"] == pytest.approx(rate) and est.calibration["sel"]["overhead_s"] == 0
    assert est.done == 3 and est.seconds == pytest.approx(3 * ffcl_units / rate)
    assert "3 completed run(s) of this study" in est.text()


def test_calibration_measures_when_neither_runs_nor_the_spec_say(data, tmp_path):
    from ffcl_monai.study import _header_info, calibrate, measure_img_per_s

    raw = _small(data)
    del raw["datasets"]["sel"]["img_per_s"]
    raw["datasets"]["sel"]["set"]["batch_size"] = 4
    spec = _spec(raw)
    seen = []
    cal = calibrate(spec, "sel", _header_info(spec.datasets["sel"]), [],
                    lambda *a: seen.append(a) or 123.0)
    assert seen == [("resnet10", 2, [16, 16], 4, 2)] and cal["img_per_s"] == 123.0 and cal["overhead_s"] == 5
    assert "measured now" in cal["source"]
    rate = measure_img_per_s("resnet10", 2, [16, 16], batch_size=4, iterations=1)  # the real thing, tiny
    assert math.isfinite(rate) and rate > 0


def test_command_line_estimate_prints_and_runs_nothing(data, tmp_path, capsys, monkeypatch):
    import ffcl_monai.workflows.ffcl as ffcl
    from ffcl_monai.study import main

    calls: list = []
    monkeypatch.setattr(ffcl, "run_ffcl", _fake_pipeline(calls))
    _skip_run_plots(monkeypatch)
    raw = _small(data)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    other = _tiny_datalist(tmp_path / "other", n_per_split=(20, 30, 0))
    assert main(["--spec", str(spec_file), "--output-dir", str(tmp_path / "o"), "--estimate",
                 "--datalist", f"conf={other}"]) == 0
    text = capsys.readouterr().out
    assert "select: 6 runs (4 FFCL, 2 RBP), 0 done, 6 to do" in text and "Estimated wall time" in text
    assert calls == [] and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        main(["--spec", str(spec_file), "--output-dir", str(tmp_path / "o"), "--datalist", "nope=x.json"])
    assert e.value.code == 2 and "has no dataset 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ for real
@pytest.mark.slow
def test_real_one_factor_two_level_study_tiny(tmp_path, monkeypatch):
    """The real FFCL program, 16 px, one epoch per stage: a 1-factor study (base + one level) selects and confirms;
    the numbers come from the predictions files; a rerun trains nothing."""
    from ffcl_monai.study import parse_spec, run_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sel = _tiny_datalist(tmp_path / "sel", n_per_split=(8, 8, 0))
    conf = _tiny_datalist(tmp_path / "conf", n_per_split=(8, 6, 0))
    raw = {"name": "real", "paired_bootstrap": 50, "step_overhead_s": 2,
           "seeds": {"select": [0, 1], "confirm": [2]},
           "common": {"eval_splits": ["validation"], "saliency": False, "monitor_interval": 0, "progress": False,
                      "batch_size": 4, "n_bootstrap": 10},
           "datasets": {"sel": {"role": "select", "datalist": str(sel), "backbone": "resnet10", "image_size": 16,
                                "epochs": {"local": 1, "global": 1, "finetune": 1}, "img_per_s": 50},
                        "conf": {"role": "confirm", "datalist": str(conf), "backbone": "resnet10", "image_size": 16,
                                 "epochs": {"local": 1, "global": 1, "finetune": 1}, "img_per_s": 50}},
           "base": {"set": {"averaging": "pairs"}},   # explicit: ffcl.yaml's default is balanced now
           "factors": {"averaging": {"levels": {"balanced": {"set": {"averaging": "balanced"}}}}}}
    out = tmp_path / "study"
    res = run_study(parse_spec(raw, "real"), out, say=lambda x: None)
    assert not res["stopped"] and res["summary"] is not None
    for level in ("base", "averaging=balanced"):
        assert (out / "sel" / level / "ffcl-lg-random-seed1" / "evaluate_validation" / "predictions.csv").is_file()
        resolved = json.loads((out / "sel" / level / "ffcl-lg-random" / "stage1_local" / "config_resolved.json")
                              .read_text())
        assert resolved["averaging"] == ("balanced" if "balanced" in level else "pairs")
    assert not (out / "sel" / "averaging=balanced" / "rbp-random").exists()  # RBP once, in sel/rbp/base
    with open(out / "sel" / "table.csv", newline="") as f:
        rows = {r["level"]: r for r in csv.DictReader(f)}
    f = _preds(out / "sel" / "averaging=balanced", "ffcl-lg-random", [0, 1])
    r = _preds(out / "sel" / "rbp" / "base", "rbp-random", [0, 1])
    ref = compare_seeds({s: f[s].probs for s in (0, 1)}, {s: r[s].probs for s in (0, 1)}, r[0].labels, "binary",
                        n_bootstrap=50)["pooled"]["auc"]
    assert float(rows["balanced"]["delta_auc"]) == pytest.approx(ref.mean, abs=1e-12)
    if math.isfinite(ref.ci_low):
        assert float(rows["balanced"]["delta_auc_ci_low"]) == pytest.approx(ref.ci_low, abs=1e-12)
    summary = json.loads((out / "confirm" / "summary.json").read_text())
    assert set(summary["datasets"]) == {"sel", "conf"} and summary["accepted"] in (True, False)
    chosen = summary["chosen_levels"]["averaging"]
    assert (out / "confirm" / "conf" / ("chosen" if chosen != "base" else "base") / "ffcl-lg-random-seed2").is_dir()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    state = json.loads((out / "state.json").read_text())
    assert "select.sel.averaging.balanced.delta_auc" in client.get_run(state["parent_run_id"]).data.metrics
    mtime = (out / "sel" / "base" / "ffcl-lg-random" / "finetune" / "models" / "model.pt").stat().st_mtime_ns
    again = run_study(parse_spec(raw, "real"), out, say=lambda x: None)
    assert again["new_runs"] == 0
    assert (out / "sel" / "base" / "ffcl-lg-random" / "finetune" / "models" / "model.pt").stat().st_mtime_ns == mtime
