"""Every long workflow resumes after ``kill -9``: one test per engine family (issue 14, item 4).

For each family the same seeded CPU command runs twice at once: uninterrupted into folder A (in the test's process,
which saves an interpreter start on 2 cores), and into folder B as a subprocess (``python -m monai.bundle run``) that
is killed with SIGKILL once epoch 1's resume checkpoint is on disk (so during epoch 2). B is then run again in a new
subprocess with ``--resume True`` (the FFCL program: the same command, no flag). The final weights (and the resume
checkpoint's optimizer state) and the final metrics of B must equal A's, and the resumed invocation must have trained
only the epochs that were left: a rerun that ignored the checkpoint and started over with the same seed would also
end on A's weights, so the tests check that too ("resumed at epoch 1" in its log, its history rows start at epoch 2).

Families: the classifier (MONAI ``SupervisedTrainer``), two-view SimCLR (+ the embedding monitor), auxiliary targets,
the FFCL local stage, Forward-Forward, and the FFCL program (state.json; killed in its global stage). Then unit
tests of the pieces these kills exposed. About 4 minutes on 2 CPU cores; ``make test-slow``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CONFIGS, REPO, cfg, make_2d, overrides_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# small and seeded; one torch thread per process: A and B run side by side on 2 cores
COMMON: dict[str, Any] = {"image_size": [16, 16], "backbone": "resnet10", "batch_size": 4, "max_epochs": 3, "seed": 5,
                          "progress": False, "monitor_interval": 0, "log_model": False, "n_bootstrap": 10,
                          "torch_threads": 1}
CKPT = Path("checkpoints") / "resume.pt"
RESUMED = re.compile(r"resumed at epoch (\d+)")
# wall-clock numbers (and any key ending in time_s), different in every run
NOT_COMPARED = {"run_id", "time", "wall_s", "seconds"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """48 training images of 16 x 16 (12 batches of 4 per epoch), 8 validation, 8 test; labels 0/1 alternate."""
    return make_2d(tmp_path_factory.mktemp("kill_resume_data"), counts=(48, 8, 8), size=16)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, copied into each output folder: creating one costs 2-3 s of CPU per run."""
    from ffcl_monai.handlers.mlflow_tracking import check_tracking

    path = tmp_path_factory.mktemp("kill_resume_store") / "mlruns.db"
    check_tracking(f"sqlite:///{path}")
    return path


def _cmd(configs: list[str], datalist: Path, out: Path, overrides: dict[str, Any], *extra: str,
         workflow_name: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if workflow_name:
        cmd += ["--workflow_name", workflow_name]
    return [*cmd, "--config_file", str(configs), "--meta_file", str(CONFIGS / "metadata.json"),
            "--logging_file", str(CONFIGS / "logging.conf"), "--datalist", str(datalist), "--output_dir", str(out),
            *overrides_cli({**COMMON, **overrides}), *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    rc = proc.wait(timeout=timeout)
    text = log.read_text()
    assert rc == 0, f"exit {rc}:\n{text[-4000:]}"
    return text


def _kill_after_first_epoch(proc: subprocess.Popen, ckpt: Path, log: Path, timeout: float = 300) -> int:
    """SIGKILL the run (its whole process group) once epoch 1's resume checkpoint exists; the epoch it holds."""
    deadline = time.time() + timeout
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    assert ckpt.exists(), f"no resume checkpoint at {ckpt} (exit {rc}):\n{log.read_text()[-4000:]}"
    assert rc == -signal.SIGKILL, f"the run ended by itself before it was killed (exit {rc})"
    return int(torch.load(ckpt, weights_only=True)["trainer"]["epoch"])


def _run_in_process(configs: list[str], datalist: Path, out: Path, overrides: dict[str, Any],
                    workflow_name: str | None) -> None:
    """The same command as :func:`_cmd`, run in this process (no second interpreter start on 2 cores)."""
    from monai.bundle import run

    from ffcl_monai.workflows.ownership import _CLAIMS, release_output_dir

    kw = {"workflow_name": workflow_name} if workflow_name else {}
    try:
        run(config_file=configs, meta_file=str(CONFIGS / "metadata.json"),
            logging_file=str(CONFIGS / "logging.conf"), datalist=str(datalist), output_dir=str(out),
            **{**COMMON, **overrides}, **kw)
    finally:
        for folder in [f for f in _CLAIMS if f == out.resolve() or out.resolve() in f.parents]:
            release_output_dir(folder)


def kill_and_resume(tmp_path: Path, store: Path, configs: list[str], datalist: Path, overrides: dict[str, Any],
                    ckpt: Path = CKPT, resume_args: tuple[str, ...] = ("--resume", "True"),
                    workflow_name: str | None = None) -> tuple[Path, Path, int, str]:
    """A uninterrupted (in this process) while B, a subprocess, is killed after epoch 1; then B resumed in a new
    subprocess. Returns A, B, the epoch of B's checkpoint when it was killed, and the resumed invocation's log."""
    a, b = tmp_path / "A", tmp_path / "B"
    for d in (a, b):
        d.mkdir()
        shutil.copy(store, d / "mlruns.db")
    t0 = time.time()
    pb = _start(_cmd(configs, datalist, b, overrides, workflow_name=workflow_name), tmp_path / "B.log")
    killed: dict[str, Any] = {}

    def kill() -> None:
        try:
            killed["epoch"] = _kill_after_first_epoch(pb, b / ckpt, tmp_path / "B.log")
        except BaseException as e:  # re-raised in the test's thread
            killed["error"] = e

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    try:
        _run_in_process(configs, datalist, a, overrides, workflow_name)
        killer.join(timeout=300)
    finally:
        if pb.poll() is None:
            os.killpg(pb.pid, signal.SIGKILL)
            pb.wait()
    if "error" in killed:
        raise killed["error"]
    t1 = time.time()
    log = tmp_path / "B.resumed.log"
    resumed = _finish(_start(_cmd(configs, datalist, b, overrides, *resume_args, workflow_name=workflow_name), log),
                      log)
    print(f"{tmp_path.name}: A + killed B {t1 - t0:.1f} s, resumed B {time.time() - t1:.1f} s, killed at epoch "
          f"{killed['epoch']}")
    return a, b, killed["epoch"], resumed


# ------------------------------------------------------------------------------------------------------- checks
def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{what}[{k}]: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}[{k}]: {a[k]} != {b[k]}"


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights in a resume checkpoint / ``models/model.pt`` (``model``) or a ``backbone.pt`` (``backbone``)."""
    ckpt = torch.load(path, weights_only=True)
    for key in ("model", "backbone"):
        if key in ckpt:
            return ckpt[key]
    return ckpt


def assert_same_files(a: Path, b: Path, *names: str | Path) -> None:
    """The same weights in each file; for a resume checkpoint also the same optimizer moments and LR schedule."""
    for name in names:
        assert_same_weights(_model_state(a / name), _model_state(b / name), str(name))
        ca, cb = (torch.load(d / name, weights_only=True) for d in (a, b))
        if "optimizer" in ca:
            for i, (sa, sb) in enumerate(zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values())):
                assert_same_weights(sa, sb, f"{name} optimizer state {i}")
            assert ca["trainer"] == cb["trainer"] and ca.get("lr_scheduler") == cb.get("lr_scheduler"), name


def history(out: Path, name: str = "history.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]


def assert_same_numbers(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    keys = {k for k, v in a.items()
            if isinstance(v, (int, float)) and k not in NOT_COMPARED and not k.endswith("time_s")}
    assert keys, what
    assert keys <= set(b), (what, sorted(keys - set(b)))
    diff = {k: (a[k], b[k]) for k in keys if abs(float(a[k]) - float(b[k])) > 1e-6}
    assert not diff, f"{what}: uninterrupted vs resumed {diff}"


def assert_resumed(b: Path, killed_at: int, log: str, max_epochs: int = 3, name: str = "history.jsonl") -> None:
    """The second invocation loaded the checkpoint and trained only the epochs left (not all of them again)."""
    assert [int(e) for e in RESUMED.findall(log)] == [killed_at], log[-3000:]
    if name:
        rows = history(b, name)
        last_run = rows[-1]["run_id"]
        epochs = [r["epoch"] for r in rows if r["run_id"] == last_run]
        assert epochs == list(range(killed_at + 1, max_epochs + 1)), rows


def assert_same_history(a: Path, b: Path, name: str = "history.jsonl") -> None:
    ha, hb = history(a, name), history(b, name)
    assert ha[-1]["epoch"] == hb[-1]["epoch"] == COMMON["max_epochs"]
    assert_same_numbers(ha[-1], hb[-1], f"{name}, last row")


# ------------------------------------------------------------------------------------------------------- tests
def test_classifier_resumes_exactly(tmp_path, store, data):
    """train.yaml: MONAI SupervisedTrainer + evaluator (best model by validation AUC)."""
    a, b, killed_at, log = kill_and_resume(tmp_path, store, cfg("train.yaml"), data, {})
    assert_resumed(b, killed_at, log)
    assert_same_files(a, b, CKPT, "models/model.pt")
    assert_same_history(a, b)


def test_simclr_resumes_exactly(tmp_path, store, data):
    """train.yaml + pretrain_simclr.yaml: the two-view engine, its random views, warm-up/cosine LR, and the embedding
    monitor (epochs 2 and 3: its kNN/probe numbers are in the last history row)."""
    a, b, killed_at, log = kill_and_resume(tmp_path, store, cfg("train.yaml", "pretrain_simclr.yaml"), data,
                                           {"batch_size": 8, "warmup_epochs": 1, "monitor_interval": 2,
                                            "monitor_plot": "none"})
    assert_resumed(b, killed_at, log)
    assert_same_files(a, b, CKPT, "backbone.pt")
    assert_same_history(a, b)


def test_auxiliary_resumes_exactly(tmp_path, store, data):
    """train.yaml + pretrain_aux.yaml: a metadata head (here the label field) on single augmented views."""
    a, b, killed_at, log = kill_and_resume(tmp_path, store, cfg("train.yaml", "pretrain_aux.yaml"), data,
                                           {"aux_heads": {"label": {"kind": "ce", "num_outputs": 2}}})
    assert_resumed(b, killed_at, log)
    assert_same_files(a, b, CKPT, "backbone.pt")
    assert_same_history(a, b)


def test_ffcl_local_stage_resumes_exactly(tmp_path, store, data):
    """train.yaml + ffcl.yaml + ffcl_local.yaml: the FFCL local stage (an Eq. 1 loss per block). The global stage
    (with its projection head) is killed and resumed inside the FFCL program below."""
    a, b, killed_at, log = kill_and_resume(tmp_path, store, cfg("train.yaml", "ffcl.yaml", "ffcl_local.yaml"), data,
                                           {"batch_size": 8, "local_epochs": 3})
    assert_resumed(b, killed_at, log)
    assert_same_files(a, b, CKPT, "backbone.pt")
    assert_same_history(a, b)


def test_forward_forward_resumes_exactly(tmp_path, store, data):
    """train.yaml + ff.yaml: the Forward-Forward engine on in-memory tensor batches (greedy, one layer per epoch,
    hard negatives, shifted images), then the test report."""
    ff = {"hidden": [512, 512, 512], "threshold": 512.0, "schedule": "greedy", "epochs": 1, "batch_size": 8,
          "max_shift": 1, "lr_schedule": "cosine", "val_source": "datalist"}
    a, b, killed_at, log = kill_and_resume(tmp_path, store, cfg("train.yaml", "ff.yaml"), data, ff)
    assert_resumed(b, killed_at, log, name="")
    assert_same_files(a, b, CKPT, "models/model.pt")
    ma, mb = (json.loads((d / "metrics.json").read_text())["metrics"] for d in (a, b))
    assert_same_numbers({k: v["value"] for k, v in ma.items()}, {k: v["value"] for k, v in mb.items()},
                        "metrics.json")


def test_ffcl_program_resumes_exactly(tmp_path, store, data):
    """The FFCL program (--workflow_name): killed in epoch 2 of its global stage (with a projection head), rerun with
    the same command: the finished local stage is skipped, the global stage resumes, fine-tuning and evaluation
    follow. ``max_epochs`` is the fine-tuning's: the stages run their own ``local_epochs`` / ``global_epochs``."""
    wf = "ffcl_monai.workflows.ffcl.FFCLWorkflow"
    over = {"batch_size": 8, "local_epochs": 1, "global_epochs": 3, "max_epochs": 1, "eval_splits": ["test"],
            "projection": "linear"}
    a, b, killed_at, log = kill_and_resume(tmp_path, store, cfg("train.yaml", "ffcl.yaml"), data, over,
                                           ckpt=Path("stage2_global") / CKPT, resume_args=(), workflow_name=wf)
    assert "stage1_local done earlier, skipped" in log
    assert_resumed(b / "stage2_global", killed_at, log)
    for step in ("stage1_local", "stage2_global"):
        assert_same_files(a / step, b / step, "backbone.pt")
    assert_same_files(a / "stage2_global", b / "stage2_global", CKPT)  # backbone + projection head, optimizer
    assert_same_history(a / "stage2_global", b / "stage2_global")
    assert_same_files(a, b, "finetune/models/model.pt")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["status"] == "FINISHED"
    assert_same_numbers(sa["metrics"], sb["metrics"], "summary.json metrics")


# ------------------------------------------------------------------------------- the pieces the kills exposed
def test_history_writer_drops_the_rows_a_resumed_run_trains_again(tmp_path):
    """Killed after writing epoch 2's row but before epoch 2's checkpoint (and mid-way through a row): the resumed
    run (from epoch 1) writes epochs 2 and 3 once each, and the curves still draw."""
    from ignite.engine import Engine, Events

    from ffcl_monai.handlers.history import HistoryWriter, read_rows

    path = tmp_path / "history.jsonl"
    path.write_text(json.dumps({"run_id": "old", "epoch": 1, "train_loss": 1.0}) + "\n"
                    + json.dumps({"run_id": "old", "epoch": 2, "train_loss": 0.5}) + "\n" + '{"run_id": "old", "ep')
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.1)})
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", 1))  # as ResumeHandler.load
    HistoryWriter(tmp_path, run_id="new").attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert [(r["run_id"], r["epoch"]) for r in read_rows(path)] == [("old", 1), ("new", 2), ("new", 3)]
    assert (tmp_path / "training_curves.png").is_file()


def test_forward_forward_cosine_schedule_survives_an_optimizer_load():
    """``optimizer.load_state_dict`` (ResumeHandler) replaces the param-group dicts; the per-iteration cosine of the
    Forward-Forward engine must set the rate of the groups the optimizer steps with, not of the replaced ones."""
    from ignite.engine import Events

    from ffcl_monai.engines.forward_forward import TensorBatches, create_ff_trainer
    from ffcl_monai.networks.forward_forward import FFNet

    torch.manual_seed(0)
    net = FFNet(16, 2, hidden=[8])
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    engine = create_ff_trainer(net, opt, lr_schedule="cosine", threshold=8.0)
    engine.add_event_handler(Events.STARTED, lambda e: opt.load_state_dict(opt.state_dict()))
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(opt.param_groups[0]["lr"]))
    engine.run(TensorBatches(torch.rand(8, 16), torch.arange(8) % 2, 4), max_epochs=2)
    assert seen[0] == pytest.approx(0.1) and seen[-1] < 0.05, seen


def test_tensor_batches_order_follows_the_epoch_seed():
    """EpochSeedHandler re-seeds the Forward-Forward batches (``set_rnd``): the same seed, the same order."""
    from monai.data.utils import set_rnd

    from ffcl_monai.engines.forward_forward import TensorBatches

    batches = TensorBatches(torch.arange(10.0)[:, None], torch.arange(10), 5, seed=0)
    set_rnd(batches, 7)
    first = [x.flatten().tolist() for x, _ in batches]
    list(batches)
    set_rnd(batches, 7)
    assert [x.flatten().tolist() for x, _ in batches] == first


def test_experiment_restarts_a_step_killed_before_its_first_resume_checkpoint(tmp_path):
    """A step killed after epoch 1 wrote its history row / best model but before its resume checkpoint reached the
    disk (it is written in the background) has nothing to resume from: the program's rerun starts it over, moving the
    partial results aside, instead of being refused for a folder with results."""
    from ffcl_monai.workflows.experiment import Experiment
    from ffcl_monai.workflows.ownership import claim_output_dir, overwritten_dirs, release_output_dir

    exp = Experiment(tmp_path / "exp", "ffcl")
    step = exp.step_dir("finetune")
    (step / "models").mkdir(parents=True)
    (step / "models" / "model.pt").write_bytes(b"partial")
    (step / "history.jsonl").write_text('{"epoch": 1}\n')
    keys = exp.step_overrides("finetune")
    assert (keys["resume"], keys["overwrite"]) == (False, True)
    claim_output_dir(step, resume=keys["resume"], overwrite=keys["overwrite"], kind="finetune")
    release_output_dir(step)
    assert not (step / "models" / "model.pt").exists() and len(overwritten_dirs(step)) == 1
    (step / "checkpoints").mkdir()
    (step / "checkpoints" / "resume.pt").write_bytes(b"")
    for name, expected in (("finetune", (True, False)), ("stage1_local", (False, False))):
        keys = exp.step_overrides(name)
        assert (keys["resume"], keys["overwrite"]) == expected, name
