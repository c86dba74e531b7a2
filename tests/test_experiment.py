"""The Experiment that every multi-step program runs under: it owns the folder, skips finished steps on rerun,
keeps the MLflow parent run's whole lifecycle and writes the summary. Steps here are plain functions (no training)."""

from __future__ import annotations

import json

import mlflow
import pytest

from ffcl_monai.workflows.experiment import Experiment


def _runs(out):
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_rerun_skips_finished_steps_and_reuses_the_parent_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "exp"
    calls: list[str] = []

    def work(name: str) -> dict:
        calls.append(name)
        return {"value": len(calls)}

    def crash() -> None:
        raise RuntimeError("killed in step b")

    with pytest.raises(RuntimeError, match="killed in step b"):
        with Experiment(out, "demo_program", experiment_name="e") as exp:
            exp.log_params({"alpha": 1})
            assert exp.step("a", work, "a") == {"value": 1}
            exp.step("b", crash)
    state = json.loads((out / "state.json").read_text())
    assert state["kind"] == "demo_program" and list(state["done"]) == ["a"] and state["status"] == "FAILED"
    first_parent = state["parent_run_id"]
    client, runs = _runs(out)
    assert [r.info.status for r in runs] == ["FAILED"]

    # the same program rerun into its folder is the owner continuing: no --resume needed, step a is not run again
    with Experiment(out, "demo_program", experiment_name="e") as exp:
        assert exp.step("a", work, "a") == {"value": 1}
        assert exp.step("b", work, "b") == {"value": 2}
        exp.metrics["score"] = 0.75
    assert calls == ["a", "b"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["parent_run_id"] == first_parent
    assert set(summary["seconds"]) == {"a", "b"} and summary["wall_s"] > 0
    client, runs = _runs(out)
    assert len(runs) == 1  # one parent run across both invocations, reopened
    run = client.get_run(first_parent)
    assert run.info.status == "FINISHED" and run.data.params["alpha"] == "1" and run.data.metrics["score"] == 0.75


def test_another_program_into_the_folder_is_refused_unless_resume_or_overwrite(tmp_path, monkeypatch):
    from ffcl_monai.errors import UserInputError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "exp"
    with Experiment(out, "ablation", experiment_name="e") as exp:
        exp.step("x", lambda: 1)
    with pytest.raises(UserInputError, match="--overwrite True"):
        Experiment(out, "label_efficiency", experiment_name="e").__enter__()
    with Experiment(out, "label_efficiency", experiment_name="e", overwrite=True) as exp:
        assert not exp.done("x")  # the ablation's state was moved aside, not continued
    assert list((out / ".overwritten").glob("*/state.json"))


def test_step_overrides_resume_a_started_step_only(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "exp"
    with Experiment(out, "demo_program", experiment_name="e") as exp:
        fresh = exp.step_overrides("finetune", pretrained_ckpt="b.pt")
        assert fresh["resume"] is False and fresh["overwrite"] is False and fresh["pretrained_ckpt"] == "b.pt"
        assert fresh["output_dir"] == str(out / "finetune") and fresh["mlflow_parent_run_id"] == exp.parent_run_id
        (out / "finetune" / "checkpoints").mkdir(parents=True)
        (out / "finetune" / "checkpoints" / "resume.pt").write_bytes(b"x")
        assert exp.step_overrides("finetune")["resume"] is True


def test_recorded_step_results_are_data_never_config_syntax(tmp_path, monkeypatch):
    """A recorded result becomes an override of later steps (e.g. a checkpoint path): a state.json edited to hold
    `$...` is refused before any step runs, naming the file."""
    from ffcl_monai.errors import UserInputError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "exp"
    with Experiment(out, "demo_program", experiment_name="e") as exp:
        exp.step("stage1", lambda: str(out / "backbone.pt"))
    state = json.loads((out / "state.json").read_text())
    state["done"]["stage1"] = "$__import__('os').system('touch pwned')"
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserInputError, match="state.json"):
        with Experiment(out, "demo_program", experiment_name="e") as exp:
            exp.step("stage1", lambda: "never run")
