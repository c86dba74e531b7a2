"""Past one machine: two torchrun launchers joined by a c10d rendezvous (``--nnodes 2 --nproc_per_node 1``), as on two
nodes, gloo on CPU, logging to a real ``mlflow server`` as a cluster run must (docs/performance.md, "Several nodes").

Each "node" has its own working directory; both get the same ``output_dir``, as a shared filesystem would give them.
The workers run under a launcher (tests/test_multi_gpu.py's, which records ``torch.save`` calls) plus an audit hook
that records every file opened for writing, created, renamed or removed, with the global rank, so "only rank 0
writes" is checked on what happened. The launcher also records what :func:`ffcl_monai.data.distributed.setup`
returned and every :func:`~ffcl_monai.data.distributed.partition` (what each rank cached), with ``RANK`` and
``LOCAL_RANK``: on two nodes the global ranks are 0 and 1 while both local ranks are 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, make_2d, overrides_cli
from test_multi_gpu import LAUNCHER, _free_port, _saves
from test_tracking_outage import MlflowServer

pytestmark = pytest.mark.timeout(900)  # the two-node runs are marked slow; the device check is not

LAUNCH_TIMEOUT = 600
TINY = {"image_size": [32, 32], "backbone": "resnet10", "batch_size": 4, "amp": False, "n_bootstrap": 20}

# Prepended to test_multi_gpu's LAUNCHER (which then runs `python -m monai.bundle`).
RECORDER = textwrap.dedent(
    """
    import json, os, sys
    _rank, _local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    _out_root = os.path.realpath(os.environ["MN_OUTPUT_DIR"])
    _rec = open(os.path.join(os.environ["MN_RECORD_DIR"], "rank%d.jsonl" % _rank), "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _note(**row):
        if _rank and row["kind"] not in ("setup", "partition"):  # where a rank > 0 wrote from, for the message
            import traceback
            row["stack"] = ["%s:%d %s" % (f.filename, f.lineno, f.name) for f in traceback.extract_stack()[-10:-3]]
        _rec.write(json.dumps({"rank": _rank, "local_rank": _local, **row}) + "\\n")

    def _under_out(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
            return real == _out_root or real.startswith(_out_root + os.sep)
        except (TypeError, ValueError):
            return False  # a file descriptor

    def _audit(event, args):
        if event == "open":
            path, _, flags = args
            if isinstance(flags, int) and flags & _WRITE and _under_out(path):
                _note(kind="write", path=os.fsdecode(path))
        elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree", "sqlite3.connect"):
            # (os.makedirs(exist_ok=True) of a folder that is already there changes nothing)
            if args and _under_out(args[0]) and not (event == "os.mkdir" and os.path.isdir(args[0])):
                _note(kind=event, path=os.fsdecode(args[0]))

    sys.addaudithook(_audit)

    import ffcl_monai.data.distributed as _d
    _setup, _partition = _d.setup, _d.partition

    def setup(*a, **k):
        device = _setup(*a, **k)
        _note(kind="setup", device=str(device), group_rank=_d.env_rank(), world=_d.world_size())
        return device

    def partition(data, *a, **k):
        part = _partition(data, *a, **k)
        _note(kind="partition", items=[d["image"] for d in part], of=len(list(data)), world=_d.world_size())
        return part

    _d.setup, _d.partition = setup, partition
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), artifacts="--artifacts-destination")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def data2d(tmp_path_factory) -> Path:
    return make_2d(tmp_path_factory.mktemp("mn2d"), counts=(8, 4, 4))


def _two_nodes(tmp: Path, configs: list[str], out: Path, uri: str, args: list[str]) -> list[str]:
    """Run the bundle command under two torchrun launchers (one process each) that meet at a c10d rendezvous on a
    free loopback port; return each launcher's output. Every node has its own working directory, both the same
    ``output_dir``."""
    launcher = tmp / "launch.py"
    launcher.write_text(RECORDER + LAUNCHER)
    (tmp / "records").mkdir()
    endpoint, rdzv_id = f"127.0.0.1:{_free_port()}", f"mn-{uuid.uuid4().hex[:8]}"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rdzv_id,
        str(launcher), "run", "--config_file", json.dumps([str(CONFIGS / c) for c in configs]),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--output_dir", str(out), "--tracking_uri", uri, *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"SAVE_LOG_DIR": str(tmp / "records"), "MN_RECORD_DIR": str(tmp / "records"),
                "MN_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    procs = []
    for node in ("node0", "node1"):
        (tmp / node).mkdir()
        log = open(tmp / f"{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=tmp / node, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    deadline = time.time() + LAUNCH_TIMEOUT
    try:
        while any(p.poll() is None for p, _ in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):
                time.sleep(20)  # let the other node report the failure too, then stop it
                break
            time.sleep(0.5)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=30)
            log.close()
    said = [(tmp / f"{node}.log").read_text() for node in ("node0", "node1")]
    for p, _ in procs:
        assert p.returncode == 0, f"a launcher failed ({p.returncode}):\n" + "\n=====\n".join(s[-6000:] for s in said)
    return said


def _records(tmp: Path) -> list[dict]:
    rows = []
    for f in sorted((tmp / "records").glob("rank*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def _runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on the server"
    return client.search_runs([exp.experiment_id])


def _check_ranks_devices_and_writers(tmp: Path, data2d: Path, out: Path, said: list[str], steps: int) -> None:
    """``said``: the launchers' output; ``steps``: how many workflows of the run build a training set (one per stage
    and fine-tuning)."""
    logged = "\n".join(said)
    for rank in (0, 1):  # the process group's log line names both ranks
        assert f"process group gloo: rank {rank} of 2 (local rank 0) on cpu" in logged
    rows = _records(tmp)
    setups = [r for r in rows if r["kind"] == "setup"]
    # one process per node: global ranks 0 and 1, both local rank 0, the CPU device (cuda:<LOCAL_RANK> with GPUs)
    assert {(r["rank"], r["local_rank"], r["group_rank"], r["world"]) for r in setups} == {(0, 0, 0, 2), (1, 0, 1, 2)}
    assert {r["device"] for r in setups} == {"cpu"}
    # every step's cache partitions: the training set exactly once over the two ranks, none cached twice
    training = {str(data2d.parent / d["image"]) for d in json.loads(data2d.read_text())["training"]}
    parts = {0: [r for r in rows if r["kind"] == "partition" and r["rank"] == 0],
             1: [r for r in rows if r["kind"] == "partition" and r["rank"] == 1]}
    assert len(parts[0]) == len(parts[1]) == steps, parts
    for p0, p1 in zip(parts[0], parts[1]):
        assert p0["world"] == p1["world"] == 2 and p0["of"] == len(training)
        assert sorted(p0["items"] + p1["items"]) == sorted(training), (p0, p1)
    # only global rank 0 wrote into the shared output_dir (files, renames, removals, the MLflow/SQLite stores)
    writes = [r for r in rows if r["kind"] not in ("setup", "partition")]
    assert writes and {r["rank"] for r in writes} == {0}, [r for r in writes if r["rank"] != 0]
    saves = _saves(tmp / "records")
    assert saves and {s["rank"] for s in saves} == {0}, saves
    # nothing landed in the nodes' working directories; no local store, the server has the runs
    for node in ("node0", "node1"):
        assert not any((tmp / node).iterdir()), list((tmp / node).rglob("*"))
    assert not list(out.rglob("mlruns.db")) and not list(out.rglob("mlruns"))


@pytest.mark.slow
def test_simclr_on_two_nodes(server, data2d, tmp_path):
    out = tmp_path / "shared" / "simclr"
    t0 = time.time()
    said = _two_nodes(tmp_path, ["train.yaml", "pretrain_simclr.yaml", "multi_gpu_train.yaml"], out, server.uri,
               ["--datalist", str(data2d), *overrides_cli({**TINY, "max_epochs": 2, "experiment_name": "mn_simclr"})])
    print(f"SimCLR on two nodes: {time.time() - t0:.0f} s")
    _check_ranks_devices_and_writers(tmp_path, data2d, out, said, steps=1)
    import torch

    assert torch.load(out / "backbone.pt", weights_only=True)["epochs"] == 2
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]  # one row per epoch, not one per rank
    runs = _runs(server.uri, "mn_simclr")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in runs]
    assert "mlflow.parentRunId" not in runs[0].data.tags
    # artifacts went through the server (proxied), not into a folder every node would have to see
    assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:"), runs[0].info.artifact_uri
    import mlflow

    assert mlflow.MlflowClient(tracking_uri=server.uri).list_artifacts(runs[0].info.run_id)


@pytest.mark.slow
def test_ffcl_pipeline_on_two_nodes(server, data2d, tmp_path):
    out = tmp_path / "shared" / "ffcl"
    t0 = time.time()
    said = _two_nodes(tmp_path, ["train.yaml", "ffcl.yaml", "multi_gpu_train.yaml"], out, server.uri,
               ["--workflow_name", "ffcl_monai.workflows.ffcl.FFCLWorkflow", "--datalist", str(data2d),
                *overrides_cli({**TINY, "local_epochs": 1, "global_epochs": 1, "max_epochs": 1,
                                "experiment_name": "mn_ffcl"})])
    print(f"FFCL pipeline on two nodes: {time.time() - t0:.0f} s")
    # the stages and the fine-tuning each cached their rank's share
    _check_ranks_devices_and_writers(tmp_path, data2d, out, said, steps=3)
    assert (out / "finetune" / "models" / "model.pt").is_file()
    for step in ("stage1_local", "stage2_global", "finetune"):
        history = [json.loads(x) for x in (out / step / "history.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in history] == [1], (step, history)
    # one run tree on the server: the pipeline's parent run and one child per step, not one per rank
    runs = _runs(server.uri, "mn_ffcl")
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(["ffcl:ffcl", "stage1_local", "stage2_global", "finetune", "evaluate_validation",
                            "evaluate_test"]), names
    parent = next(r for r in runs if r.info.run_name == "ffcl:ffcl")
    assert parent.info.status == "FINISHED" and "test_auc" in parent.data.metrics
    assert "mlflow.parentRunId" not in parent.data.tags
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs if r is not parent)
    assert all(r.info.status == "FINISHED" for r in runs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parent_run_id"] == parent.info.run_id and summary["status"] == "FINISHED"


def test_gpu_device_comes_from_local_rank_not_global_rank(monkeypatch):
    """What the overlay's ``device`` (``setup(@backend)``) picks on a GPU node: ``cuda:<LOCAL_RANK>``. On the second of
    two 4-GPU nodes the process with global rank 5 is local rank 1; ``cuda:5`` would not exist there."""
    import torch
    import torch.distributed as dist
    from monai.bundle import ConfigParser

    from ffcl_monai.data import distributed

    parser = ConfigParser(ConfigParser.load_config_files(
        [str(CONFIGS / f) for f in ("train.yaml", "multi_gpu_train.yaml")]))
    assert parser.get("device") == "$ffcl_monai.data.distributed.setup(@backend)"
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the group exists: setup only picks the device
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup("gloo") == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]
