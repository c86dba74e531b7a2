"""The resume checkpoint is a snapshot of the epoch end. Kill-and-resume of every engine family, with the same final
weights as an uninterrupted run: tests/test_kill_resume.py (slow)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import REPO, cfg, make_2d, overrides_cli

SETTINGS = {"image_size": [32, 32], "backbone": "resnet10", "batch_size": 4, "max_epochs": 3, "seed": 7}


def _cmd(datalist: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg("train.yaml")),
            "--datalist", str(datalist), "--output_dir", str(out), *overrides_cli(SETTINGS), *extra]


def _history(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_resume_checkpoint_is_a_snapshot_of_the_epoch_end(tmp_path):
    """Written in the background, the checkpoint still holds the weights of the epoch's end, not later ones."""
    from ignite.engine import Engine, Events

    from ffcl_monai.handlers.training import ResumeHandler

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "ckpt" / "resume.pt"
    handler = ResumeHandler(path, net, opt)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    seen = {}

    @engine.on(Events.EPOCH_COMPLETED)
    def change_weights_right_after_the_save(e):
        seen[e.state.epoch] = net.weight.detach().clone()
        with torch.no_grad():
            net.weight.add_(1.0)  # as the next optimizer step would, while the writer may still run

    engine.run([0], max_epochs=2)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["trainer"]["epoch"] == 2
    assert torch.equal(ckpt["model"]["weight"], seen[2])
    assert not list(path.parent.glob("*.tmp"))


def test_sigterm_marks_the_mlflow_run_killed_and_keeps_the_checkpoints(tmp_path):
    """A scheduler's SIGTERM (preemption, `scancel`, torchrun) ends the run cleanly: exit code 143, the MLflow run
    KILLED rather than RUNNING forever, the resume checkpoint complete and loadable."""
    import mlflow

    datalist = make_2d(tmp_path / "data", counts=(24, 4, 4))
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(datalist, out, "--max_epochs", "200"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    resume_ckpt = out / "checkpoints" / "resume.pt"
    deadline = time.time() + 600
    while not resume_ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert resume_ckpt.exists(), "the run did not finish an epoch"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["KILLED"]
    ckpt = torch.load(resume_ckpt, weights_only=True)
    assert ckpt["trainer"]["epoch"] >= 1
    assert not list((out / "checkpoints").glob("*.tmp"))
