"""An experiment: a multi-step program (the FFCL pipeline, the ablation, the label-efficiency curve) that owns one
output folder for its whole lifetime.

What it owns, so that no program implements it again:

- **The folder**: an exclusive claim (:func:`ffcl_monai.workflows.ownership.claim_output_dir`) for the life of the
  process. A second program into the same folder is refused at once; an unrelated run into a folder that holds
  results is refused unless ``resume`` or ``overwrite``. The program itself is never refused: rerunning the same
  kind of experiment into its folder continues it (its ``state.json`` says what it is).
- **The state**: ``state.json`` (written atomically after every step) records each finished step with its result
  and wall time; :meth:`Experiment.step` skips a finished step on rerun and returns its recorded result. A step
  interrupted half-way is run again with ``resume`` set by the program (each bundle workflow resumes its epochs).
- **The MLflow parent run**: opened on entry (reopened on resume), closed on exit with FINISHED or FAILED, the
  program's params, final metrics and artifacts. Its id goes to every step as ``mlflow_parent_run_id``.
  Tracking failures after start warn and never stop the program (``handlers.mlflow_tracking``).
- **The summary**: ``summary.json`` with the metrics, per-step seconds and total wall time (summed over resumed
  invocations).

Under torchrun every rank runs the program; rank 0 alone claims the folder, writes the files and owns the parent
run (its id is broadcast).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ffcl_monai.data.distributed import broadcast_object, is_rank0
from ffcl_monai.handlers.mlflow_tracking import check_tracking, close_parent_run, open_parent_run, tracking_uri
from ffcl_monai.networks.checkpoints import atomic_write_text
from ffcl_monai.workflows.ownership import claim_output_dir, find_results

logger = logging.getLogger(__name__)

__all__ = ["Experiment", "STATE_FILE", "SUMMARY_FILE", "RESUME_FILES", "prune_resume_checkpoints"]

STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"

#: A training step's resume checkpoints (handlers/training.py ResumeHandler): two generations of model, optimizer
#: and engine state, three times a model's size each; needed only to continue an interrupted step.
RESUME_FILES: tuple[str, ...] = ("checkpoints/resume.pt", "checkpoints/resume.prev.pt")


def prune_resume_checkpoints(folder: str | os.PathLike) -> int:
    """Delete the resume checkpoints of every step under a FINISHED run's ``folder`` (the folder itself and its step
    sub-folders); the results (``models/model.pt``, ``backbone.pt``, reports, history) stay. Returns the bytes freed.

    A study or a many-seed ablation writes ~0.8 GB of them per ResNet-18 FFCL run (three steps x two generations),
    which fills a disk long before the results matter; a finished step is never resumed, so they are dead weight.
    """
    folder = Path(folder)
    freed = 0
    for step in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        for rel in RESUME_FILES:
            f = step / rel
            if f.is_file():
                freed += f.stat().st_size
                f.unlink()
    return freed


class Experiment:
    """Context manager owning ``output_dir`` for a multi-step program.

    Args:
        output_dir: the experiment's folder; each step writes into its own sub-folder.
        kind: what the program is (``"ffcl"``, ``"ablation"``, ``"label_efficiency"``); a rerun of the same kind into
            the folder continues it, another kind is refused unless ``resume``/``overwrite``.
        tracking_uri: MLflow store (default: ``MLFLOW_TRACKING_URI`` or ``sqlite:///<output_dir>/mlruns.db``).
        experiment_name: MLflow experiment.
        run_name: name of the parent run (default ``<kind>:<folder name>``).
        parent_run_id: nest this experiment's parent run under another (an ablation's variants).
        resume, overwrite: as the bundle keys of the same names, for a folder holding another program's results.

    Example::

        with Experiment(out, "ffcl", run_name="ffcl:x") as exp:
            ckpt = exp.step("stage1_local", run_stage, ...)
            exp.metrics.update(...)
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        kind: str,
        tracking_uri: str | None = None,
        experiment_name: str = "ffcl_monai",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir).resolve()
        self.kind = kind
        self._uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name or f"{kind}:{self.output_dir.name}"
        self.nest_under = parent_run_id
        self.resume = resume
        self.overwrite = overwrite
        self.state: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[Path, str | None]] = []
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._t0 = 0.0

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def tracking_uri(self) -> str:
        """The MLflow store of the experiment and all its steps."""
        if self._uri is None:
            self._uri = tracking_uri(self.output_dir)
        return self._uri

    def _earlier_state(self) -> dict[str, Any] | None:
        path = self.output_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except ValueError:
            return None
        if not isinstance(state, dict):
            return None
        # Recorded step results (checkpoint paths, ...) become overrides of later steps: a file's text must never
        # reach `$`-evaluation or instantiation in a bundle config.
        from ffcl_monai.workflows.untrusted import refuse_config_syntax

        refuse_config_syntax(state.get("done", {}), "done", f"{path}")
        return state

    def __enter__(self) -> Experiment:
        self._t0 = time.time()
        earlier = self._earlier_state()
        # The owner is never refused: the same program rerun into its folder continues where it stopped.
        own = earlier is not None and earlier.get("kind") == self.kind and not self.overwrite
        self.run_id = claim_output_dir(self.output_dir, resume=self.resume or own, overwrite=self.overwrite,
                                       kind=self.kind)
        if self.overwrite:
            earlier = None  # the claim moved it aside
        self.state = earlier if earlier and earlier.get("kind") == self.kind else {"kind": self.kind, "done": {}}
        self.state.setdefault("done", {})
        self.state.setdefault("seconds", {})
        if earlier is not None:
            logger.info("%s: continuing the %s experiment in %s (%d step(s) done)", self.run_name, self.kind,
                        self.output_dir, len(self.state["done"]))
        parent = None
        if is_rank0():
            check_tracking(self.tracking_uri)  # created under the claim; unreachable at start fails fast
            parent = open_parent_run(self.tracking_uri, self.experiment_name, self.run_name,
                                     self.state.get("parent_run_id"), self.nest_under)
        self.parent_run_id = broadcast_object(parent)
        self.state["parent_run_id"] = self.parent_run_id
        self.state["run_id"] = self.run_id
        self.save()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = "FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED")
        wall = time.time() - self._t0
        self.state["wall_s"] = float(self.state.get("wall_s", 0.0)) + wall
        self.state["status"] = status
        self.save()
        if not is_rank0():
            return
        close_parent_run(self.tracking_uri, self.parent_run_id, status, self.params,
                         {**self.metrics, "wall_s": self.state["wall_s"]}, self.artifacts)
        summary = {"kind": self.kind, "output_dir": str(self.output_dir), "status": status,
                   "parent_run_id": self.parent_run_id, "params": self.params, "metrics": self.metrics,
                   "seconds": self.state["seconds"], "wall_s": self.state["wall_s"]}
        atomic_write_text(self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))

    # ------------------------------------------------------------------------------------------------ steps
    def save(self) -> None:
        """Write ``state.json`` atomically (rank 0)."""
        if is_rank0():
            atomic_write_text(self.output_dir / STATE_FILE, json.dumps(self.state, indent=2, default=str))

    def done(self, name: str) -> bool:
        """Whether step ``name`` finished in this or an earlier invocation."""
        return name in self.state["done"]

    def result(self, name: str) -> Any:
        """What step ``name`` returned (recorded in ``state.json``)."""
        return self.state["done"][name]

    def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` as step ``name`` unless it finished earlier; record its JSON-able result and
        wall time. Returns the (recorded) result."""
        if self.done(name):
            logger.info("== %s: %s done earlier, skipped", self.run_name, name)
            return self.result(name)
        logger.info("== %s: %s", self.run_name, name)
        t0 = time.time()
        value = fn(*args, **kwargs)
        self.state["seconds"][name] = time.time() - t0
        self.state["done"][name] = value
        self.save()
        return value

    def step_dir(self, name: str) -> Path:
        """The sub-folder of step ``name``."""
        return self.output_dir / name

    def step_overrides(self, name: str, **extra: Any) -> dict[str, Any]:
        """The keys every bundle step of this experiment gets: its own folder, the shared store, the parent run, a
        run name, and how to treat what an earlier invocation left in the step's folder: ``resume`` when it left a
        resume checkpoint there, ``overwrite`` (results moved aside) when this experiment was started with
        ``overwrite`` or when the step was killed after writing results (its first history row, best model or
        backbone) but before its first resume checkpoint was on disk: there is nothing to resume from, it starts over."""
        sdir = self.step_dir(name)
        started = any((sdir / p).is_file() for p in RESUME_FILES)
        partial = not started and bool(find_results(sdir))
        return {"output_dir": str(sdir), "tracking_uri": self.tracking_uri, "mlflow_parent_run_id": self.parent_run_id,
                "run_name": name, "resume": started and not self.overwrite, "overwrite": self.overwrite or partial,
                **extra}

    def add_artifacts(self, paths: Sequence[str | os.PathLike], folder: str | None = None) -> None:
        """Files to attach to the parent run on exit (missing ones are skipped then)."""
        self.artifacts += [(Path(p), folder) for p in paths]

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params of the parent run (set on exit)."""
        self.params.update(params)
