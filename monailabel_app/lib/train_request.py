"""What a ``POST /train/<model>`` request may set: an allow-list of typed keys, nothing else.

MONAI Label's stock ``BundleTrainTask`` turns the request body into ``monai.bundle.run`` overrides, and bundle configs
evaluate ``$`` strings and instantiate ``_target_`` dicts: a request body is outside input and must never get there
(MONAI advisory GHSA-873f-pvrv-4x83). The same check runs twice:

- in the server process, before MONAI Label queues the job (:mod:`lib.server_guard`), so that a bad request gets a
  4xx answer instead of a 200 and a background failure;
- in the training process (:class:`lib.trainers.classifier.ClassifierTrainTask`), on the whole request MONAI Label
  assembled (server-side options + body), so that no other route into the task can bypass it.

Tracking URI, experiment and run names, run ids, checkpoint file names and GPU lists are never taken from a request:
the server's operator sets them (``--conf``/environment), and a URI may carry credentials.
"""

from __future__ import annotations

from typing import Any, Mapping

from ffcl_monai.workflows import untrusted
from ffcl_monai.workflows.untrusted import UntrustedInputError

#: The keys a client may send, with their types. ``multi_gpu`` is accepted for stock clients and always off.
TRAIN_FIELDS: dict[str, untrusted.Field] = {
    "max_epochs": untrusted.integer(1, 10_000),
    "val_split": untrusted.number(-1.0, 0.9),
    "device": untrusted.device(),
    "pretrained": untrusted.boolean(),
    "seed": untrusted.integer(0, 2**31 - 1),
    "multi_gpu": untrusted.boolean(),
}

#: Keys MONAI Label's stock train task reads that this app never takes from a request, and why.
SERVER_ONLY = {
    "tracking": "tracking is configured on the server",
    "tracking_uri": "the tracking URI is set on the server (it may carry credentials), never by a request",
    "tracking_experiment_name": "experiment names are set on the server",
    "tracking_run_name": "run names are set on the server",
    "run_id": "run ids are set on the server",
    "model_filename": "the checkpoint is chosen by the server's --conf model_path",
    "bundle_path": "the bundle is chosen by the server's --conf bundle_path",
    "gpus": "GPUs are chosen on the server",
    "force_multi_gpu": "multi-GPU training is not part of this app",
    "local_rank": "ranks are set by the training launcher",
}

#: Keys MONAI Label adds itself in the server process, not from the client: ``AsyncTask.run`` sets ``model`` and
#: ``bundle_path``, ``run_background_task`` sets ``gpus`` to ``"all"``, the training subprocess sets ``local_rank`` (the
#: guard refuses them in a client's body).
ADDED_BY_MONAILABEL = ("model", "bundle_path", "gpus", "local_rank")


def validate_train_params(params: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Typed values of a client's training parameters.

    Raises:
        UntrustedInputError: naming the key, for config syntax (``$``/``@``/``%``, ``_target_``), a server-only key, an
            unknown key or a wrong type.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise UntrustedInputError(f"{where}: the body must be a JSON object of training parameters.")
    for key, value in params.items():
        untrusted.refuse_config_syntax(value, str(key), where)
        if key in SERVER_ONLY:
            raise UntrustedInputError(f"{where}: `{key}` is not accepted: {SERVER_ONLY[key]}.")
    return untrusted.validate(params, TRAIN_FIELDS, where)


def validate_assembled_request(request: Mapping[str, Any], model_names: list[str]) -> dict[str, Any]:
    """The whole request as MONAI Label hands it to the train task: ``model`` + server options + client body."""
    model = request.get("model")
    if model not in model_names:
        raise UntrustedInputError(f"train request: unknown model {str(model)[:40]!r}; models: {model_names}.")
    if request.get("gpus", "all") != "all":
        raise UntrustedInputError(f"train request for {model}: `gpus` is not accepted: {SERVER_ONLY['gpus']}.")
    body = {k: v for k, v in request.items() if k not in ADDED_BY_MONAILABEL}
    return {"model": model, **validate_train_params(body, f"train request for {model}")}
