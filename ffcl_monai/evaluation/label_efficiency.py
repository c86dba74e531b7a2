"""Label-efficiency curve of a pretrained backbone against random initialisation, in one command.

    python -m ffcl_monai.evaluation --pretrained_ckpt runs/simclr/backbone.pt --datalist d.json --output_dir runs/curve \
        [--fractions 0.01,0.1,1.0] [--modes probe,finetune] [--inits random,pretrained] [--overlays 3d.yaml] \
        [--epochs 0.01:40,0.1:20,1.0:10] [--probe_lr 0.01] [--finetune_lr 0.001] [--<any bundle key> value ...]

Every cell of fractions x {random, pretrained} x {probe, fine-tune} is one run of the bundle's own classification
workflow (``common.yaml`` + ``train.yaml`` + overlays, through MONAI's ``ConfigWorkflow``) with
``label_fraction`` (stratified, seeded subset of the training labels), ``pretrained_ckpt`` (pretrained cells) and
``freeze_backbone`` (probe cells: frozen backbone and BatchNorm statistics, trained linear head). No second
classification pipeline exists here. Model selection and the reported AUC use the validation split only.

Outputs in ``output_dir``: ``label_efficiency.csv``, ``label_efficiency.md`` (table: epochs, wall time, best
validation AUC per cell), ``label_efficiency.png`` (AUC vs label fraction), one sub-folder per cell, and one MLflow
parent run (``label_efficiency:<name>``) whose child runs are the cells' training runs, all in one store.

The checkpoint is checked before any training: it is loaded into the configured classifier, missing and unexpected
keys are printed, and a backbone that does not match (architecture, spatial dims, channels, shapes) stops the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

MODES = ("probe", "finetune")
INITS = ("random", "pretrained")


def _configs_dir() -> Path:
    import ffcl_monai

    return Path(ffcl_monai.bundle_root()) / "configs"


def _parse_value(text: str) -> Any:
    """CLI override values: YAML literals (numbers, lists, true/false, null), else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_epochs(spec: str | None, fractions: Sequence[float], default: int) -> dict[float, int]:
    """``"0.01:40,0.1:20,1.0:10"`` -> {0.01: 40, ...}; fractions not listed get ``default``."""
    out = {f: default for f in fractions}
    for part in (spec or "").split(","):
        if part.strip():
            f, e = part.split(":")
            out[float(f)] = int(e)
    return out


def check_checkpoint(ckpt: str, config_files: Sequence[str], overrides: dict[str, Any]) -> dict[str, list]:
    """Load ``ckpt`` into the classifier the configs build; print missing/unexpected keys; raise on a mismatch."""
    from monai.bundle import ConfigParser

    from ffcl_monai.networks.checkpoints import load_backbone

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update({k: v for k, v in overrides.items()})
    net = parser.get_parsed_content("network_def")
    report = load_backbone(net, ckpt)
    print(f"checkpoint {ckpt}: {len(report['missing'])} missing keys {report['missing'][:5]}, "
          f"{len(report['unexpected'])} unexpected keys {report['unexpected'][:5]}", flush=True)
    return report


def _best_from_history(out_dir: Path) -> tuple[float, int, int]:
    """(best val AUC, its epoch, epochs run) from the train workflow's history.jsonl."""
    path = out_dir / "history.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    scored = [(r["val_auc"], r["epoch"]) for r in rows if isinstance(r.get("val_auc"), (int, float))]
    if not scored:
        return float("nan"), -1, len(rows)
    auc, epoch = max(scored, key=lambda t: (t[0], -t[1]))
    return float(auc), int(epoch), len(rows)


def run_cell(
    config_files: Sequence[str], overrides: dict[str, Any], out_dir: Path
) -> dict[str, Any]:
    """One training run of the bundle's classification workflow; returns its best validation AUC and timing."""
    from monai.bundle import ConfigWorkflow
    from monai.data import set_track_meta

    set_track_meta(True)  # a pretraining workflow in the same process may have switched it off
    cfg_dir = _configs_dir()
    t0 = time.perf_counter()
    wf = ConfigWorkflow(
        workflow_type="train",
        config_file=[str(f) for f in config_files],
        meta_file=str(cfg_dir / "metadata.json"),
        logging_file=str(cfg_dir / "logging.conf"),
        **{**overrides, "output_dir": str(out_dir)},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    wall = time.perf_counter() - t0
    auc, best_epoch, epochs = _best_from_history(out_dir)
    return {"val_auc": auc, "best_epoch": best_epoch, "epochs": epochs, "wall_s": wall}


def collect_cells(out_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This call's rows plus every other finished cell (``<cell>/cell_result.json``) in ``out_dir``."""
    seen = {(r["label_fraction"], r["init"], r["mode"]) for r in rows}
    extra = []
    for path in sorted(out_dir.glob("f*_*_*/cell_result.json")):
        r = json.loads(path.read_text())
        frac, init, mode = path.parent.name[1:].split("_")
        r = {"n_train": "", **r, "label_fraction": float(frac), "init": init, "mode": mode}
        if (r["label_fraction"], init, mode) not in seen:
            extra.append(r)
    order = {m: i for i, m in enumerate(INITS + MODES)}
    return sorted(rows + extra, key=lambda r: (r["label_fraction"], order[r["mode"]], order[r["init"]]))


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """CSV, markdown table (AUC per fraction x init x mode) and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["label_fraction", "n_train", "init", "mode", "epochs", "best_epoch", "val_auc", "wall_s"]
    csv_path = out_dir / "label_efficiency.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", "", "| label fraction | train images | init | mode | epochs | best epoch | val AUC | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label_fraction']} | {r.get('n_train', '')} | {r['init']} | {r['mode']} | {r['epochs']} | "
                     f"{r['best_epoch']} | {r['val_auc']:.4f} | {r['wall_s']:.0f} |")
    gains = []
    for frac in sorted({r["label_fraction"] for r in rows}):
        for mode in MODES:
            cell = {r["init"]: r["val_auc"] for r in rows if r["label_fraction"] == frac and r["mode"] == mode}
            if "random" in cell and "pretrained" in cell:
                gains.append(f"| {frac} | {mode} | {cell['pretrained'] - cell['random']:+.4f} |")
    if gains:
        lines += ["", "Pretrained minus random (validation AUC):", "", "| label fraction | mode | delta AUC |",
                  "|---|---|---|", *gains]
    md_path = out_dir / "label_efficiency.md"
    md_path.write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init in INITS:
        for mode in MODES:
            pts = sorted((r["label_fraction"], r["val_auc"]) for r in rows if r["init"] == init and r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="-" if init == "pretrained" else "--", label=f"{init} / {mode}")
    ax.set_xscale("log")
    ax.set_xlabel("label fraction")
    ax.set_ylabel("best validation AUC")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png_path = out_dir / "label_efficiency.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return [csv_path, md_path, png_path]


def run_curve(
    pretrained_ckpt: str,
    datalist: str,
    output_dir: str,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    modes: Sequence[str] = MODES,
    inits: Sequence[str] = INITS,
    overlays: Sequence[str] = (),
    epochs: dict[float, int] | None = None,
    probe_lr: float = 0.01,
    finetune_lr: float = 0.001,
    overrides: dict[str, Any] | None = None,
    reuse_existing: bool = False,
) -> list[dict[str, Any]]:
    """Run every cell, write the table/plot, log a parent MLflow run with one child run per cell.

    ``reuse_existing``: a cell whose folder holds ``cell_result.json`` from an earlier call is not trained again (its
    child run stays under the earlier parent run); lets random-init cells run while pretraining is still going.
    """
    from ffcl_monai.data.datalist import load_datalist
    from ffcl_monai.handlers.mlflow_tracking import experiment_id, tracking_uri

    bad = [m for m in modes if m not in MODES] + [i for i in inits if i not in INITS]
    if bad:
        raise ValueError(f"unknown mode/init {bad}; modes are {MODES}, inits are {INITS}.")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg_dir = _configs_dir()
    files = [cfg_dir / "common.yaml", cfg_dir / "train.yaml", *[cfg_dir / o if not os.path.isabs(o) else Path(o) for o in overlays]]
    base = {"datalist": str(Path(datalist).resolve()), **(overrides or {})}
    ckpt = str(Path(pretrained_ckpt).resolve())
    if "pretrained" in inits:
        check_checkpoint(ckpt, files, base)  # fail before hours of training
    uri = tracking_uri(out)
    experiment = str(base.get("experiment_name", "ffcl_monai"))
    name = f"label_efficiency:{out.name}"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)  # artifacts next to the store, never in <cwd>/mlruns
    parent = client.create_run(exp_id, run_name=name, tags={"pretrained_ckpt": ckpt})
    parent_id = parent.info.run_id
    client.log_param(parent_id, "pretrained_ckpt", ckpt)
    client.log_param(parent_id, "fractions", ",".join(map(str, fractions)))
    seed = int(base.get("seed", 0))
    rows: list[dict[str, Any]] = []
    epochs = epochs or {}
    status = "FAILED"
    try:
        for frac in fractions:
            n_train = len(load_datalist(base["datalist"], "training", label_fraction=frac, seed=seed,
                                        num_classes=base.get("num_classes"), task=base.get("task", "binary")))
            for init in inits:
                for mode in modes:
                    cell = f"f{frac:g}_{init}_{mode}"
                    cell_over = {
                        **base,
                        "label_fraction": frac,
                        "pretrained_ckpt": ckpt if init == "pretrained" else None,
                        "freeze_backbone": mode == "probe",
                        "learning_rate": probe_lr if mode == "probe" else finetune_lr,
                        "tracking_uri": uri,
                        "mlflow_parent_run_id": parent_id,
                        "run_name": f"{cell}",
                        "log_model": base.get("log_model", False),  # a curve's cells are measurements, not models to serve
                    }
                    if frac in epochs:
                        cell_over["max_epochs"] = epochs[frac]
                    done = out / cell / "cell_result.json"
                    if reuse_existing and done.is_file():
                        res = json.loads(done.read_text())  # finished earlier (e.g. random cells run in advance)
                        print(f"=== {cell}: reusing {done} ===", flush=True)
                    else:
                        print(f"=== {cell}: {n_train} labelled training images ===", flush=True)
                        res = run_cell(files, cell_over, out / cell)
                    row = {**res, "label_fraction": frac, "n_train": n_train, "init": init, "mode": mode}
                    done.write_text(json.dumps(row))
                    rows.append(row)
                    print(f"=== {cell}: best val AUC {res['val_auc']:.4f} at epoch {res['best_epoch']}/{res['epochs']}, "
                          f"{res['wall_s']:.0f} s ===", flush=True)
                    client.log_metric(parent_id, f"val_auc_{cell}".replace(".", "p"), res["val_auc"])
                    write_outputs(rows, out, name)  # partial results survive an interruption
        status = "FINISHED"
    finally:
        if reuse_existing:  # the table covers every finished cell in output_dir, from this call or earlier ones
            rows = collect_cells(out, rows)
        for path in write_outputs(rows, out, name) if rows else []:
            try:
                client.log_artifact(parent_id, str(path))
            except Exception as e:  # the files stay in output_dir
                logger.warning("MLflow artifact upload failed: %s", e)
        client.set_terminated(parent_id, status)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffcl_monai.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_ckpt", required=True, help="backbone checkpoint (backbone.pt of a pretraining run)")
    parser.add_argument("--datalist", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--fractions", default="0.01,0.1,1.0", help="label fractions, comma-separated")
    parser.add_argument("--modes", default="probe,finetune")
    parser.add_argument("--inits", default="random,pretrained")
    parser.add_argument("--overlays", default="", help="overlay configs after train.yaml, e.g. 3d.yaml")
    parser.add_argument("--epochs", default="", help="epochs per fraction, e.g. 0.01:40,0.1:20,1.0:10 (else max_epochs)")
    parser.add_argument("--probe_lr", type=float, default=0.01)
    parser.add_argument("--finetune_lr", type=float, default=0.001)
    parser.add_argument("--reuse_existing", action="store_true", help="keep cells already finished in output_dir")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):  # any other --key value pair is a bundle override, as with `python -m monai.bundle run`
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            parser.error(f"unexpected argument {rest[i]!r}; bundle overrides are --key value pairs")
        overrides[rest[i][2:]] = _parse_value(rest[i + 1])
        i += 2
    fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    default_epochs = int(overrides.get("max_epochs", 20))
    rows = run_curve(
        args.pretrained_ckpt, args.datalist, args.output_dir, fractions,
        [m for m in args.modes.split(",") if m], [x for x in args.inits.split(",") if x],
        [o for o in args.overlays.split(",") if o], parse_epochs(args.epochs, fractions, default_epochs),
        args.probe_lr, args.finetune_lr, overrides, args.reuse_existing,
    )
    print(Path(args.output_dir, "label_efficiency.md").read_text())
    return 0 if rows and all(math.isfinite(r["val_auc"]) for r in rows) else 1
