"""Label-efficiency curve of a pretrained backbone against random initialisation, in one command.

    python -m ffcl_monai.evaluation --pretrained_ckpt runs/simclr/backbone.pt --datalist d.json --output_dir runs/curve \
        [--fractions 0.01,0.1,1.0] [--modes probe,finetune] [--inits random,pretrained] [--overlays 3d.yaml] \
        [--epochs 0.01:40,0.1:20,1.0:10] [--probe_lr 0.01] [--finetune_lr 0.001] [--<any bundle key> value ...]

Every cell of fractions x {random, pretrained} x {probe, fine-tune} is one run of the bundle's own classification
workflow (``train.yaml`` + overlays, through :func:`ffcl_monai.workflows.runner.run`) with
``label_fraction`` (stratified, seeded subset of the training labels), ``pretrained_ckpt`` (pretrained cells) and
``freeze_backbone`` (probe cells: frozen backbone and BatchNorm statistics, trained linear head). No second
classification pipeline exists here. Model selection and the reported AUC use the validation split only.

Outputs in ``output_dir``: ``label_efficiency.csv``, ``label_efficiency.md`` (table: epochs, wall time, best
validation AUC per cell), ``label_efficiency.png`` (AUC vs label fraction), one sub-folder per cell, and one MLflow
parent run (``label_efficiency:<name>``) whose child runs are the cells' training runs, all in one store. The curve is an
:class:`~ffcl_monai.workflows.experiment.Experiment`: rerunning the command into the same folder skips finished cells
and resumes an interrupted one from its last epoch; a later call with more ``--inits`` or ``--fractions`` adds cells
(e.g. random-init cells run while the pretraining still goes). Extra ``--key value`` pairs are bundle overrides, read
as YAML (:func:`ffcl_monai.workflows.runner.parse_override`).

The checkpoint is checked before any training: it is loaded into the configured classifier, missing and unexpected
keys are printed, and a backbone that does not match (architecture, spatial dims, channels, shapes) stops the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

MODES = ("probe", "finetune")
INITS = ("random", "pretrained")


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
    from ffcl_monai.networks.checkpoints import load_backbone
    from ffcl_monai.workflows import runner

    net = runner.load(config_files, overrides).get_parsed_content("network_def")
    report = load_backbone(net, ckpt)
    logger.info("checkpoint %s: %d missing keys %s, %d unexpected keys %s", ckpt, len(report["missing"]),
                report["missing"][:5], len(report["unexpected"]), report["unexpected"][:5])
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


def run_cell(config_files: Sequence[str], overrides: dict[str, Any], n_train: int) -> dict[str, Any]:
    """One training run of the bundle's classification workflow; returns its best validation AUC and epochs."""
    from ffcl_monai.workflows import runner

    runner.run(config_files, overrides)
    auc, best_epoch, epochs = _best_from_history(Path(overrides["output_dir"]))
    return {"val_auc": auc, "best_epoch": best_epoch, "epochs": epochs, "n_train": n_train}


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
) -> list[dict[str, Any]]:
    """Run every cell (skipping those finished by an earlier call), write the table/plot, and log a parent MLflow run
    with one child run per cell. Returns one row per finished cell in ``output_dir``."""
    from ffcl_monai.data.datalist import load_datalist
    from ffcl_monai.workflows import runner
    from ffcl_monai.workflows.experiment import Experiment

    bad = [m for m in modes if m not in MODES] + [i for i in inits if i not in INITS]
    if bad:
        raise ValueError(f"unknown mode/init {bad}; modes are {MODES}, inits are {INITS}.")
    out = Path(output_dir).resolve()
    base = {"datalist": str(Path(datalist).resolve()), **(overrides or {})}
    files = runner.config_files(["train.yaml", *overlays], base["datalist"])
    ckpt = str(Path(pretrained_ckpt).resolve())
    if "pretrained" in inits:
        check_checkpoint(ckpt, files, base)  # fail before hours of training
    name = f"label_efficiency:{out.name}"
    seed = int(base.get("seed", 0))
    epochs = epochs or {}
    with Experiment(out, "label_efficiency", experiment_name=str(base.get("experiment_name", "ffcl_monai")),
                    run_name=name) as exp:
        exp.log_params({"pretrained_ckpt": ckpt, "fractions": ",".join(map(str, fractions))})
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
                        "log_model": base.get("log_model", False),  # a curve's cells are measurements, not models to serve
                        **exp.step_overrides(cell),
                    }
                    if frac in epochs:
                        cell_over["max_epochs"] = epochs[frac]
                    if not exp.done(cell):
                        logger.info("=== %s: %d labelled training images ===", cell, n_train)
                    res = exp.step(cell, run_cell, files, cell_over, n_train)
                    logger.info("=== %s: best val AUC %.4f at epoch %d/%d, %.0f s ===", cell, res["val_auc"],
                                res["best_epoch"], res["epochs"], exp.state["seconds"].get(cell, float("nan")))
                    exp.metrics[f"val_auc_{cell}".replace(".", "p")] = res["val_auc"]
                    write_outputs(_rows(exp), out, name)  # partial results survive an interruption
        rows = _rows(exp)
        exp.add_artifacts(write_outputs(rows, out, name) if rows else [])
    return rows


def _rows(exp: Any) -> list[dict[str, Any]]:
    """One row per finished cell of the experiment (this call's and earlier calls'), in table order."""
    rows = []
    for cell, res in exp.state["done"].items():
        frac, init, mode = cell[1:].split("_")
        rows.append({**res, "label_fraction": float(frac), "init": init, "mode": mode,
                     "wall_s": exp.state["seconds"].get(cell, float("nan"))})
    order = {m: i for i, m in enumerate(INITS + MODES)}
    return sorted(rows, key=lambda r: (r["label_fraction"], order[r["mode"]], order[r["init"]]))


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
    args, rest = parser.parse_known_args(argv)
    from ffcl_monai.workflows import runner

    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):  # any other --key value pair is a bundle override, as with `python -m monai.bundle run`
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            parser.error(f"unexpected argument {rest[i]!r}; bundle overrides are --key value pairs")
        overrides[rest[i][2:]] = runner.parse_override(rest[i + 1])
        i += 2
    fractions = [float(x) for x in args.fractions.split(",") if x.strip()]
    default_epochs = int(overrides.get("max_epochs", 20))
    rows = run_curve(
        args.pretrained_ckpt, args.datalist, args.output_dir, fractions,
        [m for m in args.modes.split(",") if m], [x for x in args.inits.split(",") if x],
        [o for o in args.overlays.split(",") if o], parse_epochs(args.epochs, fractions, default_epochs),
        args.probe_lr, args.finetune_lr, overrides,
    )
    print(Path(args.output_dir, "label_efficiency.md").read_text())
    return 0 if rows and all(math.isfinite(r["val_auc"]) for r in rows) else 1
