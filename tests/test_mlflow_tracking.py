"""MLflow: default SQLite store, fail fast on an unreachable server, warn-and-continue on mid-run failures."""

from __future__ import annotations

import socket
import time

import pytest
from ignite.engine import Events

from ffcl_monai.handlers.mlflow_tracking import SafeMLFlowHandler, check_tracking, log_report, tracking_uri


def test_default_store_is_sqlite_under_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:1"


def test_unreachable_server_fails_at_start_with_a_clear_message(monkeypatch):
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(RuntimeError, match=rf"cannot reach the MLflow tracking store 'http://127.0.0.1:{port}'"):
        check_tracking(f"http://127.0.0.1:{port}", timeout_s=3)
    assert time.time() - t0 < 60
    with pytest.raises(ValueError, match="file store"):
        check_tracking("/some/dir")


def test_logging_failure_mid_run_warns_and_continues(tmp_path):
    handler = SafeMLFlowHandler(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", experiment_name="e")

    class Broken:
        def log_batch(self, *a, **k):
            raise ConnectionError("server went away")

    handler.cur_run = type("R", (), {"info": type("I", (), {"run_id": "x"})()})()
    handler.client = Broken()
    with pytest.warns(UserWarning, match="training continues"):
        handler._log_metrics({"loss": 1.0}, step=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are skipped silently
        handler._log_params({"lr": 0.1})
        handler._log_metrics({"loss": 2.0}, step=2)


def test_log_report_creates_child_run(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    parent = log_report(uri, "exp", "parent", params={"a": 1})
    child = log_report(uri, "exp", "child", metrics={"auc": 0.9}, parent_run_id=parent,
                       artifacts=[str(_file(tmp_path / "m.json"))])
    run = mlflow.MlflowClient(uri).get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.metrics["auc"] == 0.9
    assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(child)] == ["m.json"]


def _file(p):
    p.write_text("{}")
    return p


def _tiny_engine(losses):
    from ignite.engine import Engine

    it = iter(losses)
    return Engine(lambda engine, batch: {"loss": next(it)})


@pytest.mark.parametrize("flush_secs", [1e9, 0.0])
def test_every_iteration_value_reaches_the_store_in_batches(tmp_path, flush_secs):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    losses = [float(i) for i in range(10)]
    engine = _tiny_engine(losses)
    handler = SafeMLFlowHandler(tracking_uri=uri, experiment_name="e", run_name="r", tag_name="train_loss",
                                output_transform=lambda out: out["loss"], iteration_flush_secs=flush_secs)
    writes = []
    handler.attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: writes.append(len(handler._buffer)))
    engine.run([0] * 5, max_epochs=2)
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("e").experiment_id])[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert history == [(i + 1, losses[i]) for i in range(10)]  # one point per iteration, each at its own step
    # flushed at each epoch end only, or at every iteration when the interval is 0
    assert writes == ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5] if flush_secs > 1 else [0] * 10)


def test_experiments_open_in_the_model_training_view(tmp_path):
    """MLflow 3's UI picks its view from the experiment kind tag; untagged experiments may open in the GenAI view."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    log_report(uri, "reports", "r", params={"a": 1})  # experiment created by the project's helpers
    handler = SafeMLFlowHandler(tracking_uri=uri, experiment_name="training", run_name="t",
                                output_transform=lambda out: out["loss"])
    engine = _tiny_engine([1.0])
    handler.attach(engine)
    engine.run([0], max_epochs=1)  # experiment created by MONAI's MLFlowHandler
    client = mlflow.MlflowClient(uri)
    for name in ("reports", "training"):
        assert client.get_experiment_by_name(name).tags.get("mlflow.experimentKind") == "custom_model_development"
