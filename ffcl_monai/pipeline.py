"""The FFCL pipeline as one command: pretraining stages in order -> fine-tune -> evaluate, each feeding the next.

Entry point: ``bundle/configs/ffcl.yaml``'s ``run`` calls :func:`main`. With ``ffcl_stage`` unset it orchestrates:

1. One MLflow parent run (a child of ``mlflow_parent_run_id`` when an ablation runs the pipeline).
2. The initial backbone from ``init``: ``random`` (none), a project checkpoint (used as is), or
   ``imagenet:<file>`` (torchvision ResNet state dict mapped by :mod:`ffcl_monai.networks.imagenet` and saved as a
   project checkpoint ``init_backbone.pt``).
3. Every stage of ``stages`` (``local``, ``global``; any order; ``none`` = RBP) as its own MONAI ConfigWorkflow:
   ``[common, train, overlays..., ffcl]`` with ``ffcl_stage=<stage>`` and ``pretrained_ckpt`` = the previous stage's
   ``backbone.pt``. The stage trainer (``ffcl_monai.engines.ffcl``) uses train.yaml's training loader and
   augmentations and logs to an MLflow child run.
4. The downstream classifier: the foundation's ``train.yaml`` workflow with ``pretrained_ckpt`` = the last backbone
   (best checkpoint by validation AUC, ``loss_name`` BCE by default).
5. ``evaluate.yaml`` once per split in ``eval_splits`` present in the datalist (``test`` -> ``output_dir``, others ->
   ``output_dir/<split>``), with bootstrap 95% CIs.

Keys given on the command line are passed on to every step: the pipeline compares the running config with
``common.yaml`` and forwards every top-level key that differs. ``overlays`` (default: ``3d.yaml`` for a 3D datalist)
are added after the workflow file of every step.

Resume: ``pipeline_state.json`` in ``output_dir`` records finished steps; a rerun skips them and reuses the parent run.

Under torchrun (``multi_gpu_ffcl.yaml``) every rank runs the pretraining stages and the fine-tuning. Rank 0 alone opens
and finishes the MLflow parent run (its id is broadcast), writes the state and summary files, and runs the evaluate
steps (one-off reports, without the multi-GPU overlay) while the other ranks wait.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ffcl_monai
from ffcl_monai.data.distributed import barrier, broadcast_object, is_rank0
from ffcl_monai.handlers.mlflow_tracking import close_parent_run, open_parent_run
from ffcl_monai.redaction import redact_uri
from ffcl_monai.networks.checkpoints import atomic_write_text

logger = logging.getLogger(__name__)

STAGES = ("local", "global")
NO_STAGES = ("", "none", "rbp", "null", "None")
# Keys of the running config that the pipeline sets itself for each step, or that belong to the pipeline only.
_NOT_FORWARDED = {
    "imports", "initialize", "run", "finalize", "_meta_", "bundle_root", "dataset_dir",
    "output_dir", "tracking_uri", "mlflow_parent_run_id", "run_name", "pretrained_ckpt", "checkpoint",
    "ffcl_stage", "overlays", "stages", "init", "eval_splits", "ffcl_loss", "local", "global",
}


def configs_dir() -> Path:
    """``bundle/configs``."""
    return Path(ffcl_monai.bundle_root()) / "configs"


def parse_stages(value: str | Sequence[str] | None) -> list[str]:
    """``"local,global"`` / ``["global", "local"]`` / ``"none"`` -> list of stage names (empty = RBP)."""
    if value is None:
        return []
    items = [s.strip().lower() for s in (value.split(",") if isinstance(value, str) else value)]
    items = [s for s in items if s not in NO_STAGES]
    bad = [s for s in items if s not in STAGES]
    if bad:
        raise ValueError(
            f"unknown stage(s) {bad} in `stages`={value!r}; use a comma-separated order of {STAGES}, e.g. "
            "'local,global' (FFCL), 'global,local', 'local', 'global', or 'none' (RBP)."
        )
    return items


def _parser() -> Any:
    from ffcl_monai.engines.classification import _find_parser

    parser = _find_parser()
    if parser is None:
        raise RuntimeError("ffcl_monai.pipeline.main must be called from ffcl.yaml's `run` (no ConfigParser found).")
    return parser


def forwarded_overrides(raw: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys of the running config ``raw`` to pass on to every step: those absent from or different in
    ``base`` (common.yaml + overlays), minus the pipeline's own keys. New dict sections are not passed on, so that
    they can never replace a workflow file's section (e.g. ``train``)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _NOT_FORWARDED or k.startswith("+"):
            continue
        if k in base and base[k] == v:
            continue
        if isinstance(v, dict) and k not in base:
            continue
        out[k] = v
    return out


def _read_state(out: Path) -> dict[str, Any]:
    path = out / "pipeline_state.json"
    return json.loads(path.read_text()) if path.is_file() else {"done": {}}


def _write_state(out: Path, state: dict[str, Any]) -> None:
    if is_rank0():
        atomic_write_text(out / "pipeline_state.json", json.dumps(state, indent=2))


def run_step(config_names: Sequence[str], overrides: Mapping[str, Any]) -> None:
    """Run one bundle workflow (``monai.bundle.run`` with the bundle's meta and logging files)."""
    from monai.bundle import run as bundle_run

    cdir = configs_dir()
    files = [str(cdir / n) if not os.path.isabs(n) else n for n in config_names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"config file(s) {missing} not found; check `overlays` (names in {cdir}).")
    bundle_run(
        config_file=files, meta_file=str(cdir / "metadata.json"), logging_file=str(cdir / "logging.conf"), **overrides
    )


def _split_size(datalist: str, split: str) -> int:
    try:
        data = json.loads(Path(datalist).read_text())
    except (OSError, ValueError):
        return 0
    items = data.get(split)
    return len(items) if isinstance(items, list) else 0


def prepare_init(init: str | None, network_def: Any, out: Path) -> str | None:
    """The ``pretrained_ckpt`` the first step starts from, per the ``init`` key."""
    from ffcl_monai.engines.ffcl import as_backbone
    from ffcl_monai.networks.checkpoints import save_backbone

    if init is None or str(init).strip() in ("", "random", "none", "None"):
        return None
    init = str(init)
    if init.startswith("imagenet:"):
        from ffcl_monai.networks.imagenet import load_imagenet_resnet

        backbone = as_backbone(network_def)
        report = load_imagenet_resnet(backbone, init[len("imagenet:") :])
        path = save_backbone(out / "init_backbone.pt", backbone, extra={"init": init, "loaded": report["loaded"]})
        return str(path)
    if not os.path.isfile(init):
        raise FileNotFoundError(
            f"`init`={init!r} is neither 'random', 'imagenet:<file>' nor an existing checkpoint file."
        )
    return os.path.abspath(init)


def flat_metrics(metrics_json: str | os.PathLike, prefix: str) -> dict[str, float]:
    """``metrics.json`` of the evaluate workflow -> ``{prefix+metric: value, ..._ci_low, ..._ci_high}``."""
    m = json.loads(Path(metrics_json).read_text())["metrics"]
    out = {}
    for k, v in m.items():
        out[f"{prefix}{k}"] = v["value"]
        out[f"{prefix}{k}_ci_low"] = v["ci_low"]
        out[f"{prefix}{k}_ci_high"] = v["ci_high"]
    return out


def run_pipeline(parser: Any) -> dict[str, Any]:
    """Orchestrate the whole FFCL pipeline from the running ``ffcl.yaml`` parser. Returns the summary dict."""
    from monai.bundle import ConfigParser

    t0 = time.time()
    get = parser.get_parsed_content
    out = Path(get("output_dir")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = parse_stages(get("stages"))
    init = get("init")
    overlays = list(get("overlays") or [])
    uri = get("tracking_uri")
    experiment = get("experiment_name")
    datalist = get("datalist")
    # Compare with common.yaml alone: the entry run never loads the overlays, so whatever differs was set by the user.
    base = ConfigParser.load_config_files([str(configs_dir() / "common.yaml")])
    forward = forwarded_overrides(parser.get(), base)
    state = _read_state(out)
    done: dict[str, Any] = state.setdefault("done", {})

    parent = None
    if is_rank0():
        parent = open_parent_run(uri, experiment, get("run_name"), state.get("parent_run_id"), get("mlflow_parent_run_id"))
    parent = broadcast_object(parent)
    state["parent_run_id"] = parent
    _write_state(out, state)
    common = {"tracking_uri": uri, "mlflow_parent_run_id": parent, **forward}
    params = {
        "stages": ",".join(stages) or "none (RBP)", "init": init, "overlays": ",".join(overlays) or "none",
        "backbone": forward.get("backbone", get("backbone") if not overlays else "overlay default"),
        "image_size": forward.get("image_size", get("image_size") if not overlays else "overlay default"),
        "datalist": datalist,
        "local_epochs": get("local_epochs") if "local" in stages else 0,
        "global_epochs": get("global_epochs") if "global" in stages else 0,
        "max_epochs": get("max_epochs"), "pair_mode": get("pair_mode"), "averaging": get("averaging"),
        "neg_weight": get("neg_weight"), "loss_name": get("loss_name"),
    }
    status = "FAILED"
    metrics: dict[str, float] = {}
    artifacts: list[Path] = []
    try:
        ckpt = done.get("init")
        if "init" not in done:
            ckpt = prepare_init(init, get("network_def"), out)
            done["init"] = ckpt
            _write_state(out, state)
        timings: dict[str, float] = state.setdefault("seconds", {})
        for i, stage in enumerate(stages, start=1):
            step = f"stage{i}_{stage}"
            sdir = out / step
            if step in done:
                ckpt = done[step]
                print(f"== FFCL {step}: done earlier, reusing {ckpt}", flush=True)
                continue
            print(f"== FFCL {step}: {stage} contrastive stage from {ckpt or 'random init'} ==", flush=True)
            ts = time.time()
            run_step(
                ["common.yaml", "train.yaml", *overlays, "ffcl.yaml"],
                {**common, "output_dir": str(sdir), "ffcl_stage": stage, "pretrained_ckpt": ckpt, "run_name": step},
            )
            ckpt = str(sdir / "backbone.pt")
            if not os.path.isfile(ckpt):
                raise RuntimeError(f"stage {stage} finished without writing {ckpt}")
            timings[step] = time.time() - ts
            done[step] = ckpt
            _write_state(out, state)
            artifacts.append(sdir / "stage_curves.png")
        if "downstream" not in done:
            print(f"== FFCL downstream: fine-tune the classifier from {ckpt or 'random init'} ==", flush=True)
            ts = time.time()
            run_step(
                ["common.yaml", "train.yaml", *overlays],
                {**common, "output_dir": str(out), "pretrained_ckpt": ckpt, "run_name": "downstream",
                 "resume": (out / "checkpoints" / "resume.pt").is_file()},
            )
            timings["downstream"] = time.time() - ts
            done["downstream"] = True
            _write_state(out, state)
        artifacts.append(out / "training_curves.png")
        best = out / "models" / "model.pt"
        # Evaluation is a one-off report: rank 0 runs it as a single process (no multi-GPU overlay), the rest wait.
        eval_overlays = [o for o in overlays if not Path(o).name.startswith("multi_gpu")]
        for split in get("eval_splits") or []:
            n = _split_size(datalist, split)
            if n == 0:
                print(f"== FFCL evaluate: the datalist has no '{split}' split; skipped ==", flush=True)
                continue
            edir = out if split == "test" else out / split
            step = f"evaluate_{split}"
            if step not in done and is_rank0():
                print(f"== FFCL evaluate on {split} ({n} images, once, bootstrap 95% CIs) ==", flush=True)
                ts = time.time()
                run_step(
                    ["common.yaml", "evaluate.yaml", *eval_overlays],
                    {**common, "output_dir": str(edir), "checkpoint": str(best), "eval_split": split,
                     "run_name": step, "evaluate#report#prefix": f"{split}_"},
                )
                timings[step] = time.time() - ts
                done[step] = str(edir / "metrics.json")
                _write_state(out, state)
            if is_rank0():
                metrics.update(flat_metrics(done[step], f"{split}_"))
                artifacts += [edir / "metrics.json", edir / "roc.png"]
        barrier()
        status = "FINISHED"
    finally:
        state["wall_s"] = state.get("wall_s", 0.0) + (time.time() - t0)
        _write_state(out, state)
        metrics["wall_s"] = state["wall_s"]
        if is_rank0():
            # one artifact folder per step: evaluate writes metrics.json / roc.png for each split under the same names
            close_parent_run(uri, parent, status, params, metrics, [(p, Path(p).parent.name) for p in artifacts])
    summary = {"output_dir": str(out), "stages": stages, "init": init, "parent_run_id": parent,
               "metrics": metrics, "seconds": state.get("seconds", {}), "wall_s": state["wall_s"]}
    if not is_rank0():
        return summary
    atomic_write_text(out / "pipeline_summary.json", json.dumps(summary, indent=2, default=str))
    print(f"== FFCL pipeline done in {state['wall_s']:.0f} s: {out}/pipeline_summary.json; "
          f"MLflow: mlflow ui --backend-store-uri {redact_uri(uri)}", flush=True)
    return summary


def main(stage: str | None = None) -> Any:
    """``ffcl.yaml``'s ``run``: a single stage when ``ffcl_stage`` is set, else the whole pipeline."""
    parser = _parser()
    if stage:
        if stage not in STAGES:
            raise ValueError(f"`ffcl_stage` must be one of {STAGES} or null, got {stage!r}.")
        trainer = parser.get_parsed_content(f"{stage}#trainer")
        trainer.run()
        return trainer.state.metrics
    return run_pipeline(parser)
