"""The FFCL paper's Table 1 on any datalist, in one command, over one or several seeds, with paired comparisons
against RBP (seed 000, Table 1: stage orders x initialisations).

    python -m ffcl_monai.ablate --datalist d.json --backbone resnet18 --image-size 32 \\
        --variants rbp-random,ffcl-lg-random,ffcl-gl-random,local-random,global-random[,rbp-imagenet,...] \\
        [--seeds 0,1,2] [--preset paper] [--imagenet-weights resnet18.pth] [--output-dir runs/ablate] \\
        [--paired-bootstrap 1000] [--set key=value ...]

Each variant is ``<approach>-<init>``:
    approach: ``rbp`` (no pretraining, plain back-propagation), ``ffcl-lg`` (local -> global, FFCL),
              ``ffcl-gl`` (global -> local), ``local`` (local only), ``global`` (global only)
    init:     ``random`` or ``imagenet`` (needs ``--imagenet-weights``, a torchvision ResNet state-dict file)

Every (variant, seed) is the FFCL program (:func:`ffcl_monai.workflows.ffcl.run_ffcl`, ``bundle/configs/ffcl.yaml``)
with the config key ``seed`` set (network initialisation, shuffles, augmentations, ``label_fraction`` subsets), in
``<output-dir>/<variant>`` for seed 0 (the single-seed layout of earlier versions) and
``<output-dir>/<variant>-seed<k>`` for seed k. All of them log to one MLflow store (``<output-dir>/mlruns.db``)
under one parent run, and the ablation is an :class:`~ffcl_monai.workflows.experiment.Experiment` (lock,
``state.json``, parent run, summary); the seeds run one after the other, each seed's variants together, so an
interrupted run already has whole seeds.

``--preset NAME`` adds the overlay ``bundle/configs/<NAME>.yaml`` to every step of every variant (e.g. ``paper``: the
paper's image size, batch and learning rates); an unknown name is refused with the list of overlays. Flags and
``--set`` still override the preset's keys. The preset is recorded in the MLflow params and in the table headers.

Outputs, from the split given by ``--split`` (default: ``test`` when the datalist has one, else ``validation``; models
are always selected on validation, so with the validation split every number below is optimistic, and the tables say
so):

- one seed: ``table.md`` (the paper's layout, values in %, bootstrap 95% CIs) and ``table.csv``, as before;
- several seeds: ``table.md`` with mean +- std (divisor S - 1) over seeds per variant, ``table.csv`` (means, stds),
  and per seed ``table_seed<k>.md`` / ``.csv`` (the single-seed layout);
- both: the paired comparison of every variant with RBP of the same initialisation (``rbp-<init>``, else
  ``rbp-random``) on the same images, from the ``predictions.csv`` files (:mod:`ffcl_monai.evaluation.paired`):
  per seed the paired bootstrap 95% CI of the AUC and accuracy differences and DeLong's p for the AUC (binary tasks),
  pooled over seeds the mean difference with a 95% CI that adds the seed-to-seed variance to the image-sampling
  variance (joint resampling of the images for all seeds; t quantile, Welch-Satterthwaite df). In ``table.md``,
  ``paired.csv`` (every headline metric) and ``table.png`` (means with error bars; per-seed and pooled differences);
- MLflow parent run: ``<variant>.<split>_<metric>_mean`` / ``_std``, ``<variant>.seed<k>.<split>_<metric>`` (+ CI),
  ``<variant>.<split>_delta_<metric>`` (+ ``_ci_low``, ``_ci_high``, ``_se``) pooled,
  ``<variant>.seed<k>.<split>_delta_<metric>`` (+ CI) and ``<variant>.seed<k>.<split>_delong_p``; with one seed also
  the earlier ``<variant>.<split>_<metric>`` (+ CI) keys.

Resume: rerun the same command. A finished (variant, seed) is skipped (the ablation's ``state.json``); an interrupted
one continues inside its own pipeline (finished steps skipped, the interrupted step from its last epoch). A later
command with more ``--seeds`` or ``--variants`` adds runs; one with another ``--preset`` or other overrides is refused
(it would mix settings in one table): use another ``--output-dir``.

From Python (a study over many ablations, :mod:`ffcl_monai.study`): :func:`plan_ablation` checks a request as the
command line does (same messages, :class:`AblationError`) and :func:`run_ablation` runs it, optionally nested under
another MLflow parent run, stopping cleanly after ``max_new_runs`` new runs, and reading some (variant, seed) runs
from another ablation's folders (``external``: e.g. one RBP run shared by several ablations) instead of running them.

Overrides (``--set KEY=VALUE``) follow :func:`ffcl_monai.workflows.runner.parse_override` (values read as YAML);
``seed`` is set by ``--seeds`` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffcl_monai.errors import UserInputError
from ffcl_monai.networks.checkpoints import atomic_write_text, csv_text

logger = logging.getLogger(__name__)

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
DELTA_METRICS = [("auc", "ΔAUC"), ("accuracy", "ΔAccuracy")]  # the paired columns of table.md (paired.csv: all)
DEFAULT_VARIANTS = "rbp-random,ffcl-lg-random,ffcl-gl-random,local-random,global-random"
# bundle files that are workflows (or their stages), not overlays: never a --preset
# Not presets of the FFCL program: workflows, their stage files, and overlays of other workflows (multi-task
# fine-tuning, the seeds' SimCLR / Forward-Forward settings).
WORKFLOW_FILES = ("train.yaml", "inference.yaml", "evaluate.yaml", "ffcl.yaml", "ff.yaml", "multitask.yaml")
WORKFLOW_PREFIXES = ("ffcl_", "pretrain_", "seed0")
PAIRED_SEED = 0  # the resamples of the paired bootstrap (the same for every comparison: one joint resampling)


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


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (order kept); a negative, non-integer or repeated seed raises ValueError."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not re.fullmatch(r"\d+", part):
            raise ValueError(f"--seeds: {part!r} is not a non-negative integer (e.g. --seeds 0,1,2)")
        if int(part) in seeds:
            raise ValueError(f"--seeds: seed {part} is given twice")
        seeds.append(int(part))
    if not seeds:
        raise ValueError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return seeds


def step_name(variant: str, seed: int) -> str:
    """The step (and sub-folder) of one (variant, seed): ``<variant>`` for seed 0, as single-seed ablations always
    were (an earlier run's seed 0 is reused when seeds are added), ``<variant>-seed<k>`` otherwise."""
    return variant if seed == 0 else f"{variant}-seed{seed}"


def available_presets() -> list[str]:
    """Names of the overlays in ``bundle/configs`` a ``--preset`` may name (workflow files excluded)."""
    from ffcl_monai.workflows.runner import configs_dir

    return sorted(f.stem for f in configs_dir().glob("*.yaml")
                  if f.name not in WORKFLOW_FILES and not f.name.startswith(WORKFLOW_PREFIXES))


def preset_file(name: str) -> str:
    """``"paper"`` (or ``"paper.yaml"``) -> ``"paper.yaml"``, checked to be an overlay in ``bundle/configs``."""
    stem = name[:-5] if name.endswith(".yaml") else name
    presets = available_presets()
    if stem not in presets:
        raise ValueError(f"--preset {name!r}: no overlay {stem}.yaml among the presets of the FFCL program in "
                         "bundle/configs (workflow files and other workflows' overlays, such as multitask.yaml or "
                         f"the seed overlays, are not presets); available overlays: {', '.join(presets) or 'none'}.")
    return f"{stem}.yaml"


def reference_for(variant: str, variants: Sequence[str]) -> str | None:
    """The RBP run a variant is compared with: ``rbp-<same init>`` if it runs (and is not the variant itself), else
    ``rbp-random`` (so ``rbp-imagenet`` is compared with ``rbp-random``), else None."""
    _, init = parse_variant(variant)
    for ref in (f"rbp-{init}", "rbp-random"):
        if ref != variant and ref in variants:
            return ref
    return None


def _header(datalist: str) -> dict[str, Any]:
    """The config keys the datalist header may set, typed and checked (:mod:`ffcl_monai.workflows.untrusted`).

    A shared datalist is outside input: a class name such as ``"$__import__('os')..."`` or a ``_target_`` dict is
    refused here, naming the key, instead of reaching the bundle config as an override.
    """
    from ffcl_monai.data.datalist import read_header
    from ffcl_monai.workflows.untrusted import header_overrides

    return header_overrides(read_header(datalist), f"datalist {datalist} header")


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


def split_note(split: str) -> str:
    """What the tabulated split means for the numbers."""
    if split == "validation":
        return ("**Validation split**: the same images selected each model's checkpoint (best validation AUC), so "
                "every number and interval here is optimistic; a held-out test split gives unbiased ones.")
    return f"{split.capitalize()} split, evaluated once per model after selection on validation."


def _fmt(m: dict[str, float]) -> str:
    return f"{100 * m['value']:.2f} [{100 * m['ci_low']:.2f}, {100 * m['ci_high']:.2f}]"


def _fmt_delta(value: float, lo: float, hi: float) -> str:
    if any(math.isnan(x) for x in (value, lo, hi)):
        return "n/a" if math.isnan(value) else f"{100 * value:+.2f} [n/a]"
    return f"{100 * value:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def write_table(rows: list[dict[str, Any]], out: Path, backbone: str, split: str, n: int | None, stem: str = "table",
                note: str = "", extra_md: str = "", plot: bool = True) -> list[Path]:
    """``<stem>.md`` (paper layout, one row per variant of one seed), ``<stem>.csv`` and, with ``plot``,
    ``<stem>.png``. ``note`` goes into the header line, ``extra_md`` after the table."""
    md = [
        f"Table 1 layout, {backbone}, {split} split" + (f" (n={n})" if n else "") + note
        + ": value [bootstrap 95% CI], in %.",
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
    if extra_md:
        md += ["", extra_md.rstrip("\n")]
    atomic_write_text(out / f"{stem}.md", "\n".join(md) + "\n")
    table = []
    for r in rows:
        vals = []
        for k, _ in METRICS:
            m = r["metrics"].get(k, {})
            vals += [m.get("value", ""), m.get("ci_low", ""), m.get("ci_high", "")]
        table.append([r["variant"], backbone, r["approach"], r["contrastive"], r["init"], split, *vals, f"{r['wall_s']:.1f}"])
    atomic_write_text(out / f"{stem}.csv", csv_text(
        ["variant", "backbone", "approach", "contrastive", "initialization", "split",
         *[f"{k}{s}" for k, _ in METRICS for s in ("", "_ci_low", "_ci_high")], "wall_s"], table))
    files = [out / f"{stem}.md", out / f"{stem}.csv"]
    if plot:
        files.append(plot_table(rows, out / f"{stem}.png", f"{backbone}, {split} split"))
    return files


def _save_figure(fig: Any, path: Path) -> Path:
    """``savefig`` through a temporary file and a rename (a crash never leaves half a PNG under the real name)."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


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
    return _save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ several seeds
def seed_summary(rows: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant (in ``variants`` order) over its finished seeds: mean and sample std (divisor S - 1; NaN for one
    seed) of every metric, the per-seed values, and the summed wall time."""
    import numpy as np

    out = []
    for v in variants:
        runs = [r for r in rows if r["variant"] == v]
        if not runs:
            continue
        values = {k: [r["metrics"][k]["value"] for r in runs if k in r["metrics"]] for k, _ in METRICS}
        out.append({
            "variant": v, "approach": runs[0]["approach"], "contrastive": runs[0]["contrastive"],
            "init": runs[0]["init"],
            "seeds": [r["seed"] for r in runs], "values": values,
            "mean": {k: float(np.mean(x)) for k, x in values.items() if x},
            "std": {k: float(np.std(x, ddof=1)) if len(x) > 1 else float("nan") for k, x in values.items() if x},
            "auc_fixed": any(r.get("auc_fixed") for r in runs), "wall_s": float(sum(r["wall_s"] for r in runs)),
            "single": runs[0]["metrics"] if len(runs) == 1 else None,
        })
    return out


def write_seed_table(summary: list[dict[str, Any]], out: Path, backbone: str, split: str, n: int | None, note: str,
                     extra_md: str) -> list[Path]:
    """``table.md`` (mean +- std over seeds, paper layout) and ``table.csv`` of a several-seed ablation."""

    def cell(s: dict[str, Any], k: str) -> str:
        if k not in s["mean"]:
            return "n/a"
        if math.isnan(s["std"][k]):
            return f"{100 * s['mean'][k]:.2f} (1 seed)"
        return f"{100 * s['mean'][k]:.2f} ± {100 * s['std'][k]:.2f}"

    md = [
        f"Table 1 layout, {backbone}, {split} split" + (f" (n={n})" if n else "") + note
        + ": mean ± std over seeds (sample std, divisor S − 1), in %. Per seed: table_seed<k>.md.",
        "",
        "| Backbone | Approach | Contrastive | Initialization | " + " | ".join(t for _, t in METRICS)
        + " | seeds | wall (s) |",
        "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|",
    ]
    for s in summary:
        star = "*" if s["auc_fixed"] else ""
        md.append(f"| {backbone} | {s['approach']} | {s['contrastive']} | {s['init']} | "
                  + " | ".join(cell(s, k) for k, _ in METRICS) + f"{star} | {len(s['seeds'])} | {s['wall_s']:.0f} |")
    if any(s["auc_fixed"] for s in summary):
        md += ["", "\\* for at least one seed the AUC is from the other class's probability column (float32 "
               "saturation of the reported column; both are equal in exact arithmetic)."]
    if extra_md:
        md += ["", extra_md.rstrip("\n")]
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    rows = []
    for s in summary:
        vals = []
        for k, _ in METRICS:
            vals += [s["mean"].get(k, ""), s["std"].get(k, "")]
        rows.append([s["variant"], backbone, s["approach"], s["contrastive"], s["init"], split,
                     " ".join(str(k) for k in s["seeds"]), *vals, f"{s['wall_s']:.1f}"])
    atomic_write_text(out / "table.csv", csv_text(
        ["variant", "backbone", "approach", "contrastive", "initialization", "split", "seeds",
         *[f"{k}_{stat}" for k, _ in METRICS for stat in ("mean", "std")], "wall_s"], rows))
    return [out / "table.md", out / "table.csv"]


# ------------------------------------------------------------------------------------------------ paired comparison
def paired_comparisons(rows: list[dict[str, Any]], variants: Sequence[str], split: str, n_bootstrap: int = 1000,
                       alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every variant against its RBP reference (:func:`reference_for`) on the same images, seed k with seed k.

    Reads ``<run>/evaluate_<split>/predictions.csv`` of every run involved, checks that they are the same images,
    scores all of them on one joint set of bootstrap resamples (:func:`ffcl_monai.evaluation.paired.joint_bootstrap`)
    and returns, per compared variant, ``{"variant", "reference", "seeds", "per_seed": {seed: {metric: delta dict,
    "delong": DeLongResult | None}}, "pooled": {metric: PooledDelta}}``.
    """
    from ffcl_monai.evaluation.paired import binary_delong, check_same_images, joint_bootstrap, read_predictions
    from ffcl_monai.handlers.metrics import HEADLINE

    by_key = {(r["variant"], r["seed"]): r for r in rows}
    specs = []
    for v in variants:
        ref = reference_for(v, variants)
        seeds = [r["seed"] for r in rows if r["variant"] == v and (ref, r["seed"]) in by_key] if ref else []
        if seeds:
            specs.append((v, ref, seeds))
    if not specs:
        return []
    keys = list(dict.fromkeys(k for v, ref, seeds in specs for s in seeds for k in ((v, s), (ref, s))))
    task = by_key[keys[0]]["task"]
    preds = {k: read_predictions(Path(by_key[k]["dir"]) / f"evaluate_{split}" / "predictions.csv", task) for k in keys}
    check_same_images(list(preds.values()))
    first = preds[keys[0]]
    jb = joint_bootstrap({k: p.probs for k, p in preds.items()}, first.labels, task, first.class_names, n_bootstrap,
                         PAIRED_SEED, scores_by_model={k: p.scores for k, p in preds.items()})
    comps = []
    for v, ref, seeds in specs:
        per_seed: dict[int, dict[str, Any]] = {}
        for s in seeds:
            per_seed[s] = {m: jb.delta((v, s), (ref, s), m, alpha) for m in HEADLINE}
            per_seed[s]["delong"] = binary_delong(preds[(v, s)].scores, preds[(ref, s)].scores, first.labels, task, alpha)
        pooled = {m: jb.pooled([((v, s), (ref, s)) for s in seeds], m, alpha) for m in HEADLINE}
        comps.append({"variant": v, "reference": ref, "seeds": seeds, "per_seed": per_seed, "pooled": pooled,
                      "task": task, "n": len(first.labels)})
    return comps


def headline_delta(comp: dict[str, Any], metric: str) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) of a comparison's headline difference: pooled over seeds with two or more seeds,
    the seed's paired percentile bootstrap with one (a pooled interval from one seed covers the images only)."""
    if len(comp["seeds"]) == 1:
        d = comp["per_seed"][comp["seeds"][0]][metric]
        return d["value"], d["ci_low"], d["ci_high"]
    p = comp["pooled"][metric]
    return p.mean, p.ci_low, p.ci_high


def paired_markdown(comps: list[dict[str, Any]], split: str, n_bootstrap: int, variants: Sequence[str]) -> str:
    """The paired-comparison section of ``table.md``."""
    compared = {c["variant"] for c in comps}
    if not comps:
        if not any(reference_for(v, variants) for v in variants):
            others = [v for v in variants if parse_variant(v)[0] != "rbp"]
            return "No paired comparison: no RBP variant (rbp-random / rbp-<init>) in --variants." if others else ""
        return "No paired comparison yet: no variant has a finished RBP reference run with the same seed."
    n = comps[0]["n"]
    binary = comps[0]["task"] == "binary"
    lines = [
        f"Paired comparison with RBP on the same {split} images (n={n}); Δ = variant − reference, in percentage "
        "points, [95% CI]; accuracy at the argmax (0.5) decision. Pooled: mean Δ over seeds (seed k paired with "
        "seed k); the interval adds the seed-to-seed variance of Δ to the image-sampling variance of the mean (one "
        "joint resampling of the images for every seed), t quantile with Welch–Satterthwaite df. Per seed: paired "
        "bootstrap, "
        f"{n_bootstrap} resamples, percentile interval" + ("; DeLong's test for the AUC difference." if binary else
        "; DeLong's test applies per class for a multi-class or multi-label task and is not defined for the macro "
        "AUC: bootstrap only."),
        "Δ is computed from predictions.csv: accuracy from its probabilities, AUC from its full-precision log-odds "
        "(score_<class>), the scores behind the table above (files without them: the 6-decimal probabilities, "
        "which tie when a model saturates).",
        "",
        "| Variant | Reference | Seed | " + " | ".join(f"{t} [95% CI]" for _, t in DELTA_METRICS)
        + " | DeLong p (AUC) |",
        "|---|---|---|" + "---|" * len(DELTA_METRICS) + "---|",
    ]
    for c in comps:
        if len(c["seeds"]) > 1:
            cells = [_fmt_delta(c["pooled"][k].mean, c["pooled"][k].ci_low, c["pooled"][k].ci_high)
                     for k, _ in DELTA_METRICS]
            lines.append(f"| {c['variant']} | {c['reference']} | **pooled ({len(c['seeds'])} seeds)** | "
                         + " | ".join(f"**{x}**" for x in cells) + " | – |")
        for s in c["seeds"]:
            d = c["per_seed"][s]
            cells = [_fmt_delta(d[k]["value"], d[k]["ci_low"], d[k]["ci_high"]) for k, _ in DELTA_METRICS]
            p = d["delong"].p if d["delong"] is not None else None
            lines.append(f"| {c['variant']} | {c['reference']} | {s} | " + " | ".join(cells) + f" | {_fmt_p(p)} |")
    if any(len(c["seeds"]) == 1 for c in comps):
        lines += ["", "With one seed the interval covers the sampling of the images only, not training randomness: "
                  "run several seeds (--seeds 0,1,2) before ranking variants."]
    uncompared = [v for v in variants if v not in compared and parse_variant(v)[0] != "rbp"]
    if uncompared:
        lines += ["", f"Not compared (no RBP reference run with a shared seed yet): {', '.join(uncompared)}."]
    return "\n".join(lines) + "\n"


def write_paired_csv(comps: list[dict[str, Any]], path: Path, split: str) -> Path:
    """``paired.csv``: one row per (variant, seed or pooled, metric)."""
    from ffcl_monai.handlers.metrics import HEADLINE

    rows = []
    for c in comps:
        for m in HEADLINE:
            p = c["pooled"][m]
            rows.append([c["variant"], c["reference"], split, "pooled", m, p.mean, p.ci_low, p.ci_high, p.se, p.df,
                         p.var_images, p.var_seeds, "", len(c["seeds"])])
            for s in c["seeds"]:
                d = c["per_seed"][s][m]
                dl = c["per_seed"][s]["delong"] if m == "auc" else None
                rows.append([c["variant"], c["reference"], split, s, m, d["value"], d["ci_low"], d["ci_high"],
                             dl.se if dl else "", "", "", "", dl.p if dl else "", d["n_bootstrap"]])
    return atomic_write_text(path, csv_text(
        ["variant", "reference", "split", "seed", "metric", "delta", "ci_low", "ci_high", "se", "df", "var_images",
         "var_seeds", "delong_p", "n_seeds_or_resamples"], rows))


def plot_summary(summary: list[dict[str, Any]], comps: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Left: mean per metric and variant, error bars = std over seeds (one seed: its bootstrap 95% CI), dots = the
    seeds. Right: ΔAUC and ΔAccuracy against RBP per variant, dots = seeds, diamond and bar = pooled mean and CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = 1 + (len(DELTA_METRICS) if comps else 0)
    fig, axes = plt.subplots(1, panels, figsize=(9 + 3.2 * (panels - 1), 4.2), dpi=110,
                             gridspec_kw={"width_ratios": [3] + [1.3] * (panels - 1)}, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(summary), 1)
    x = np.arange(len(METRICS))
    for i, s in enumerate(summary):
        pos = x + (i - (len(summary) - 1) / 2) * width
        mean = np.array([s["mean"].get(k, np.nan) for k, _ in METRICS]) * 100
        if len(s["seeds"]) > 1:
            std = np.array([s["std"].get(k, np.nan) for k, _ in METRICS]) * 100
            err = np.vstack([std, std])
        else:
            one = s["single"] or {}
            lo = np.array([one.get(k, {}).get("ci_low", np.nan) for k, _ in METRICS]) * 100
            hi = np.array([one.get(k, {}).get("ci_high", np.nan) for k, _ in METRICS]) * 100
            err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        ax.bar(pos, mean, width, label=f"{s['variant']} ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''})",
               yerr=err, capsize=2)
        if len(s["seeds"]) > 1:
            for j, (k, _) in enumerate(METRICS):
                vals = np.array(s["values"].get(k, [])) * 100
                ax.scatter(np.full(len(vals), pos[j]), vals, s=6, color="black", zorder=3)
    ax.set_xticks(x, [t for _, t in METRICS])
    ax.set_ylabel("% (error bars: std over seeds; one seed: bootstrap 95% CI)", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9, pad=8 + 9 * math.ceil(len(summary) / 4))  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    for col, (metric, label) in enumerate(DELTA_METRICS if comps else [], start=1):
        ax = axes[0][col]
        for i, c in enumerate(comps):
            seeds = [c["per_seed"][s][metric]["value"] * 100 for s in c["seeds"]]
            ax.scatter(np.full(len(seeds), i - 0.12), seeds, s=12, color="tab:gray", zorder=3,
                       label="per seed" if i == 0 else None)
            v, lo, hi = headline_delta(c, metric)
            ax.errorbar([i + 0.12], [v * 100], yerr=[[max(v - lo, 0) * 100], [max(hi - v, 0) * 100]], fmt="D",
                        color="tab:red", capsize=3, label="pooled, 95% CI" if i == 0 else None)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlim(-0.6, len(comps) - 0.4)
        ax.set_xticks(range(len(comps)), [c["variant"] for c in comps], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{label} vs RBP (percentage points)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ MLflow metrics
def _table_metrics(rows: list[dict[str, Any]], split: str) -> dict[str, float]:
    """``<variant>.<split>_<metric>[_ci_low|_ci_high]`` for the parent run (the single-seed keys)."""
    return {
        f"{r['variant']}.{split}_{k}{suffix}": r["metrics"][k][key]
        for r in rows for k, _ in METRICS if k in r["metrics"]
        for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))
    }


def seed_metrics(rows: list[dict[str, Any]], summary: list[dict[str, Any]], comps: list[dict[str, Any]],
                 split: str) -> dict[str, float]:
    """The parent run's metrics of a (one- or several-seed) ablation; keys in the module docstring. NaN values are
    dropped (MLflow would store them, but they say nothing)."""
    from ffcl_monai.handlers.metrics import HEADLINE

    out: dict[str, float] = {}
    for s in summary:
        for k in s["mean"]:
            out[f"{s['variant']}.{split}_{k}_mean"] = s["mean"][k]
            out[f"{s['variant']}.{split}_{k}_std"] = s["std"][k]
    for r in rows:
        for k, _ in METRICS:
            if k in r["metrics"]:
                for suffix, key in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high")):
                    out[f"{r['variant']}.seed{r['seed']}.{split}_{k}{suffix}"] = r["metrics"][k][key]
    for c in comps:
        v = c["variant"]
        for m in HEADLINE:
            value, lo, hi = headline_delta(c, m)
            out[f"{v}.{split}_delta_{m}"] = value
            out[f"{v}.{split}_delta_{m}_ci_low"] = lo
            out[f"{v}.{split}_delta_{m}_ci_high"] = hi
            if len(c["seeds"]) > 1:
                out[f"{v}.{split}_delta_{m}_se"] = c["pooled"][m].se
        for s in c["seeds"]:
            for m, _ in DELTA_METRICS:
                d = c["per_seed"][s][m]
                out[f"{v}.seed{s}.{split}_delta_{m}"] = d["value"]
                out[f"{v}.seed{s}.{split}_delta_{m}_ci_low"] = d["ci_low"]
                out[f"{v}.seed{s}.{split}_delta_{m}_ci_high"] = d["ci_high"]
            if c["per_seed"][s]["delong"] is not None:
                out[f"{v}.seed{s}.{split}_delong_p"] = c["per_seed"][s]["delong"].p
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(float(v))}


def _check_settings(out: Path, settings: dict[str, Any]) -> str | None:
    """A message when ``out`` holds an ablation run with other settings (preset, overrides): its finished runs would
    be reused and mixed with new ones in one table. None when they agree or nothing was recorded."""
    try:
        state = json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("kind") != "ablation" or not isinstance(state.get("settings"), dict):
        return None
    earlier = state["settings"]
    if earlier == settings:
        return None
    keys = sorted(set(earlier) | set(settings))
    diff = []
    for k in keys:
        if earlier.get(k) != settings.get(k):
            if isinstance(earlier.get(k), dict) and isinstance(settings.get(k), dict):
                sub = sorted(set(earlier[k]) | set(settings[k]))
                diff += [f"{k}.{s}: {earlier[k].get(s)!r} -> {settings[k].get(s)!r}" for s in sub
                         if earlier[k].get(s) != settings[k].get(s)]
            else:
                diff.append(f"{k}: {earlier.get(k)!r} -> {settings.get(k)!r}")
    return (f"{out} holds an ablation run with other settings ({'; '.join(diff)}); its finished runs would be mixed "
            "with these in one table. Rerun with the same --preset and overrides, or use another --output-dir.")


# ------------------------------------------------------------------------------------------------ from Python
class AblationError(UserInputError):
    """A refused ablation request (variant, seed, preset, split, override, or a folder holding other settings); the
    command line reports it as a usage error (exit code 2)."""


@dataclass
class AblationPlan:
    """A checked ablation request (:func:`plan_ablation`): what :func:`run_ablation` runs, nothing run or written yet.

    ``external`` maps ``(variant, seed)`` to ``{"dir": <finished FFCL-program folder>, "wall_s": seconds}``: runs
    that another ablation owns (e.g. one RBP run shared by several ablations of a study). They are read, never run,
    and enter the tables and paired comparisons like the ablation's own runs; their folders are part of ``settings``.
    """

    datalist: str
    out: Path
    variants: list[str]
    parsed: list[tuple[str, str]]
    seeds: list[int]
    preset: str | None
    split: str
    overrides: dict[str, Any]
    settings: dict[str, Any]
    backbone: str
    header: dict[str, Any]
    imagenet_weights: str | None = None
    paired_bootstrap: int = 1000
    experiment_name: str = "ffcl_ablation"
    external: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    @property
    def preset_name(self) -> str:
        """The preset as tables and MLflow params name it (``none`` without one)."""
        return self.preset[:-5] if self.preset else "none"


@dataclass
class AblationResult:
    """What :func:`run_ablation` did: every finished (variant, seed) row (external ones included), the paired
    comparisons with RBP (:func:`paired_comparisons`), the per-variant seed summary, and whether every run is done
    (False when ``max_new_runs`` stopped it: rerun to continue)."""

    out: Path
    split: str
    rows: list[dict[str, Any]]
    comps: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    new_runs: int
    complete: bool
    wall_s: float
    parent_run_id: str | None
    tracking_uri: str
    files: list[Path]


def plan_ablation(datalist: str | os.PathLike, output_dir: str | os.PathLike, variants: Sequence[str] | str,
                  seeds: Sequence[int] | str = (0,), *, backbone: str = "resnet18", preset: str | None = None,
                  image_size: int | Sequence[int] | None = None, overrides: dict[str, Any] | None = None,
                  split: str = "auto", imagenet_weights: str | None = None, paired_bootstrap: int = 1000,
                  experiment_name: str = "ffcl_ablation",
                  external: dict[tuple[str, int], dict[str, Any]] | None = None) -> AblationPlan:
    """Check an ablation request as the command line does (same messages), without running or writing anything.

    Args:
        datalist, output_dir: as ``--datalist`` / ``--output-dir``.
        variants, seeds: lists (or the command line's comma-separated text).
        backbone, preset, split, imagenet_weights, paired_bootstrap, experiment_name: as the flags.
        image_size: one int (square/cubic, as ``--image-size``) or a full size list.
        overrides: config keys for every step (``--set`` and the epoch/batch flags); ``seed`` is refused.
        external: runs read from other folders instead of being run (:class:`AblationPlan`).

    Raises:
        AblationError: a bad request (the command line's usage errors);
        UserInputError: a datalist header holding config syntax or bad types (:mod:`ffcl_monai.workflows.untrusted`).
    """
    datalist = str(Path(datalist).resolve())
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    variants = list(variants)
    try:
        parsed = [parse_variant(v) for v in variants]
        seeds = parse_seeds(seeds if isinstance(seeds, str) else ",".join(str(int(s)) for s in seeds))
        preset = preset_file(preset) if preset else None
    except ValueError as e:
        raise AblationError(str(e)) from None
    if paired_bootstrap < 1:
        raise AblationError("--paired-bootstrap must be at least 1")
    if any(init == "imagenet" for _, init in parsed):
        if not imagenet_weights or not os.path.isfile(imagenet_weights):
            raise AblationError("*-imagenet variants need --imagenet-weights <torchvision ResNet state-dict file> "
                                "(nothing is downloaded)")
    if split == "auto":
        split = "test" if _has_split(datalist, "test") else "validation"
    if not _has_split(datalist, split):
        raise AblationError(f"the datalist has no '{split}' split to tabulate")
    header = _header(datalist)
    dims = 3 if header.get("spatial_dims", 2) == 3 else 2
    out = Path(output_dir).resolve()
    keys: dict[str, Any] = {"datalist": datalist, "backbone": backbone, "experiment_name": experiment_name}
    if header.get("class_names"):
        keys["class_names"] = header["class_names"]
    if image_size:
        keys["image_size"] = [int(image_size)] * dims if isinstance(image_size, int) else [int(s) for s in image_size]
    keys.update(overrides or {})
    if "seed" in keys:
        raise AblationError(f"--set seed={keys['seed']}: the training seeds are given by --seeds "
                            f"(e.g. --seeds {keys['seed']})")
    external = {(str(v), int(s)): dict(e) for (v, s), e in (external or {}).items()}
    unknown = sorted({v for v, _ in external} - set(variants))
    if unknown:
        raise AblationError(f"external runs of {unknown}, which are not among the variants {variants}")
    settings: dict[str, Any] = {"preset": preset, "overrides": keys}
    if external:  # (absent otherwise: folders of earlier ablations keep their recorded settings)
        settings["external"] = {f"{v}@seed{s}": str(Path(e["dir"]).resolve()) for (v, s), e in sorted(external.items())}
    settings = json.loads(json.dumps(settings, default=str))
    conflict = _check_settings(out, settings)
    if conflict:
        raise AblationError(conflict)
    return AblationPlan(datalist, out, variants, parsed, seeds, preset, split, keys, settings, backbone, header,
                        imagenet_weights, paired_bootstrap, experiment_name, external)


def _row(variant: str, seed: int, run_dir: Path, split: str, wall_s: float, header: dict[str, Any]) -> dict[str, Any]:
    """One table row from a finished run's ``evaluate_<split>/metrics.json``."""
    approach, init = parse_variant(variant)
    _, approach_name, contrastive = APPROACHES[approach]
    metrics = json.loads((run_dir / f"evaluate_{split}" / "metrics.json").read_text())
    mets, fixed = robust_binary_auc(metrics["metrics"], metrics.get("class_names"))
    if fixed:
        print(f"note: {run_dir.name}: AUC taken from the unsaturated class column (float32 softmax saturation)")
    return {"variant": variant, "seed": seed, "dir": str(run_dir), "approach": approach_name,
            "contrastive": contrastive, "init": "ImageNet" if init == "imagenet" else "random",
            "metrics": mets, "auc_fixed": fixed, "n": metrics.get("n"),
            "task": metrics.get("task", header.get("task", "binary")), "wall_s": wall_s}


def run_ablation(plan: AblationPlan, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
                 max_new_runs: int | None = None, prune_resume: bool = False) -> AblationResult:
    """Run (or continue) a planned ablation: one resumable step per (variant, seed), tables after every new run.

    Args:
        plan: from :func:`plan_ablation`.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ``<output_dir>/mlruns.db``).
        parent_run_id: nest the ablation's parent run under this run (a study's).
        max_new_runs: start at most this many runs not finished earlier, then stop cleanly (tables from what is
            done; ``complete`` False). None: all.
        prune_resume: delete each run's resume checkpoints once it has finished
            (:func:`~ffcl_monai.workflows.experiment.prune_resume_checkpoints`; ~0.8 GB per ResNet-18 FFCL run).
    """
    from ffcl_monai.workflows.experiment import Experiment, prune_resume_checkpoints
    from ffcl_monai.workflows.ffcl import run_ffcl

    out, variants, seeds, split = plan.out, plan.variants, plan.seeds, plan.split
    overrides = plan.overrides
    entry = ["train.yaml", "ffcl.yaml", *([plan.preset] if plan.preset else [])]
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    written = -1
    new_runs = 0
    complete = True
    comps: list[dict[str, Any]] = []
    with Experiment(out, "ablation", tracking_uri=tracking_uri, experiment_name=plan.experiment_name,
                    run_name=f"ablation:{out.name}", parent_run_id=parent_run_id) as exp:
        exp.state["settings"] = plan.settings
        exp.save()
        exp.log_params({"datalist": plan.datalist, "backbone": plan.backbone, "variants": ",".join(variants),
                        "split": split, "seeds": ",".join(map(str, seeds)), "preset": plan.preset_name,
                        "paired_bootstrap": plan.paired_bootstrap,
                        "references": ",".join(f"{v}:{reference_for(v, variants)}" for v in variants
                                               if reference_for(v, variants)) or "none",
                        **{k: v for k, v in overrides.items() if k != "datalist"}})
        for seed in seeds:
            for variant, (approach, init) in zip(variants, plan.parsed):
                if (variant, seed) in plan.external:  # another ablation's run: read, never run here
                    ext = plan.external[(variant, seed)]
                    rows.append(_row(variant, seed, Path(ext["dir"]), split, float(ext.get("wall_s", float("nan"))),
                                     plan.header))
                    continue
                stages = APPROACHES[approach][0]
                init_value = "random" if init == "random" else f"imagenet:{os.path.abspath(str(plan.imagenet_weights))}"
                name = step_name(variant, seed)
                ran = not exp.done(name)
                if ran and max_new_runs is not None and new_runs >= max_new_runs:
                    complete = False
                    break
                summary = exp.step(name, run_ffcl, entry, {
                    **overrides, "seed": seed, "output_dir": str(exp.step_dir(name)), "tracking_uri": exp.tracking_uri,
                    "stages": stages, "init": init_value, "run_name": name}, parent_run_id=exp.parent_run_id)
                new_runs += int(ran)
                if prune_resume:
                    freed = prune_resume_checkpoints(exp.step_dir(name))
                    if freed:
                        logger.info("%s finished: its resume checkpoints (%.0f MB) deleted (prune_resume)", name, freed / 2**20)
                rows.append(_row(variant, seed, exp.step_dir(name), split, summary.get("wall_s", float("nan")),
                                 plan.header))
                if ran:  # tables after every new run: an interrupted ablation has them up to its last run
                    files, comps = _write_outputs(rows, variants, seeds, out, plan.backbone, split, plan.preset_name,
                                                  plan.paired_bootstrap, exp)
                    written = len(rows)
            if not complete:
                break
        if rows and written != len(rows):
            files, comps = _write_outputs(rows, variants, seeds, out, plan.backbone, split, plan.preset_name,
                                          plan.paired_bootstrap, exp)
        exp.add_artifacts(files)
    return AblationResult(out, split, rows, comps, seed_summary(rows, variants), new_runs, complete,
                          float(exp.state["wall_s"]), exp.parent_run_id, exp.tracking_uri, files)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ffcl_monai.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--seeds", default="0",
                   help="comma-separated training seeds, e.g. 0,1,2 (default 0: one run per variant)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="overlay bundle/configs/NAME.yaml added to every step (e.g. paper)")
    p.add_argument("--output-dir", default="runs/ablate")
    p.add_argument("--image-size", type=int, default=None, help="square/cubic input size (default: the config's)")
    p.add_argument("--imagenet-weights", default=None, help="torchvision ResNet state-dict file for *-imagenet variants")
    p.add_argument("--split", default="auto", help="table split: auto (test if present, else validation) | validation | test")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--global-epochs", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=None, help="downstream fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--paired-bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the paired comparison with RBP (default 1000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. --set local_lr=0.0003 --set averaging=balanced")
    p.add_argument("--experiment-name", default="ffcl_ablation")
    p.add_argument("--prune-resume", action="store_true",
                   help="delete each finished run's resume checkpoints (~0.8 GB per ResNet-18 FFCL run); results stay")
    args = p.parse_args(argv)

    from ffcl_monai.redaction import redact_uri
    from ffcl_monai.workflows import runner

    overrides: dict[str, Any] = {}
    for key, flag in [("local_epochs", args.local_epochs), ("global_epochs", args.global_epochs),
                      ("max_epochs", args.max_epochs), ("batch_size", args.batch_size)]:
        if flag is not None:
            overrides[key] = flag
    try:
        overrides.update(runner.parse_overrides(args.set))
    except ValueError as e:
        p.error(str(e))
    try:
        plan = plan_ablation(args.datalist, args.output_dir, args.variants, args.seeds, backbone=args.backbone,
                             preset=args.preset, image_size=args.image_size, overrides=overrides, split=args.split,
                             imagenet_weights=args.imagenet_weights, paired_bootstrap=args.paired_bootstrap,
                             experiment_name=args.experiment_name)
    except AblationError as e:
        p.error(str(e))
    except UserInputError as e:  # the datalist header: outside input, refused naming the key
        raise SystemExit(f"error: {e}") from None
    res = run_ablation(plan, prune_resume=args.prune_resume)
    out = res.out
    print("\n" + (out / "table.md").read_text())
    print(f"ablation wall time (all invocations): {res.wall_s:.0f} s; sum of run wall times: "
          f"{sum(r['wall_s'] for r in res.rows):.0f} s")
    print(f"files: {out}/table.md, table.csv, table.png, paired.csv; MLflow: mlflow ui --backend-store-uri "
          f"{redact_uri(res.tracking_uri)}")
    return 0


def _write_outputs(rows: list[dict[str, Any]], variants: Sequence[str], seeds: Sequence[int], out: Path,
                   backbone: str, split: str, preset: str, n_bootstrap: int,
                   exp: Any) -> tuple[list[Path], list[dict[str, Any]]]:
    """Tables, paired comparison, plot and parent-run metrics from the runs finished so far (rewritten after each);
    returns the files and the paired comparisons."""
    n = rows[0].get("n")
    note = f", seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, preset: {preset}"
    comps = paired_comparisons(rows, variants, split, n_bootstrap)
    paired_md = paired_markdown(comps, split, n_bootstrap, variants)
    summary = seed_summary(rows, variants)
    extra = split_note(split) + ("\n\n" + paired_md if paired_md else "")
    if len(seeds) == 1:
        files = write_table(rows, out, backbone, split, n, note=note, extra_md=extra, plot=False)
        exp.metrics.update(_table_metrics(rows, split))
    else:
        files = write_seed_table(summary, out, backbone, split, n, note, extra)
        for s in seeds:
            seed_rows = [r for r in rows if r["seed"] == s]
            if seed_rows:
                files += write_table(seed_rows, out, backbone, split, n, stem=f"table_seed{s}",
                                     note=f", seed {s}, preset: {preset}",
                                     extra_md=split_note(split), plot=False)
    files.append(write_paired_csv(comps, out / "paired.csv", split))
    files.append(plot_summary(summary, comps, out / "table.png", f"{backbone}, {split} split{note}"))
    exp.metrics.update(seed_metrics(rows, summary, comps, split))
    exp.metrics["n_seeds"] = float(len({r["seed"] for r in rows}))
    return files, comps


if __name__ == "__main__":
    sys.exit(main())
