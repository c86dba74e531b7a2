"""The FFCL pipeline as one program: pretraining stages in order -> fine-tune -> evaluate, each feeding the next.

Command (MONAI hands the whole command line to :class:`FFCLWorkflow`)::

    python -m monai.bundle run --workflow_name ffcl_monai.workflows.ffcl.FFCLWorkflow \\
        --config_file "['bundle/configs/train.yaml','bundle/configs/ffcl.yaml']" --datalist d.json --output_dir runs/f

or from Python: :func:`run_ffcl`. The program reads its own keys (``stages``, ``init``, ``eval_splits``) from the
entry config, then runs each step as its own bundle workflow (:func:`ffcl_monai.workflows.runner.run`) in its own
sub-folder of ``output_dir``, all under one :class:`~ffcl_monai.workflows.experiment.Experiment` (lock, state,
MLflow parent run, summary):

1. ``init``: ``random`` (none), a project checkpoint (used as is), or ``imagenet:<file>`` (a torchvision ResNet state
   dict mapped by :mod:`ffcl_monai.networks.imagenet`, saved as ``init_backbone.pt``).
2. ``stage<i>_<stage>`` for every stage of ``stages`` (``local``, ``global``; any order; ``none`` = RBP):
   ``[train.yaml, ffcl.yaml, ffcl_<stage>.yaml, overlays...]`` with ``pretrained_ckpt`` = the previous backbone.
3. ``finetune``: ``[train.yaml, overlays...]`` with ``pretrained_ckpt`` = the last stage's backbone.
4. ``evaluate_<split>`` for each split of ``eval_splits`` in the datalist: ``[train.yaml, evaluate.yaml, overlays...]``
   on ``finetune/models/model.pt`` (bootstrap 95% CIs), once.

How keys reach the steps (explicit, nothing is read back from a running parser):

- every key given on the command line (or in ``overrides``) goes to every step, except ``max_epochs`` (the
  fine-tuning's epochs) to the stages, whose ``max_epochs`` is set to ``local_epochs`` / ``global_epochs`` (also when an
  overlay such as ``paper.yaml`` sets ``max_epochs``);
- the entry config's values of the keys ffcl.yaml sets for the fine-tuning (``FINETUNE_KEYS``: ``loss_name: bce``, and
  ``in_channels`` / ``input_norm``, which follow ``init``: 3 channels and ImageNet mean/std for ``imagenet:<file>``) go
  to the fine-tuning and evaluation steps, which do not load ffcl.yaml (the stages load it and resolve the same);
- the program sets ``output_dir``, ``pretrained_ckpt``, ``run_name``, ``tracking_uri``, ``mlflow_parent_run_id`` and
  ``resume`` per step.

``overlays`` are the entry's config files after ``train.yaml`` and ``ffcl.yaml`` (e.g. ``paper.yaml``, the paper's
protocol, or ``multi_gpu_train.yaml``) plus ``3d.yaml`` for a 3D datalist
(:func:`ffcl_monai.workflows.runner.config_files`). :func:`plan_steps` lists every step's files and keys without running
anything (what the program runs, and what ``tests/test_paper_preset.py`` resolves).

Resume: rerun the same command. Finished steps are skipped (``state.json``), an interrupted step resumes from its
last epoch. Under torchrun every rank runs the stages and the fine-tuning; rank 0 alone runs the evaluation (a
one-off report, without the multi-GPU overlay) while the others wait.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.utils import ensure_tuple

from ffcl_monai.data.distributed import barrier, is_rank0
from ffcl_monai.workflows import runner
from ffcl_monai.workflows.experiment import Experiment

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "FINETUNE_KEYS", "FFCLWorkflow", "Step", "parse_stages", "plan_steps", "prepare_init", "run_ffcl",
           "refuse_without_workflow_name", "flat_metrics"]

STAGES = ("local", "global")
NO_STAGES = ("", "none", "rbp", "null", "None")
# ffcl.yaml's values of train.yaml keys for the fine-tuning and evaluation steps, which do not load ffcl.yaml; passed
# on explicitly. in_channels / input_norm follow `init` (an ImageNet init: 3 channels, ImageNet mean/std): a network
# and its inputs must agree in every step, evaluation included.
FINETUNE_KEYS = ("loss_name", "in_channels", "input_norm")
_ENTRY_FILES = ("train.yaml", "ffcl.yaml")


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


def prepare_init(init: str | None, network_def: Any, out: Path) -> str | None:
    """The ``pretrained_ckpt`` the first step starts from, per the ``init`` key."""
    from ffcl_monai.networks.backbones import as_backbone
    from ffcl_monai.networks.checkpoints import save_backbone

    if init is None or str(init).strip() in ("", "random", "none", "None"):
        return None
    init = str(init)
    if init.startswith("imagenet:"):
        from ffcl_monai.networks.imagenet import load_imagenet_resnet

        backbone = as_backbone(network_def)
        report = load_imagenet_resnet(backbone, init[len("imagenet:"):])
        path = save_backbone(out / "init_backbone.pt", backbone, extra={"init": init, "loaded": report["loaded"]})
        return str(path)
    if not os.path.isfile(init):
        raise FileNotFoundError(f"`init`={init!r} is neither 'random', 'imagenet:<file>' nor an existing checkpoint file.")
    return os.path.abspath(init)


def flat_metrics(metrics_json: str | os.PathLike, prefix: str) -> dict[str, float]:
    """``metrics.json`` of the evaluate workflow -> ``{prefix+metric: value, ..._ci_low, ..._ci_high}``."""
    content = json.loads(Path(metrics_json).read_text())
    out = {}
    for k, v in content["metrics"].items():
        out[f"{prefix}{k}"] = v["value"]
        out[f"{prefix}{k}_ci_low"] = v["ci_low"]
        out[f"{prefix}{k}_ci_high"] = v["ci_high"]
    if "operating_point" in content and "calibration" in content:  # the threshold, sensitivity/specificity, ECE
        from ffcl_monai.evaluation.operating_point import Assessment

        out.update(Assessment(content["operating_point"], content["calibration"]).flat_metrics(prefix))
    return out


def _split_size(datalist: str, split: str) -> int:
    try:
        items = json.loads(Path(datalist).read_text()).get(split)
    except (OSError, ValueError):
        return 0
    return len(items) if isinstance(items, list) else 0


def _overlays(files: Sequence[str]) -> list[str]:
    return [f for f in files if Path(f).name not in _ENTRY_FILES]


@dataclass
class Step:
    """One bundle step of the pipeline as the program runs it.

    Attributes:
        name: its sub-folder and MLflow child run (``stage1_local``, ``finetune``, ``evaluate_test``).
        kind: ``stage``, ``finetune`` or ``evaluate``.
        files: the config files, absolute.
        overrides: the keys the program passes, before the per-step bookkeeping of
            :meth:`~ffcl_monai.workflows.experiment.Experiment.step_overrides` (``output_dir``, the MLflow store and
            parent run, ``resume``) and the checkpoint of the previous step (``pretrained_ckpt`` / ``checkpoint``).
        split: the evaluated split (``evaluate`` steps).
    """

    name: str
    kind: str
    files: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    split: str | None = None


def plan_steps(entry_files: Sequence[str], overrides: Mapping[str, Any], parser: Any = None) -> list[Step]:
    """Every step of the pipeline (stages, fine-tuning, one evaluation per split of ``eval_splits`` the datalist
    has), with its files and keys, without running anything.

    Args:
        entry_files: the entry's config files (train.yaml, ffcl.yaml, overlays), absolute
            (:func:`ffcl_monai.workflows.runner.config_files`).
        overrides: the command-line keys.
        parser: the entry config's parser (built from ``entry_files`` and ``overrides`` when None).
    """
    overrides = dict(overrides)
    if parser is None:
        parser = runner.load(entry_files, overrides)
    get = parser.get_parsed_content
    datalist = get("datalist")
    overlays = _overlays(entry_files)
    finetune_keys = {k: get(k) for k in FINETUNE_KEYS if k not in overrides}
    forward = {k: v for k, v in overrides.items() if k not in ("output_dir", "run_name", "mlflow_parent_run_id")}
    steps = []
    for i, stage in enumerate(parse_stages(get("stages")), start=1):
        files = runner.config_files(["train.yaml", "ffcl.yaml", f"ffcl_{stage}.yaml", *overlays], datalist)
        # `max_epochs` (command line, or an overlay such as paper.yaml, listed after the stage file) is the
        # fine-tuning's; a stage runs `<stage>_epochs`, passed explicitly so that no overlay can replace it
        keys = {k: v for k, v in forward.items() if k != "max_epochs"}
        steps.append(Step(f"stage{i}_{stage}", "stage", files, {**keys, "max_epochs": int(get(f"{stage}_epochs"))}))
    finetune = {**forward, **finetune_keys}
    steps.append(Step("finetune", "finetune", runner.config_files(["train.yaml", *overlays], datalist), finetune))
    # Evaluation is a one-off report: rank 0 runs it as a single process (no multi-GPU overlay), the rest wait.
    eval_files = runner.config_files(
        ["train.yaml", "evaluate.yaml", *[o for o in overlays if not Path(o).name.startswith("multi_gpu")]], datalist)
    for split in get("eval_splits") or []:
        if _split_size(datalist, split) == 0:
            logger.info("== FFCL evaluate: the datalist has no '%s' split; skipped", split)
            continue
        steps.append(Step(f"evaluate_{split}", "evaluate", eval_files,
                          {**finetune, "eval_split": split, "test_report#prefix": f"{split}_"}, split))
    return steps


def run_ffcl(
    config_files: Sequence[str | os.PathLike] = _ENTRY_FILES,
    overrides: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline into ``overrides["output_dir"]``; returns the summary (also ``summary.json``).

    Args:
        config_files: the entry files, ``train.yaml`` + ``ffcl.yaml`` + overlays (names or paths).
        overrides: command-line keys; every one goes to every step.
        parent_run_id: nest the pipeline's MLflow parent run under this one (the ablation's).
    """
    overrides = dict(overrides or {})
    entry_files = runner.config_files(config_files, overrides.get("datalist"))
    parser = runner.load(entry_files, overrides)
    get = parser.get_parsed_content
    datalist = get("datalist")
    # the datalist header is outside input: checked before anything runs or is written
    get("check_data")
    overlays = _overlays(entry_files)
    stages = parse_stages(get("stages"))
    init = get("init")
    plan = plan_steps(entry_files, overrides, parser)
    out = Path(get("output_dir")).resolve()
    if any(Path(o).name.startswith("multi_gpu") for o in overlays):
        get("device")  # multi_gpu_train.yaml's device initialises the process group: the parent run id is broadcast

    with Experiment(out, "ffcl", tracking_uri=overrides.get("tracking_uri"), experiment_name=get("experiment_name"),
                    run_name=get("run_name"), parent_run_id=parent_run_id or get("mlflow_parent_run_id"),
                    resume=bool(get("resume")), overwrite=bool(get("overwrite"))) as exp:
        exp.log_params({
            "stages": ",".join(stages) or "none (RBP)", "init": init, "datalist": datalist,
            "overlays": ",".join(Path(o).name for o in overlays) or "none", "backbone": get("backbone"),
            "image_size": get("image_size"), "local_epochs": get("local_epochs") if "local" in stages else 0,
            "global_epochs": get("global_epochs") if "global" in stages else 0, "max_epochs": get("max_epochs"),
            "pair_mode": get("pair_mode"), "averaging": get("averaging"), "neg_weight": get("neg_weight"),
            "loss_name": get("loss_name"), "in_channels": get("in_channels"), "input_norm": get("input_norm"),
            "global_objective": get("global_objective") if "global" in stages else "none",
            "supcon_temperature": get("supcon_temperature"),
        })
        ckpt = exp.step("init", prepare_init, init, get("network_def"), out)
        best = None
        for step in plan:
            name = step.name
            if step.kind == "stage":
                ckpt = exp.step(name, _run_step, step.files,
                                {**step.overrides, **exp.step_overrides(name, pretrained_ckpt=ckpt)}, "backbone.pt",
                                required=True)
                exp.add_artifacts([exp.step_dir(name) / "training_curves.png"], name)
            elif step.kind == "finetune":
                best = exp.step(name, _run_step, step.files,
                                {**step.overrides, **exp.step_overrides(name, pretrained_ckpt=ckpt)}, "models/model.pt")
                exp.add_artifacts([exp.step_dir(name) / "training_curves.png"], name)
            elif is_rank0():  # evaluation: rank 0 alone
                logger.info("== FFCL evaluate on %s (%d images, once, bootstrap 95%% CIs)", step.split,
                            _split_size(datalist, str(step.split)))
                metrics = exp.step(name, _run_step, step.files,
                                   {**step.overrides, **exp.step_overrides(name, checkpoint=best)}, "metrics.json")
                exp.metrics.update(flat_metrics(metrics, f"{step.split}_"))
                exp.add_artifacts([Path(metrics), Path(metrics).parent / "roc.png",
                                   Path(metrics).parent / "reliability.png"], name)
        barrier()
    summary = json.loads((out / "summary.json").read_text()) if is_rank0() else {"output_dir": str(out)}
    if is_rank0():
        from ffcl_monai.redaction import redact_uri

        logger.info("== FFCL pipeline done in %.0f s: %s/summary.json; MLflow: mlflow ui --backend-store-uri %s",
                    summary["wall_s"], out, redact_uri(exp.tracking_uri))
    return summary


def _run_step(files: Sequence[str], overrides: Mapping[str, Any], result: str, required: bool = False) -> str:
    """Run one bundle step; return the path of its ``result`` file in its output folder (checked when ``required``)."""
    runner.run(files, overrides)
    path = Path(overrides["output_dir"]) / result
    if required and not path.is_file():
        raise RuntimeError(f"the step finished without writing {path}")
    return str(path)


def refuse_without_workflow_name() -> None:
    """``run`` of ffcl.yaml alone: the pipeline needs the FFCL program, which MONAI starts with ``--workflow_name``."""
    from ffcl_monai.errors import UserInputError

    raise UserInputError(
        "ffcl.yaml is the FFCL pipeline's keys, run by the FFCL program: add "
        "`--workflow_name ffcl_monai.workflows.ffcl.FFCLWorkflow` to the command (python -m monai.bundle run "
        "--workflow_name ffcl_monai.workflows.ffcl.FFCLWorkflow --config_file \"['bundle/configs/train.yaml',"
        "'bundle/configs/ffcl.yaml']\" ...), or call ffcl_monai.workflows.ffcl.run_ffcl from Python."
    )


class FFCLWorkflow(ConfigWorkflow):
    """``--workflow_name`` target: MONAI constructs it with the command's config files and every ``--key value``, and
    calls ``initialize``, ``run``, ``finalize``. ``run`` is :func:`run_ffcl` with exactly those keys."""

    def __init__(self, config_file: str | Sequence[str], meta_file: str | Sequence[str] | None = None,
                 logging_file: str | None = None, init_id: str = "initialize", run_id: str = "run",
                 final_id: str = "finalize", tracking: Any = None, workflow_type: str | None = "train",
                 properties_path: Any = None, **override: Any) -> None:
        if tracking is not None:
            raise ValueError("--tracking is not used by the FFCL pipeline: every step logs to MLflow already.")
        super().__init__(config_file=config_file, meta_file=meta_file, logging_file=logging_file, init_id=init_id,
                         run_id=run_id, final_id=final_id, workflow_type=workflow_type,
                         properties_path=properties_path, **override)
        self.config_files = [str(f) for f in ensure_tuple(config_file)]
        self.overrides = dict(override)
        self.summary: dict[str, Any] | None = None

    def initialize(self) -> Any:
        # The entry config's own `initialize` (claim, store, resolved config) belongs to single workflows; the
        # program's Experiment does that for the pipeline folder, and every step does it for its own.
        self._is_initialized = True
        return None

    def run(self) -> Any:
        self.summary = run_ffcl(self.config_files, self.overrides)
        return self.summary

    def finalize(self) -> Any:
        from ffcl_monai.data.distributed import teardown

        teardown()
        return None
