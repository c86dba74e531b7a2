"""Multi-process training on CPU (gloo), as CI can run it: the multi_gpu overlays under `torchrun --nproc_per_node=2`,
NT-Xent's all-gather against the single-process loss, and the per-rank helpers.

The torchrun runs go through a small launcher that records every ``torch.save`` call with the calling rank, so
"only rank 0 writes checkpoints" is checked on what actually happened, not on the config.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, make_2d

TORCHRUN_TIMEOUT = 600
TINY = ["--image_size", "[32,32]", "--backbone", "resnet10", "--batch_size", "4", "--amp", "false"]

LAUNCHER = textwrap.dedent(
    """
    # Records (rank, path) of every torch.save, then runs `python -m monai.bundle ...` with the remaining arguments.
    import json, os, runpy, sys
    import torch

    _save = torch.save
    log = os.path.join(os.environ["SAVE_LOG_DIR"], "saves_rank%s.jsonl" % os.environ.get("RANK", "0"))

    def recording_save(obj, f, *args, **kwargs):
        with open(log, "a") as fh:
            fh.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "path": str(f)}) + "\\n")
        return _save(obj, f, *args, **kwargs)

    torch.save = recording_save
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__")
    """
)


def _torchrun(tmp: Path, configs: list[str], args: list[str]) -> subprocess.CompletedProcess:
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nnodes=1", "--nproc_per_node=2",
        str(launcher), "run", "--config_file", json.dumps([str(CONFIGS / c) for c in configs]),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"), *args,
    ]
    env = {**os.environ, "SAVE_LOG_DIR": str(tmp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def _saves(tmp: Path) -> list[dict]:
    rows = []
    for f in tmp.glob("saves_rank*.jsonl"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def _runs(output_dir: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlruns.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


# ------------------------------------------------------------------------------------------------------------------
# torchrun: tiny SimCLR and FFCL workflows, 2 CPU processes
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data2d(tmp_path_factory) -> Path:
    return make_2d(tmp_path_factory.mktemp("mg2d"), counts=(16, 6, 6))


def test_torchrun_simclr_two_ranks(data2d, tmp_path):
    out = tmp_path / "simclr"
    _torchrun(tmp_path, ["train.yaml", "pretrain_simclr.yaml", "multi_gpu_train.yaml"],
              ["--datalist", str(data2d), "--output_dir", str(out), "--max_epochs", "2", *TINY])
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    assert ckpt["epochs"] == 2 and ckpt["method"] == "simclr"
    saves = _saves(tmp_path)
    assert saves and {s["rank"] for s in saves} == {0}, saves  # checkpoints written by rank 0 only
    runs = _runs(out)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run, from rank 0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # written once per epoch, not once per rank


@pytest.fixture(scope="module")
def ffcl_run(data2d, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mg_ffcl")
    out = tmp / "ffcl"
    _torchrun(tmp, ["train.yaml", "ffcl.yaml", "multi_gpu_train.yaml"],
              ["--workflow_name", "ffcl_monai.workflows.ffcl.FFCLWorkflow", "--datalist", str(data2d), "--output_dir", str(out), "--local_epochs", "1", "--global_epochs", "1",
               "--max_epochs", "1", *TINY])
    return tmp, out


def test_torchrun_ffcl_two_ranks(ffcl_run):
    tmp, out = ffcl_run
    for stage in ("stage1_local", "stage2_global"):
        assert torch.load(out / stage / "backbone.pt", weights_only=True)["stage"] == stage.split("_")[1]
    assert (out / "finetune" / "models" / "model.pt").is_file()  # the fine-tuned classifier
    saves = _saves(tmp)
    assert saves and {s["rank"] for s in saves} == {0}, saves


def test_torchrun_ffcl_mlflow_rank0_only(ffcl_run):
    _, out = ffcl_run
    runs = _runs(out)
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["ffcl:ffcl", "stage1_local", "stage2_global", "finetune", "evaluate_validation",
                            "evaluate_test"]), names  # one parent and one child per step, not one per rank
    parent = next(r for r in runs if r.info.run_name == "ffcl:ffcl")
    assert parent.info.status == "FINISHED" and "test_auc" in parent.data.metrics
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs if r is not parent)
    # the evaluate steps ran once, on rank 0, and wrote their reports
    assert json.loads((out / "evaluate_test" / "metrics.json").read_text())["metrics"]["auc"]["value"] >= 0.0


# ------------------------------------------------------------------------------------------------------------------
# NT-Xent with all-gather == single process on the concatenated batch (loss and gradients), 2 gloo processes
# ------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))


def _gather_worker(rank: int, world: int, port: int, x1: torch.Tensor, x2: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ffcl_monai.losses.ntxent import NTXentLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        b = x1.shape[0] // world
        model = DistributedDataParallel(_encoder())
        a1, a2 = x1[rank * b:(rank + 1) * b], x2[rank * b:(rank + 1) * b]
        z1, z2 = model(torch.cat([a1, a2])).split(b)
        z1.retain_grad()
        loss = NTXentLoss(temperature=0.2, gather_distributed=True)(z1, z2)
        loss.backward()
        out[rank] = {
            "loss": loss.detach(),
            "z1_grad": z1.grad.detach() / world,  # the gradient of the mean of the rank losses
            "params": [p.grad.detach().clone() for p in model.parameters()],  # DDP-averaged
        }
    finally:
        dist.destroy_process_group()


def test_ntxent_gather_two_ranks_equals_concatenated_batch():
    import torch.multiprocessing as mp

    from ffcl_monai.losses.ntxent import NTXentLoss

    world, b = 2, 5
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(world * b, 12, generator=g), torch.randn(world * b, 12, generator=g)
    out = mp.Manager().dict()
    mp.start_processes(_gather_worker, args=(world, _free_port(), x1, x2, out), nprocs=world, start_method="spawn")

    model = _encoder()
    z1, z2 = model(torch.cat([x1, x2])).split(world * b)
    z1.retain_grad()
    full = NTXentLoss(temperature=0.2)(z1, z2)
    full.backward()
    mean_loss = sum(out[r]["loss"] for r in range(world)) / world
    assert abs(float(mean_loss) - float(full.detach())) < 1e-5
    for r in range(world):
        torch.testing.assert_close(out[r]["z1_grad"], z1.grad[r * b:(r + 1) * b], atol=1e-5, rtol=0)
        for got, want in zip(out[r]["params"], [p.grad for p in model.parameters()]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# helpers, without processes
# ------------------------------------------------------------------------------------------------------------------
def test_partition_is_disjoint_equal_and_covers(monkeypatch):
    from ffcl_monai.data.distributed import partition

    data = [{"image": f"{i}.png"} for i in range(11)]
    parts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        parts.append([d["image"] for d in partition(data, seed=0)])
    assert {len(p) for p in parts} == {4}  # ceil(11 / 3): equal iterations per rank, as DDP needs
    assert set().union(*parts) == {d["image"] for d in data}
    assert len(set(parts[0]) & set(parts[1])) <= 1  # only padding repeats
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert partition(data) == data


def test_rank0_handlers_keep_training_logic_and_resume_loading(monkeypatch, tmp_path):
    from ignite.engine import Engine, Events

    from ffcl_monai.data.distributed import rank0_handlers
    from ffcl_monai.handlers.mlflow_tracking import SafeMLFlowHandler
    from ffcl_monai.handlers.checkpoint import BestModelSaver
    from ffcl_monai.handlers.training import NaNGuard, ResumeHandler

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    resume = ResumeHandler(tmp_path / "r.pt", net, opt)
    handlers = [NaNGuard(), resume, BestModelSaver(tmp_path / "m.pt", net),
                SafeMLFlowHandler(tracking_uri=f"sqlite:///{tmp_path}/x.db"), None]
    monkeypatch.setenv("RANK", "0")
    assert rank0_handlers(handlers) == handlers[:4]
    monkeypatch.setenv("RANK", "1")
    kept = rank0_handlers(handlers)
    assert len(kept) == 2 and kept[0] is handlers[0]
    engine = Engine(lambda e, b: None)
    kept[1].attach(engine)  # the resume loader only: nothing saved at epoch end
    assert engine.has_event_handler(resume.load, Events.STARTED)
    assert not engine.has_event_handler(resume.save, Events.EPOCH_COMPLETED)


def test_setup_outside_torchrun_names_the_launcher(monkeypatch):
    from ffcl_monai.data.distributed import setup

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        setup("gloo")
    with pytest.raises(ValueError, match="backend"):
        setup("mpi")


def test_overlays_parse_with_their_workflows():
    from monai.bundle import ConfigParser

    for files in (["train.yaml", "multi_gpu_train.yaml"],
                  ["train.yaml", "3d.yaml", "multi_gpu_train.yaml"],
                  ["train.yaml", "pretrain_simclr.yaml", "multi_gpu_train.yaml"],
                  ["train.yaml", "ffcl.yaml", "multi_gpu_train.yaml"]):
        parser = ConfigParser(ConfigParser.load_config_files([str(CONFIGS / f) for f in files]))
        assert parser["backend"] == "auto"
        assert "$ffcl_monai.data.distributed.teardown()" in parser["finalize"]
    parser = ConfigParser(ConfigParser.load_config_files(
        [str(CONFIGS / f) for f in ("train.yaml", "pretrain_simclr.yaml", "multi_gpu_train.yaml")]))
    assert parser["gather_distributed"] is True
