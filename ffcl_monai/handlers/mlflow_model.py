"""Log the trained classifier as an MLflow model at the end of training (MONAI's ``MLFlowHandler`` never logs one).

:class:`MLflowModelLogger` is attached to the trainer (``train.yaml``, key ``log_model``). When training completes,
on rank 0, it logs ``models/model.pt`` (the best checkpoint, final by then) with the inference workflow's
preprocessing as a pyfunc model (:mod:`ffcl_monai.serving.mlflow_pyfunc`) to the run of the trainer's MLflow handler,
and registers it as a new version of ``registered_model_name`` when that is set. Like every MLflow call in this
project, a failure warns and the run ends normally; ``models/model.pt`` stays in ``output_dir``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from ffcl_monai.handlers.mlflow_tracking import _warn, redact_uri, run_logger

logger = logging.getLogger(__name__)


class MLflowModelLogger:
    """At ``Events.COMPLETED``: log ``checkpoint`` as an MLflow pyfunc model to the trainer's MLflow run.

    List it before the MLflow handler in ``train#handlers`` (that handler closes the run at ``COMPLETED``); the run id
    is also remembered at every epoch end, so a run that was already closed still gets the model.

    Args:
        checkpoint: the best-model checkpoint (``{"model": state_dict}``), final when training completes.
        registered_model_name: also register the model under this name (a new version each run); None = only log.
        example_image: an image file (the first training image) whose downscaled pixels become the model's input
            example; None = no example.
        name: the logged model's name (``runs:/<run_id>/<name>``).
        spec: what the served model needs (:func:`~ffcl_monai.serving.mlflow_pyfunc.model_spec_from_config`); None =
            built from the running bundle config (``transforms_id``, ``network_id`` and the class keys).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        registered_model_name: str | None = None,
        example_image: str | os.PathLike | None = None,
        name: str = "model",
        spec: dict[str, Any] | None = None,
        transforms_id: str = "deterministic_transforms",
        network_id: str = "network_def",
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.registered_model_name = registered_model_name or None
        self.example_image = example_image
        self.name = name
        self.spec = spec
        self.spec_error: Exception | None = None
        self._run: tuple[Any, str] | None = None  # (client, run id) seen at the last epoch end
        if spec is None:
            try:
                from ffcl_monai.workflows.records import running_parser
                from ffcl_monai.serving.mlflow_pyfunc import model_spec_from_config

                parser = running_parser()
                if parser is None:
                    raise RuntimeError("no bundle config is being parsed; pass `spec`")
                self.spec = model_spec_from_config(parser, transforms_id, network_id)
            except Exception as e:  # told now, and again (as a skipped model) when training ends
                self.spec_error = e
                warnings.warn(f"the MLflow model will not be logged: {type(e).__name__}: {e}")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remember_run)
        engine.add_event_handler(Events.COMPLETED, self)

    def _remember_run(self, engine: Engine) -> None:
        handler = run_logger(engine)
        if handler is not None and handler.cur_run:
            self._run = (handler.client, handler.cur_run.info.run_id)

    def __call__(self, engine: Engine) -> None:
        from ffcl_monai.data.distributed import is_rank0

        if not is_rank0():
            return
        handler = run_logger(engine)
        if handler is not None and getattr(handler, "_offline", False):  # SafeMLFlowHandler after a store failure
            warnings.warn("the MLflow model was not logged: MLflow tracking stopped earlier in this run; "
                          "models/model.pt is in output_dir.")
            return
        if handler is not None and handler.cur_run:
            client, run_id = handler.client, handler.cur_run.info.run_id
        elif self._run is not None:
            client, run_id = self._run
        else:
            warnings.warn("the MLflow model was not logged: no MLflow run is attached to this trainer (add the "
                          "MLflow handler to train#handlers); models/model.pt is in output_dir.")
            return
        try:
            self._log(client, run_id)
        except Exception as e:
            _warn("model logging", e)

    def _log(self, client: Any, run_id: str) -> None:
        from ffcl_monai.serving.mlflow_pyfunc import input_example, log_classifier_model

        if self.spec_error is not None:
            raise self.spec_error
        uri = getattr(client, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI", "")
        example = None
        if self.example_image is not None:
            try:
                example = input_example(self.example_image, self.spec)
            except Exception as e:  # the model is still useful without an example
                logger.warning("no input example for the MLflow model (%s: %s)", type(e).__name__, e)
        info = log_classifier_model(uri, run_id, self.checkpoint, self.spec, example=example,
                                    registered_model_name=self.registered_model_name, name=self.name)
        registered = (f"; registered as {self.registered_model_name!r} version {info.registered_model_version}"
                      if self.registered_model_name else "")
        shown = (f"models:/{self.registered_model_name}/{info.registered_model_version}" if registered
                 else info.model_uri)
        print(f"MLflow model logged to run {run_id}: {info.model_uri}{registered}\n"
              f"  serve it: MLFLOW_TRACKING_URI={redact_uri(uri)} mlflow models serve -m {shown} --env-manager local "
              "-h 127.0.0.1 -p 5001", flush=True)
