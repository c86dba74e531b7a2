"""The FFCL paper's Table 1 on any datalist, in one command (seed 000, Table 1: stage orders x initialisations).

    python -m ffcl_monai.ablate --datalist d.json --backbone resnet18 --image-size 32 \\
        --variants rbp-random,ffcl-lg-random,ffcl-gl-random,local-random,global-random[,rbp-imagenet,...] \\
        [--imagenet-weights resnet18.pth] [--output-dir runs/ablate] [--set key=value ...]

Each variant is ``<approach>-<init>``:
    approach: ``rbp`` (no pretraining, plain back-propagation), ``ffcl-lg`` (local -> global, FFCL),
              ``ffcl-gl`` (global -> local), ``local`` (local only), ``global`` (global only)
    init:     ``random`` or ``imagenet`` (needs ``--imagenet-weights``, a torchvision ResNet state-dict file)

Every variant is the FFCL program (:func:`ffcl_monai.workflows.ffcl.run_ffcl`, ``bundle/configs/ffcl.yaml``) in
``<output-dir>/<variant>``; all of them log to one MLflow store (``<output-dir>/mlruns.db``) under one parent run, and
the ablation is an :class:`~ffcl_monai.workflows.experiment.Experiment` (lock, ``state.json``, parent run, summary). The table is written as ``table.md`` (the paper's
layout, values in %, bootstrap 95% CIs) and ``table.csv``, with ``table.png`` (bars with CI whiskers), from the split
given by ``--split`` (default: ``test`` when the datalist has one, else ``validation``). Models are always selected
on validation; with ``--split validation`` the CIs describe the selection split itself and are optimistic.

Resume: rerun the same command. A finished variant is skipped (the ablation's ``state.json``); an interrupted one
continues inside its own pipeline (finished steps skipped, the interrupted step from its last epoch).

Overrides (``--set KEY=VALUE``) follow :func:`ffcl_monai.workflows.runner.parse_override` (values read as YAML).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

APPROACHES: dict[str, tuple[str, str, str]] = {
    # name: (stages key, Table 1 "Approach", Table 1 "Contrastive")
    "rbp": ("none", "RBP", "–"),
    "ffcl-lg": ("local,global", "FFCL", "Local→Global"),
    "ffcl-gl": ("global,local", "FFCL", "Global→Local"),
    "local": ("local", "FFCL", "Local only"),
    "global": ("global", "FFCL", "Global only"),
}
INITS = ("random", "imagenet")
METRICS = [("accuracy", "Accuracy"), ("f1", "F1"), ("precision", "Precision"), ("recall", "Recall"), ("auc", "AUC")]
DEFAULT_VARIANTS = "rbp-random,ffcl-lg-random,ffcl-gl-random,local-random,global-random"


def parse_variant(name: str) -> tuple[str, str]:
    """``"ffcl-lg-random"`` -> ``("ffcl-lg", "random")``."""
    for init in INITS:
        if name.endswith("-" + init):
            approach = name[: -len(init) - 1]
            if approach in APPROACHES:
                return approach, init
    raise ValueError(
        f"unknown variant {name!r}; use <approach>-<init> with approach in {list(APPROACHES)} and init in {list(INITS)}, "
        "e.g. ffcl-lg-random."
    )


def _header(datalist: str) -> dict[str, Any]:
    """The config keys the datalist header may set, typed and checked (:mod:`ffcl_monai.workflows.untrusted`).

    A shared datalist is outside input: a class name such as ``"$__import__('os')..."`` or a ``_target_`` dict is
    refused here, naming the key, instead of reaching the bundle config as an override.
    """
    from ffcl_monai.data.datalist import read_header
    from ffcl_monai.errors import UserInputError
    from ffcl_monai.workflows.untrusted import header_overrides

    try:
        return header_overrides(read_header(datalist), f"datalist {datalist} header")
    except UserInputError as e:
        raise SystemExit(f"error: {e}") from None


def _has_split(datalist: str, split: str) -> bool:
    items = json.loads(Path(datalist).read_text()).get(split)
    return isinstance(items, list) and len(items) > 0


def robust_binary_auc(metrics: dict[str, dict[str, float]], class_names: Sequence[str] | None) -> tuple[dict[str, dict[str, float]], bool]:
    """For a 2-class softmax, AUC(p_1, y=1) equals AUC(p_0, y=0) exactly; in float32 one column can saturate
    (every p_1 == 1.0 when the logit gap exceeds ~17, e.g. early in training), which ties all scores and reads as
    0.5. Take the per-class AUC farther from 0.5 (the column that kept its resolution). Returns (metrics, changed)."""
    if not class_names or len(class_names) != 2 or "auc" not in metrics:
        return metrics, False
    per = [metrics.get(f"auc_{c}") for c in class_names]
    if any(p is None for p in per):
        return metrics, False
    best = max(per, key=lambda m: abs(m["value"] - 0.5))
    if abs(best["value"] - metrics["auc"]["value"]) < 1e-9:
        return metrics, False
    return {**metrics, "auc": best}, True


def _fmt(m: dict[str, float]) -> str:
    return f"{100 * m['value']:.2f} [{100 * m['ci_low']:.2f}, {100 * m['ci_high']:.2f}]"


def write_table(rows: list[dict[str, Any]], out: Path, backbone: str, split: str, n: int | None) -> list[Path]:
    """``table.md`` (paper layout), ``table.csv`` and ``table.png`` from the finished variants."""
    md = [
        f"Table 1 layout, {backbone}, {split} split" + (f" (n={n})" if n else "") + ": value [bootstrap 95% CI], in %.",
        "",
        "| Backbone | Approach | Contrastive | Initialization | " + " | ".join(t for _, t in METRICS) + " | wall (s) |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for r in rows:
        cells = [_fmt(r["metrics"][k]) if k in r["metrics"] else "n/a" for k, _ in METRICS]
        star = "*" if r.get("auc_fixed") else ""
        md.append(f"| {backbone} | {r['approach']} | {r['contrastive']} | {r['init']} | " + " | ".join(cells)
                  + f"{star} | {r['wall_s']:.0f} |")
    if any(r.get("auc_fixed") for r in rows):
        md += ["", "\\* AUC from the other class's probability column: in float32 the reported column saturated to 1.0 "
               "(all scores tied); for two classes both AUCs are equal in exact arithmetic."]
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "backbone", "approach", "contrastive", "initialization", "split",
                    *[f"{k}{s}" for k, _ in METRICS for s in ("", "_ci_low", "_ci_high")], "wall_s"])
        for r in rows:
            vals = []
            for k, _ in METRICS:
                m = r["metrics"].get(k, {})
                vals += [m.get("value", ""), m.get("ci_low", ""), m.get("ci_high", "")]
            w.writerow([r["variant"], backbone, r["approach"], r["contrastive"], r["init"], split, *vals, f"{r['wall_s']:.1f}"])
    return [out / "table.md", out / "table.csv", plot_table(rows, out / "table.png", f"{backbone}, {split} split")]


def plot_table(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Grouped bars (one group per metric, one bar per variant) with bootstrap CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(METRICS))
    for i, r in enumerate(rows):
        vals = np.array([r["metrics"].get(k, {}).get("value", np.nan) for k, _ in METRICS]) * 100
        lo = np.array([r["metrics"].get(k, {}).get("ci_low", np.nan) for k, _ in METRICS]) * 100
        hi = np.array([r["metrics"].get(k, {}).get("ci_high", np.nan) for k, _ in METRICS]) * 100
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=r["variant"],
               yerr=np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)]), capsize=2)
    ax.set_xticks(x, [t for _, t in METRICS])
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ffcl_monai.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--output-dir", default="runs/ablate")
    p.add_argument("--image-size", type=int, default=None, help="square/cubic input size (default: the config's)")
    p.add_argument("--imagenet-weights", default=None, help="torchvision ResNet state-dict file for *-imagenet variants")
    p.add_argument("--split", default="auto", help="table split: auto (test if present, else validation) | validation | test")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--global-epochs", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=None, help="downstream fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. --set local_lr=0.0003 --set averaging=balanced")
    p.add_argument("--experiment-name", default="ffcl_ablation")
    args = p.parse_args(argv)

    from ffcl_monai.redaction import redact_uri
    from ffcl_monai.workflows import runner
    from ffcl_monai.workflows.experiment import Experiment
    from ffcl_monai.workflows.ffcl import run_ffcl

    datalist = str(Path(args.datalist).resolve())
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = [parse_variant(v) for v in variants]
    if any(init == "imagenet" for _, init in parsed):
        if not args.imagenet_weights or not os.path.isfile(args.imagenet_weights):
            p.error("*-imagenet variants need --imagenet-weights <torchvision ResNet state-dict file> (nothing is downloaded)")
    split = args.split
    if split == "auto":
        split = "test" if _has_split(datalist, "test") else "validation"
    if not _has_split(datalist, split):
        p.error(f"the datalist has no '{split}' split to tabulate")
    header = _header(datalist)
    dims = 3 if header.get("spatial_dims", 2) == 3 else 2
    out = Path(args.output_dir).resolve()
    overrides: dict[str, Any] = {"datalist": datalist, "backbone": args.backbone, "experiment_name": args.experiment_name}
    if header.get("class_names"):
        overrides["class_names"] = header["class_names"]
    if args.image_size:
        overrides["image_size"] = [args.image_size] * dims
    for key, flag in [("local_epochs", args.local_epochs), ("global_epochs", args.global_epochs),
                      ("max_epochs", args.max_epochs), ("batch_size", args.batch_size)]:
        if flag is not None:
            overrides[key] = flag
    try:
        overrides.update(runner.parse_overrides(args.set))
    except ValueError as e:
        p.error(str(e))

    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    with Experiment(out, "ablation", experiment_name=args.experiment_name, run_name=f"ablation:{out.name}") as exp:
        exp.log_params({"datalist": datalist, "backbone": args.backbone, "variants": ",".join(variants), "split": split,
                        **{k: v for k, v in overrides.items() if k != "datalist"}})
        for variant, (approach, init) in zip(variants, parsed):
            stages, approach_name, contrastive = APPROACHES[approach]
            init_value = "random" if init == "random" else f"imagenet:{os.path.abspath(args.imagenet_weights)}"
            summary = exp.step(variant, run_ffcl, ["train.yaml", "ffcl.yaml"], {
                **overrides, "output_dir": str(exp.step_dir(variant)), "tracking_uri": exp.tracking_uri,
                "stages": stages, "init": init_value, "run_name": variant}, parent_run_id=exp.parent_run_id)
            metrics = json.loads((exp.step_dir(variant) / f"evaluate_{split}" / "metrics.json").read_text())
            mets, fixed = robust_binary_auc(metrics["metrics"], metrics.get("class_names"))
            if fixed:
                print(f"note: {variant}: AUC taken from the unsaturated class column (float32 softmax saturation)")
            rows.append({"variant": variant, "approach": approach_name, "contrastive": contrastive,
                         "init": "ImageNet" if init == "imagenet" else "random", "metrics": mets, "auc_fixed": fixed,
                         "n": metrics.get("n"), "wall_s": summary.get("wall_s", float("nan"))})
            files = write_table(rows, out, args.backbone, split, rows[0].get("n"))
            exp.metrics.update(_table_metrics(rows, split))
        exp.add_artifacts(files)
    print("\n" + (out / "table.md").read_text())
    print(f"ablation wall time (all invocations): {exp.state['wall_s']:.0f} s; sum of variant wall times: "
          f"{sum(r['wall_s'] for r in rows):.0f} s")
    print(f"files: {out}/table.md, table.csv, table.png; MLflow: mlflow ui --backend-store-uri {redact_uri(exp.tracking_uri)}")
    return 0


def _table_metrics(rows: list[dict[str, Any]], split: str) -> dict[str, float]:
    """``<variant>.<split>_<metric>[_ci_low|_ci_high]`` for the parent run."""
    return {
        f"{r['variant']}.{split}_{k}{suffix}": r["metrics"][k][key]
        for r in rows for k, _ in METRICS if k in r["metrics"]
        for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))
    }


if __name__ == "__main__":
    sys.exit(main())
