"""Tracking never kills training after start: a real `mlflow server` is stopped mid-run (after the first epoch, and
at a stage boundary of the FFCL pipeline); the run warns once, finishes, and keeps its local copies. An unreachable
server at start still fails fast (tests/test_mlflow_tracking.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import FAST, REPO, cfg, make_2d, overrides_cli

pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a free loopback port with its own SQLite store and artifact folder."""

    def __init__(self, root: Path, artifacts: str = "--default-artifact-root") -> None:
        """``artifacts``: ``--default-artifact-root`` (clients write artifacts into the folder themselves) or
        ``--artifacts-destination`` (clients upload them through the server, as nodes of a cluster must)."""
        root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", artifacts, str(root / "art"),
             "--workers", "1"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(180):
            try:
                opener.open(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)


def _run(configs: list[str], out: Path, uri: str, **overrides) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
            "--meta_file", cfg("metadata.json")[0], "--output_dir", str(out), "--tracking_uri", uri]
    args += overrides_cli({**FAST, **overrides})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=800, env=env)


def _run_with_outage(tmp_path: Path, stop_when: Path, configs: list[str], out: Path, **overrides) -> str:
    """Run a workflow tracking to a real server that is killed as soon as ``stop_when`` exists; return its output."""
    server = MlflowServer(tmp_path / "server")
    done = threading.Event()

    def watch() -> None:
        while not stop_when.exists() and not done.is_set():
            time.sleep(0.05)
        server.stop()

    threading.Thread(target=watch, daemon=True).start()
    try:
        res = _run(configs, out, server.uri, **overrides)
    finally:
        done.set()
        server.stop()
    said = res.stdout + res.stderr
    assert res.returncode == 0, said[-4000:]
    return said


def test_server_lost_after_the_first_epoch_training_finishes(tmp_path):
    datalist = make_2d(tmp_path / "data", counts=(8, 4, 4))
    out = tmp_path / "run"
    # validation every 2 epochs: the server dies after epoch 1 (its resume checkpoint), before the evaluator's first
    # start at epoch 2
    said = _run_with_outage(tmp_path, out / "checkpoints" / "resume.pt", cfg("train.yaml"), out,
                            datalist=str(datalist), max_epochs=4, val_interval=2, log_model=False)
    assert "tracking stops for this run and training continues" in said
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines() if x.strip()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the local copy of every epoch
    assert "val_auc" in history[1] and "val_auc" in history[3]
    assert (out / "models" / "model.pt").is_file()


@pytest.mark.slow  # the whole FFCL program against a real server (~45 s); keeps `make test` near 13 min
def test_server_lost_at_a_stage_boundary_the_pipeline_finishes(tmp_path):
    datalist = make_2d(tmp_path / "data", counts=(8, 4, 4))
    out = tmp_path / "ffcl"
    # killed between the local stage and fine-tuning
    said = _run_with_outage(tmp_path, out / "stage1_local" / "backbone.pt", cfg("train.yaml", "ffcl.yaml"), out,
                            workflow_name="ffcl_monai.workflows.ffcl.FFCLWorkflow",
                            datalist=str(datalist), stages="local", local_epochs=1, max_epochs=1,
                            eval_splits=["test"], log_model=False)
    assert "training continues" in said
    summary = json.loads((out / "summary.json").read_text())
    assert "test_auc" in summary["metrics"]
    assert (out / "evaluate_test" / "metrics.json").is_file()
