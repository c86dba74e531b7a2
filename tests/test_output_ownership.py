"""One owner per output folder (``ffcl_monai.workflows.ownership``).

Cross-process cases run real ``sys.executable -c`` processes: flock locks belong to an open file description, so only
another process shows what a second run sees. The lock holder is mostly this test process (it already imported
torch/MONAI for ``owner.json``'s atomic write); the processes that get refused, or run as rank > 0, import only the
ownership module and answer in well under a second.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ffcl_monai.errors import OutputDirError, OutputDirHasResultsError, UserInputError
from ffcl_monai.workflows import ownership
from ffcl_monai.workflows.ownership import (
    claim_output_dir,
    current_claim,
    find_results,
    overwritten_dirs,
    release_output_dir,
    run_id_for,
)

CLAIM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ffcl_monai.workflows.ownership import claim_output_dir
    try:
        print(claim_output_dir(sys.argv[1], **json.loads(sys.argv[2])))
    except Exception as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    """
)

# Both racers say they are ready, wait for the starting gun, then claim and create the MLflow store as a config's
# `initialize` does (`run_id` claim, then check_tracking). Only the winner imports torch/MONAI (owner.json's atomic
# write, check_tracking's module), after its claim: the loser must be able to name it from the lock's record at once.
RACE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import mlflow
    from ffcl_monai.workflows.ownership import claim_output_dir

    out, go, ready, release, name = sys.argv[1:6]
    Path(ready).touch()
    while not os.path.exists(go):
        time.sleep(0.002)
    t0 = time.monotonic()
    try:
        claim_output_dir(out, kind=name)
        from ffcl_monai.handlers.mlflow_tracking import check_tracking, experiment_id, tracking_uri
        uri = check_tracking(tracking_uri(out))
    except Exception as e:
        print(f"REFUSED after {time.monotonic() - t0:.3f} s: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment_id(client, "race", uri), run_name=name)
    client.log_metric(run.info.run_id, "auc", 0.5)
    client.set_terminated(run.info.run_id)
    mlflow.set_tracking_uri(uri)
    print(f"WON {name} {len(mlflow.search_runs(search_all_experiments=True))}", flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:  # hold the folder until the other one is done
        time.sleep(0.02)
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MLFLOW_TRACKING_URI")}
    env.update(extra)
    return env


def _claim_elsewhere(folder: Path, timeout: float = 60, env: dict[str, str] | None = None,
                     **kwargs) -> subprocess.CompletedProcess:
    """``claim_output_dir(folder, **kwargs)`` in a fresh process: rc 0 and the run id, or rc 3 and the error."""
    return subprocess.run([sys.executable, "-c", CLAIM_SCRIPT, str(folder), json.dumps(kwargs)], capture_output=True,
                          text=True, timeout=timeout, env=env or _env(), cwd=folder.parent)


def _lock_is_free(folder: Path) -> bool:
    """Whether ``<folder>/.lock`` can be flocked now through a new open file description (also conflicts with this
    process's own claim)."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops a lock taken here
    return True


def _fake_results(folder: Path) -> dict[str, str]:
    """What a finished training leaves, plus an input (datalist) and the MLflow store, which must never move."""
    files = {
        "models/model.pt": "best model",
        "checkpoints/resume.pt": "resume state",
        "history.jsonl": '{"epoch": 1}\n',
        "config_resolved.json": "{}",
        "datalist.json": '{"training": []}',
        "mlruns.db": "store",
    }
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return files


@pytest.fixture(autouse=True)
def _single_process_env(monkeypatch: pytest.MonkeyPatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    yield
    for folder in list(ownership._CLAIMS):
        release_output_dir(folder)


# ------------------------------------------------------------------------------------------------------- (a)
def test_unrelated_claim_of_folder_with_results_is_refused_naming_both_fixes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    claim_output_dir(out, kind="train:run")  # the earlier run: claims, writes its results, ends
    files = _fake_results(out)
    assert release_output_dir(out)

    t0 = time.monotonic()
    proc = _claim_elsewhere(out, kind="train:run")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 20
    msg = proc.stderr
    assert "OutputDirHasResultsError" in msg
    assert str(out) in msg and "--resume True" in msg and "--overwrite True" in msg
    assert "models/model.pt" in msg and "history.jsonl" in msg
    for rel, text in files.items():  # nothing touched
        assert (out / rel).read_text() == text
    assert not (out / ".overwritten").exists()

    # the same refusal in-process is a user error, and it does not keep the folder locked
    with pytest.raises(OutputDirHasResultsError, match="--resume True.*--overwrite True"):
        claim_output_dir(out)
    assert isinstance(OutputDirHasResultsError("x"), UserInputError)
    assert current_claim(out) is None and _lock_is_free(out)


# ------------------------------------------------------------------------------------------------------- (b)
def test_resume_keeps_results_and_overwrite_moves_them_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    files = _fake_results(out)

    with pytest.raises(OutputDirError, match="Pass only one"):
        claim_output_dir(out, resume=True, overwrite=True)
    assert _lock_is_free(out)

    run_id = claim_output_dir(out, resume=True, kind="train:run")
    assert len(run_id) == 32 and run_id_for(out) == run_id
    for rel, text in files.items():
        assert (out / rel).read_text() == text
    assert json.loads((out / "owner.json").read_text())["run_id"] == run_id
    assert release_output_dir(out) and not (out / "owner.json").exists()

    claim_output_dir(out, overwrite="True", kind="train:run")  # a command-line string is accepted too
    (aside,) = overwritten_dirs(out)
    assert aside.parent == out / ".overwritten" and current_claim(out).moved_to == aside
    for rel in ("models/model.pt", "checkpoints/resume.pt", "history.jsonl", "config_resolved.json"):
        assert not (out / rel).exists()
        assert (aside / rel).read_text() == files[rel]
    for rel in ("datalist.json", "mlruns.db"):  # inputs and the MLflow store stay
        assert (out / rel).read_text() == files[rel]
    assert find_results(out) == []
    release_output_dir(out)

    claim_output_dir(out)  # started over: a plain claim is fine now
    (out / "history.jsonl").write_text("second run\n")
    release_output_dir(out)
    claim_output_dir(out, overwrite=True)  # a second overwrite keeps the first one's results too
    assert len(overwritten_dirs(out)) == 2
    assert (aside / "models" / "model.pt").read_text() == "best model"
    assert (overwritten_dirs(out)[-1] / "history.jsonl").read_text() == "second run\n"


# ------------------------------------------------------------------------------------------------------- (c)
def test_two_runs_started_together_one_wins_and_the_mlflow_store_is_intact(tmp_path: Path) -> None:
    out = tmp_path / "new_run"  # does not exist yet: both would create it and its mlruns.db
    go, release = tmp_path / "go", tmp_path / "release"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, str(out), str(go), str(ready[i]), str(release),
                          f"racer{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         cwd=tmp_path)
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 90
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline, "the racers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        go.touch()
        t_go = time.monotonic()
        while all(p.poll() is None for p in procs):  # the loser exits; the winner holds the folder until released
            assert time.monotonic() - t_go < 60, "neither racer finished"
            time.sleep(0.01)
        first_exit = time.monotonic() - t_go
        release.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        release.touch()
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 3], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    loser_err = outs[loser][1]
    assert "OutputDirInUseError" in loser_err and str(out) in loser_err
    assert f"racer{winner}" in loser_err and "another --output_dir" in loser_err  # names the holder and the fix
    assert float(loser_err.split("REFUSED after ")[1].split(" s")[0]) < 2.0  # refused at once, no waiting
    assert first_exit < 15
    assert f"WON racer{winner} 1" in outs[winner][0]

    uri = f"sqlite:///{out / 'mlruns.db'}"
    with sqlite3.connect(out / "mlruns.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert [r.info.run_name for r in runs] == [f"racer{winner}"] and runs[0].data.metrics["auc"] == 0.5
    # the fluent API too, through the project's scoped switch: a bare mlflow.set_tracking_uri would leave the URI (and
    # the MLFLOW_TRACKING_URI it exports) set for every later run of this test process
    from ffcl_monai.serving.mlflow_pyfunc import _tracking_uri as using_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    with using_tracking_uri(uri):
        assert list(mlflow.search_runs(search_all_experiments=True)["tags.mlflow.runName"]) == [f"racer{winner}"]
    assert os.environ.get("MLFLOW_TRACKING_URI") == env


# ------------------------------------------------------------------------------------------------------- (d)
def test_reentrant_claim_and_sub_folder_claim_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "pipeline"
    first = claim_output_dir(out, kind="ffcl:pipeline")
    second = claim_output_dir(out, resume=True, kind="downstream")  # the same process again: no conflict
    assert first != second and run_id_for(out) == second
    assert not _lock_is_free(out)
    owner = json.loads((out / "owner.json").read_text())
    assert owner["pid"] == os.getpid() and owner["kind"] == "downstream" and owner["run_id"] == second

    sub = out / "stage1_local"
    sub_id = claim_output_dir(sub, kind="stage1_local")  # its own lock, inside a folder this process owns
    assert run_id_for(sub) == sub_id and run_id_for(out) == second and not _lock_is_free(sub)
    assert run_id_for(tmp_path / "elsewhere") is None

    # another process is refused both, at once, and told who holds them
    for folder, kind in ((out, "downstream"), (sub, "stage1_local")):
        t0 = time.monotonic()
        proc = _claim_elsewhere(folder, kind="intruder")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert time.monotonic() - t0 < 20
        assert "OutputDirInUseError" in proc.stderr and str(folder) in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr and repr(kind) in proc.stderr
        assert "Wait for that run to finish, or pick another --output_dir" in proc.stderr

    # a re-entrant claim still refuses results without --resume/--overwrite
    (sub / "backbone.pt").write_text("stage output")
    with pytest.raises(OutputDirHasResultsError, match="backbone.pt"):
        claim_output_dir(sub, kind="stage1_local")
    assert not _lock_is_free(sub)  # ...and keeps the claim it already had

    assert json.loads((sub / ".lock").read_text())["run_id"] == sub_id  # the holder's record, from the first instant
    assert release_output_dir(sub) and _lock_is_free(sub) and run_id_for(sub) is None
    assert (sub / ".lock").read_text() == "" and not (sub / "owner.json").exists()
    assert not _lock_is_free(out)  # releasing the sub-folder leaves the parent claimed
    assert release_output_dir(out) and _lock_is_free(out)
    assert not release_output_dir(out)


# ------------------------------------------------------------------------------------------------------- (e)
def test_non_zero_rank_is_not_refused_while_rank0_holds_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    files = _fake_results(out)
    rank0 = claim_output_dir(out, resume=True, kind="train:ddp")  # this process is rank 0 of the job

    for env in (_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1"), _env(LOCAL_RANK="1")):
        proc = _claim_elsewhere(out, env=env, overwrite=True, kind="train:ddp")
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.strip()) == 32 and proc.stdout.strip() != rank0  # its own run id (documented)
    for rel, text in files.items():  # rank 1 neither checked nor moved anything: that is rank 0's job
        assert (out / rel).read_text() == text
    assert not (out / ".overwritten").exists()
    assert json.loads((out / "owner.json").read_text())["run_id"] == rank0
    assert not _lock_is_free(out)

    proc = _claim_elsewhere(out, env=_env(RANK="0", WORLD_SIZE="2"), resume=True)  # another job's rank 0
    assert proc.returncode == 3 and "OutputDirInUseError" in proc.stderr
