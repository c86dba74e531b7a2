"""MLflow, built in: a default SQLite store under ``output_dir``, an up-front reachability check, and logging that
never kills a week-long run.

- :func:`tracking_uri`: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<output_dir>/mlruns.db`` (MONAI 1.6.1 and
  MLflow 3 reject file stores).
- :func:`check_tracking`: called from each config's ``initialize``; an unreachable server fails the run at start,
  with the URI and the fix, instead of after the first epoch.
- :class:`SafeMLFlowHandler`: MONAI's ``MLFlowHandler`` whose logging calls warn and continue when the store fails
  mid-run (local copies of everything stay in ``output_dir``), that can open its run as a child of a parent run
  (pipelines, ablations), and that steps aside when ``--tracking mlflow`` attached MONAI's own handler too.
- :func:`run_logger`: the MLflow handler that logs an engine's run, for handlers that add to that run (the embedding
  monitor, the model logger).
- :func:`log_report`: one call that logs params, metrics and artifacts to a (possibly nested) run, used by the
  evaluate workflow and by pipelines.
- :func:`~ffcl_monai.redaction.redact_uri` (re-exported here): the one redaction of credentials (``user:password@``,
  ``?token=...``) applied to every URI or message this module prints, raises or logs, and to MLflow params.
- :func:`artifact_location`: every experiment the project creates in a local SQLite store keeps its artifacts in
  ``mlruns/`` next to the store (under ``output_dir``), as MONAI's handler does, never in ``<cwd>/mlruns``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from ffcl_monai.redaction import has_credentials, redact_uri

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
#: MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses, and shows the GenAI
#: (traces) view for an experiment with no runs yet. The project's experiments are model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tag_experiment_kind(client: Any, experiment_id: str) -> None:
    """Mark the experiment as model training (:data:`EXPERIMENT_KIND`) unless someone already set a kind."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

def artifact_location(uri: str) -> str | None:
    """Artifact root of a new experiment: ``<store folder>/mlruns`` (a file URI) for a local SQLite store, else None
    (a tracking server decides).

    Without it MLflow puts artifacts of a SQLite-backed experiment in ``<cwd>/mlruns``, outside ``output_dir``. The
    path is the one MONAI's ``MLFlowHandler`` uses, so runs of every workflow of one store share one folder.
    """
    if not isinstance(uri, str) or not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    return (db_path.parent / "mlruns").absolute().as_uri()


def experiment_id(client: Any, name: str, uri: str) -> str:
    """Id of experiment ``name``, created with :func:`artifact_location` when it does not exist yet."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # another process (rank, pipeline step) created it in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def tracking_uri(output_dir: str | os.PathLike) -> str:
    """The tracking URI runs use: ``MLFLOW_TRACKING_URI`` or a SQLite store in ``output_dir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # Only a name: the folder is created by the run's claim on it (workflows.ownership), before the store itself.
    return f"sqlite:///{Path(output_dir).resolve() / 'mlruns.db'}"


def check_tracking(uri: str, timeout_s: float = 10.0) -> str:
    """Fail fast, with a clear message, when the tracking store cannot be used. Returns the URI.

    Also prints the ``mlflow ui`` command for local stores so that users know where to look.

    Credentials in the URI (``user:password@``, ``?token=``) never appear in its messages (:func:`redact_uri`); they
    are accepted with a warning that recommends MLflow's ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` /
    ``MLFLOW_TRACKING_TOKEN`` variables, and MLflow's own "View run at <URI>" lines are switched off for such a URI.

    Under torchrun only rank 0 checks (and so creates a SQLite store): concurrent creation of one store races in its
    schema migration; the other ranks wait at the config's ``ranks_ready`` barrier.
    """
    import mlflow

    from ffcl_monai.data.distributed import is_rank0

    if not is_rank0():
        return uri

    shown = redact_uri(uri)
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"MLflow tracking URI {shown!r} is a file store, which MLflow 3 / MONAI 1.6.1 reject. Use "
            "sqlite:///path/mlruns.db or an http(s) server (set `tracking_uri` or MLFLOW_TRACKING_URI)."
        )
    if has_credentials(uri):
        # MLflow prints "View run at <tracking URI>/#/..." after each run, credentials included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        logger.warning(
            "the MLflow tracking URI %s carries credentials; this project redacts them from its messages, logs, files and "
            "MLflow params, but a command line is visible to other users of the machine (ps). Prefer MLFLOW_TRACKING_URI "
            "without credentials plus MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN.",
            shown,
        )
    if uri.startswith(("http://", "https://")):
        # A short timeout and no long retry loop: the user should learn at once that the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        if tracking_started():  # a later step of a pipeline: tracking worked before, training goes on without it
            _warn(f"tracking check of {shown}", e)
            return uri
        raise RuntimeError(
            f"cannot reach the MLflow tracking store {shown!r}: {type(e).__name__}: {redact_uri(str(e))}. Start the "
            "server, fix MLFLOW_TRACKING_URI / `tracking_uri`, or unset it to use the local SQLite store under "
            "output_dir."
        ) from None
    if uri.startswith("sqlite:///"):
        logger.info("MLflow store: %s  (view with: mlflow ui --backend-store-uri %s)", shown, shown)
    return uri


def _warn(what: str, e: Exception) -> None:
    warnings.warn(
        f"MLflow {what} failed ({type(e).__name__}: {redact_uri(str(e))}); training continues, local copies are in "
        "output_dir."
    )


# Whether tracking has worked once in this process (a handler started a run, or a pipeline opened its parent run).
# From then on an MLflow failure never stops training: it warns, and the run continues with its local copies
# (history.jsonl, reports, checkpoints in output_dir). Before that, an unreachable store fails fast.
_TRACKING: dict[str, bool] = {"started": False}


def tracking_started() -> bool:
    """True once tracking has worked in this process (see :data:`_TRACKING`)."""
    return _TRACKING["started"]


# Runs started by SafeMLFlowHandler in this process and not closed yet (run id -> client). A run that a crash,
# Ctrl-C or a scheduler's SIGTERM ends is marked FAILED / KILLED at exit instead of staying RUNNING in the UI forever.
_OPEN_RUNS: dict[str, Any] = {}
_EXIT_STATUS: dict[str, Any] = {"status": "FAILED", "hooks_installed": False}


def _end_open_runs() -> None:
    for run_id, client in list(_OPEN_RUNS.items()):
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, _EXIT_STATUS["status"])
        except Exception:  # the store may be gone at exit; nothing more to do
            pass
    _OPEN_RUNS.clear()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit unwinds like an error: finally blocks and engine exception handlers run, background checkpoint
    # writes finish (non-daemon threads), then the atexit hook marks the open runs KILLED.
    _EXIT_STATUS["status"] = "KILLED"
    raise SystemExit(128 + signum)


def _watch_run(run_id: str, client: Any) -> None:
    if not _EXIT_STATUS.get("hooks_installed"):
        atexit.register(_end_open_runs)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        _EXIT_STATUS["hooks_installed"] = True
    _OPEN_RUNS[run_id] = client


def mlflow_handlers(engine: Engine) -> list[MLFlowHandler]:
    """The MLflow handlers attached to ``engine`` (MONAI's own and :class:`SafeMLFlowHandler`), each once."""
    found: list[MLFlowHandler] = []
    for handlers in engine._event_handlers.values():
        for func, *_ in handlers:
            owner = getattr(func, "__self__", None)
            if isinstance(owner, MLFlowHandler) and owner not in found:
                found.append(owner)
    return found


def run_logger(engine: Engine) -> MLFlowHandler | None:
    """The MLflow handler that logs ``engine``'s run: not one that stepped aside for MONAI's own (``--tracking
    mlflow``); among the others, the first with an open run, else the first."""
    active = [h for h in mlflow_handlers(engine) if not getattr(h, "_stepped_aside", False)]
    return next((h for h in active if h.cur_run), active[0] if active else None)


def _log_batch(client: Any, run_id: str, metrics: Sequence[Any], params: Sequence[Any] = ()) -> None:
    """``client.log_batch`` in chunks of MLflow's limit of 1000 metrics per call (params go with the first)."""
    for i in range(0, max(len(metrics), 1), 1000):
        client.log_batch(run_id, metrics=list(metrics[i : i + 1000]), params=list(params) if i == 0 else [], tags=[])


class SafeMLFlowHandler(MLFlowHandler):
    """``monai.handlers.MLFlowHandler`` that never lets tracking kill training once it has started.

    The first start fails fast (an unreachable store at start is a configuration error, best learnt at once). After
    tracking has worked once in the process (:func:`tracking_started`) or for a step of a pipeline (``parent_run_id``),
    any MLflow failure (a logging call, the evaluator's start at a later validation, closing the run) warns once and
    switches this handler off; training finishes with its local copies in ``output_dir``.

    Args:
        parent_run_id: open the run as a child of this run (one parent per pipeline or ablation).
        iteration_flush_secs: per-iteration values are written in one batch this often and at each epoch end
            (a store write per iteration would cost as much as a GPU step).
        *args, **kwargs: as ``MLFlowHandler``.
    """

    def __init__(
        self, *args: Any, parent_run_id: str | None = None, iteration_flush_secs: float = 30.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.parent_run_id = parent_run_id
        self.iteration_flush_secs = iteration_flush_secs
        self._stepped_aside = False
        self._offline = False  # MLflow failed after tracking had started: this run continues without it
        self._iteration_logging = False
        self._buffer: list[Any] = []  # per-iteration metrics not yet written
        self._last_flush = time.monotonic()

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._step_aside_if_duplicated)

    def iteration_completed(self, engine: Engine) -> None:
        # A store write per iteration costs ~20 ms (SQLite), as long as a whole GPU step, and an asynchronous queue
        # still spends that time in Python under the GIL. Per-iteration values are therefore kept (each with its own
        # step) and written in one batch every `iteration_flush_secs` and at the end of each epoch.
        self._iteration_logging = True
        try:
            super().iteration_completed(engine)
        finally:
            self._iteration_logging = False
        if time.monotonic() - self._last_flush >= self.iteration_flush_secs:
            self._flush()

    def epoch_completed(self, engine: Engine) -> None:
        self._flush()
        super().epoch_completed(engine)

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer or not self.cur_run or self._silent:
            return
        batch, self._buffer = self._buffer, []
        try:
            _log_batch(self.client, self.cur_run.info.run_id, batch)
        except Exception as e:
            self._go_offline("metric logging", e)

    def _step_aside_if_duplicated(self, engine: Engine) -> None:
        # `--tracking mlflow` appends MONAI's own MLFlowHandler to the same engine; two handlers would log every
        # value twice into the same run, so this one yields to it.
        self._stepped_aside = any(not isinstance(h, SafeMLFlowHandler) for h in mlflow_handlers(engine))

    @property
    def _silent(self) -> bool:
        return self._stepped_aside or self._offline

    def _go_offline(self, what: str, e: Exception) -> None:
        """After tracking has started, an MLflow failure ends this handler's logging, never the training."""
        self._offline = True
        self._buffer = []
        warnings.warn(
            f"MLflow {what} failed ({type(e).__name__}: {redact_uri(str(e))[:300]}); tracking stops for this run and "
            "training continues. Everything stays in output_dir: history.jsonl, the reports, the checkpoints."
        )

    def start(self, engine: Engine) -> None:
        if self._silent:
            return
        try:
            if not self.cur_run and self.parent_run_id:
                self._set_experiment()
                name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
                runs = self.client.search_runs(
                    self.experiment.experiment_id,
                    filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.run_name = '{name}'",
                )
                runs = [r for r in runs if r.info.status != self.run_finish_status]
                self.cur_run = runs[0] if runs else self.client.create_run(
                    self.experiment.experiment_id, run_name=name, tags={PARENT_TAG: self.parent_run_id}
                )
            super().start(engine)
            if self.cur_run:
                _watch_run(self.cur_run.info.run_id, self.client)
                tag_experiment_kind(self.client, self.cur_run.info.experiment_id)
            _TRACKING["started"] = True
        except Exception as e:
            if tracking_started() or self.parent_run_id:  # e.g. the evaluator's start at a later validation
                self._go_offline("starting or resuming the run", e)
                return
            uri = os.environ.get("MLFLOW_TRACKING_URI") or getattr(self.client, "tracking_uri", "?")
            # `from None`: the original exception repeats the URI, credentials included
            raise RuntimeError(
                f"MLflow could not start a run at {redact_uri(str(uri))}: {type(e).__name__}: {redact_uri(str(e))}"
            ) from None

    def _log_params(self, params: dict[str, Any]) -> None:
        if self._silent:
            return
        try:
            super()._log_params({k: redact_uri(str(v)) for k, v in params.items()})
        except Exception as e:
            self._go_offline("param logging", e)

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._silent:
            return
        try:
            if self._iteration_logging and self.cur_run:
                import mlflow

                ts = int(time.time() * 1000)
                self._buffer += [mlflow.entities.Metric(k, v, ts, step or 0) for k, v in flatten_dict(metrics).items()]
            else:
                super()._log_metrics(metrics, step)
        except Exception as e:
            self._go_offline("metric logging", e)

    def complete(self) -> None:
        if self._silent:
            return
        try:
            super().complete()
        except Exception as e:
            self._go_offline("artifact logging", e)

    def close(self) -> None:
        self._flush()
        if self.cur_run:
            _OPEN_RUNS.pop(self.cur_run.info.run_id, None)
        if self._offline:
            return
        try:
            super().close()
        except Exception as e:
            self._go_offline("closing the run", e)


def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_params(v, key + "."))
        else:
            out[key] = redact_uri(str(v))[:500]  # no credentials in params; MLflow caps param values
    return out


def log_report(
    uri: str,
    experiment_name: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    artifacts: Sequence[str | os.PathLike] = (),
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Log a finished result (params, metrics, files) as one MLflow run; warn instead of failing.

    Returns:
        the run id, or None when logging failed (the files stay in output_dir).
    """
    import math

    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp_id = experiment_id(client, experiment_name, uri)
        all_tags = {k: redact_uri(str(v)) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        ts = int(time.time() * 1000)
        metric_objs = [
            mlflow.entities.Metric(k, float(v), ts, 0)
            for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not math.isnan(float(v))
        ]
        param_objs = [mlflow.entities.Param(k, v) for k, v in _flat_params(params or {}).items()]
        _log_batch(client, run_id, metric_objs, param_objs)
        for path in artifacts:
            if path and os.path.exists(path):
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as e:
        _warn("report logging", e)
        return None


def open_parent_run(
    uri: str, experiment_name: str, run_name: str, run_id: str | None = None, parent_run_id: str | None = None
) -> str | None:
    """Reopen the parent run ``run_id`` of a resumed pipeline/ablation, or create a new one; warn instead of failing.

    Args:
        uri, experiment_name: MLflow target.
        run_name: name of a new parent run.
        run_id: the parent run of an earlier invocation, reopened (status RUNNING) if it still exists.
        parent_run_id: nest the new parent run under this run.

    Returns:
        the run id, or None when MLflow is unavailable (the steps then log as top-level runs).
    """
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id:
            try:
                client.update_run(run_id, status="RUNNING")
                _TRACKING["started"] = True
                return run_id
            except Exception:  # the store was deleted: open a new parent run
                pass
        exp_id = experiment_id(client, experiment_name, uri)
        tags = {PARENT_TAG: parent_run_id} if parent_run_id else {}
        run = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        _TRACKING["started"] = True
        return run
    except Exception as e:
        _warn("opening the parent run", e)
        return None


def close_parent_run(
    uri: str,
    run_id: str | None,
    status: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    artifacts: Sequence[tuple[str | os.PathLike, str | None]] = (),
) -> None:
    """Finish a parent run opened by :func:`open_parent_run`: add the params it does not have yet, the final metrics
    (NaN skipped) and ``(file, artifact folder)`` pairs that exist, then set ``status``; warn instead of failing."""
    if not run_id:
        return
    import math

    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        ts = int(time.time() * 1000)
        new_params = [mlflow.entities.Param(k, v) for k, v in _flat_params(params or {}).items()
                      if k not in run.data.params]
        mets = [mlflow.entities.Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()
                if not math.isnan(float(v))]
        _log_batch(client, run_id, mets, new_params)
        for path, folder in artifacts:
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), artifact_path=folder)
        client.set_terminated(run_id, status)
    except Exception as e:
        _warn("finishing the parent run (results stay in output_dir)", e)
