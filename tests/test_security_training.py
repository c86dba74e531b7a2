"""Patient safety and secrets in training, evaluation and inference.

Bad values fail clearly before training: NaN/Inf pixels, NIfTI headers declaring huge images, a validation split
without an AUC, a NaN validation metric taken as the best model. No secret is written: credentials in the tracking
URI are redacted everywhere, MLflow artifacts stay under output_dir, DICOM identifiers never reach an output.

The bundle configs come from ``ffcl_monai.bundle_root()``, i.e. from the same checkout as the imported package.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import ffcl_monai
from conftest import FAST, make_2d, run_bundle, user_error, write_datalist
from ffcl_monai.errors import UserInputError
from ffcl_monai.handlers.metrics import ClassificationMetrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = Path(ffcl_monai.bundle_root()) / "configs"
RUN = {k: v for k, v in FAST.items() if k != "n_bootstrap"}
EVAL = {k: v for k, v in RUN.items() if k != "max_epochs"}
NAN_METRIC = "validate#key_metric#val_auc#_target_"
SECRET, TOKEN = "s3cret", "t0k3n"


def _cfg(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names]


def _chain_text(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would print, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


def _edit(datalist: Path, fn) -> None:
    content = json.loads(datalist.read_text())
    fn(content)
    datalist.write_text(json.dumps(content))


def _train(datalist: Path, out: Path, **extra) -> None:
    run_bundle(_cfg("train.yaml"), datalist=str(datalist), output_dir=str(out), **{**RUN, **extra})


def _untrained_checkpoint(path: Path) -> Path:
    from ffcl_monai.networks.classifier import Classifier

    torch.save({"model": Classifier(FAST["backbone"], 2, 2, 1).state_dict()}, path)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_2d(tmp_path / "data", counts=(8, 4, 4))


# --- 1. bad values fail clearly, before training ------------------------------------------------------------------


def test_nan_pixels_stop_training_naming_the_file(data, tmp_path):
    img = np.random.default_rng(0).uniform(0, 1, (32, 32)).astype(np.float32)
    img[5, 7] = np.nan
    np.save(data.parent / "training" / "bad.npy", img)
    _edit(data, lambda c: c["training"][2].update(image="training/bad.npy"))
    out = tmp_path / "o"
    with pytest.raises(Exception) as info:
        _train(data, out)
    err = user_error(info.value)
    assert isinstance(err, UserInputError), repr(err)  # not the NaN-loss guard after an epoch of NaN
    assert "bad.npy" in str(err) and "NaN" in str(err)
    assert not (out / "history.jsonl").exists() and not (out / "models" / "model.pt").exists()


def test_nan_pixels_stop_inference_instead_of_nan_probabilities(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    img = np.random.default_rng(0).uniform(0, 1, (32, 32)).astype(np.float32)
    img[0, 0] = np.inf
    img[1, 1] = np.nan
    bad = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(bad))
    out = tmp_path / "infer"
    with pytest.raises(Exception) as info:
        run_bundle(_cfg("inference.yaml"), images=[str(bad)], output_dir=str(out),
                   checkpoint=str(_untrained_checkpoint(tmp_path / "m.pt")), **EVAL)
    err = user_error(info.value)
    assert "scan.nii.gz" in str(err) and "1 NaN and 1 infinite" in str(err)
    assert not (out / "inference.csv").exists()


def _nifti_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """A .nii.gz of a few hundred bytes whose header declares ``shape`` (float32) but holds (almost) no data."""
    import gzip

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    return path


def test_nifti_header_over_the_limit_is_refused_before_decoding(tmp_path):
    from ffcl_monai.data.transforms import LoadImageNamedd

    load = LoadImageNamedd(keys="image", image_only=True, ensure_channel_first=True)
    bomb = _nifti_header_only(tmp_path / "bomb.nii.gz", (30000, 30000, 30000))  # 2.7e13 voxels, 108 TB as float32
    with pytest.raises(UserInputError, match=r"bomb\.nii\.gz.*header declares shape \(30000, 30000, 30000\).*limit"):
        load({"image": str(bomb)})
    wide = _nifti_header_only(tmp_path / "wide.nii.gz", (9000, 8))  # small, but one axis above the per-axis limit
    with pytest.raises(UserInputError, match=r"wide\.nii\.gz.*8192 per axis"):
        load({"image": str(wide)})
    ok = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), str(ok))
    assert tuple(load({"image": str(ok)})["image"].shape) == (1, 8, 8, 4)


def test_single_class_validation_split_stops_the_run_at_start(data, tmp_path):
    _edit(data, lambda c: c.update(validation=[e for e in c["validation"] if e["label"] == 0]))
    out = tmp_path / "o"
    with pytest.raises(Exception) as info:
        _train(data, out)
    err = user_error(info.value)
    assert "validation" in str(err) and "stratified" in str(err) and "PNEUMONIA" in str(err), str(err)
    assert not (out / "history.jsonl").exists(), "an epoch ran before the error"


def test_multilabel_validation_label_without_positives_warns(data):
    from ffcl_monai.data.datalist import load_datalist

    def multilabel(c, third):
        c.update(task="multilabel", num_classes=3, labels={"0": "a", "1": "b", "2": "c"})
        for split in ("training", "validation", "test"):
            for i, e in enumerate(c[split]):
                e["label"] = [i % 2, (i + 1) % 2, third]

    _edit(data, lambda c: multilabel(c, 0))  # label "c" has no positive anywhere
    with pytest.warns(UserWarning, match=r"2 \(c\): 0 pos / 4 neg"):
        items = load_datalist(data, "validation", 3, "multilabel")
    assert len(items) == 4
    _edit(data, lambda c: [e.update(label=[1, 1, -1]) for e in c["validation"]])  # no label has both values
    with pytest.raises(UserInputError, match="no label has both positive and negative"):
        load_datalist(data, "validation", 3, "multilabel")


class NanFirstAUC(ClassificationMetrics):
    """The project's validation metric, except that the first validation reports a NaN AUC."""

    calls = 0

    def compute(self) -> float:
        value = super().compute()
        type(self).calls += 1
        if type(self).calls == 1:
            self.last[self.key] = float("nan")
            return float("nan")
        return value


class AlwaysNanAUC(ClassificationMetrics):
    """The project's validation metric, except that every AUC is NaN."""

    def compute(self) -> float:
        super().compute()
        self.last[self.key] = float("nan")
        return float("nan")


def test_nan_validation_auc_is_never_the_best_model(data, tmp_path):
    NanFirstAUC.calls = 0
    out = tmp_path / "o"
    _train(data, out, max_epochs=2, **{NAN_METRIC: "test_security_training.NanFirstAUC"})
    best = torch.load(out / "models" / "model.pt", weights_only=True)["model"]
    last = torch.load(out / "checkpoints" / "resume.pt", weights_only=True)  # end of epoch 2
    assert last["trainer"]["epoch"] == 2 and last["validator"]["best_metric_epoch"] == 2
    assert all(torch.equal(best[k], v) for k, v in last["model"].items()), "model.pt is not the epoch-2 model"


def test_every_validation_nan_fails_the_run(data, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(Exception) as info:
        _train(data, out, max_epochs=1, **{NAN_METRIC: "test_security_training.AlwaysNanAUC"})
    err = user_error(info.value)
    assert "without a best model" in str(err) and "val_auc" in str(err), str(err)
    assert not (out / "models" / "model.pt").exists()


# --- 2. no secret is written --------------------------------------------------------------------------------------


def test_redact_uri():
    from ffcl_monai.handlers.mlflow_tracking import redact_uri

    assert redact_uri(f"http://alice:{SECRET}@host:5000") == "http://alice:***@host:5000"
    assert redact_uri(f"https://{TOKEN}@host/x") == "https://***@host/x"
    assert redact_uri(f"http://alice:p@{SECRET}@host/") == "http://alice:***@host/"  # unencoded "@" in a password
    assert redact_uri(f"https://h/?token={TOKEN}&x=1&access_token=a&password=b&api_key=c") == (
        "https://h/?token=***&x=1&access_token=***&password=***&api_key=***")
    msg = f"API request to http://alice:{SECRET}@127.0.0.1:1/?token={TOKEN}/api/2.0/x failed (url: /?token={TOKEN}/api)"
    assert SECRET not in redact_uri(msg) and TOKEN not in redact_uri(msg)
    for plain in ("sqlite:////tmp/o/mlruns.db", "databricks", "http://host:5000/?x=1", "/data/a@b/img.png", 3):
        assert redact_uri(plain) == plain


def test_unreachable_server_error_has_no_credentials(data, tmp_path, monkeypatch, capfd):
    from ignite.engine import Engine

    from ffcl_monai.handlers.mlflow_tracking import SafeMLFlowHandler, check_tracking

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://alice:{SECRET}@127.0.0.1:{_closed_port()}/?token={TOKEN}"
    shown = r"cannot reach the MLflow tracking store 'http://alice:\*\*\*@127\.0\.0\.1"
    with pytest.raises(RuntimeError, match=shown) as info:
        check_tracking(uri, timeout_s=3)
    assert SECRET not in _chain_text(info.value) and TOKEN not in _chain_text(info.value)

    handler = SafeMLFlowHandler(tracking_uri=uri, experiment_name="e", run_name="r")
    with pytest.raises(RuntimeError, match="MLflow could not start a run") as info:
        handler.start(Engine(lambda e, b: None))
    assert SECRET not in _chain_text(info.value) and TOKEN not in _chain_text(info.value)

    # end to end: the training workflow with the URI in MLFLOW_TRACKING_URI stops at start, nothing leaks
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(Exception) as info:
        _train(data, tmp_path / "o")
    captured = capfd.readouterr()
    text = _chain_text(info.value) + captured.out + captured.err
    assert "cannot reach the MLflow tracking store" in text
    assert SECRET not in text and TOKEN not in text
    for f in (tmp_path / "o").rglob("*"):
        assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f


def test_monai_run_summary_and_logs_are_redacted():
    """MONAI's run summary echoes every CLI override; it is logged after the configs imported ffcl_monai, whose log
    filter redacts it. Log lines reaching the root handlers (MONAI's logging.conf) are redacted too."""
    import io
    import logging

    from monai.bundle.scripts import _log_input_summary

    from ffcl_monai.redaction import install_log_redaction

    uri = f"http://alice:{SECRET}@mlflow.example:5000/?token={TOKEN}"
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    summary_logger = logging.getLogger("monai.bundle.scripts")
    summary_logger.addHandler(handler)
    logging.getLogger().addHandler(handler)  # as logging.conf's console handler, present before ffcl_monai is imported
    try:
        install_log_redaction()
        _log_input_summary(tag="run", args={"tracking_uri": uri, "output_dir": "runs/x"})
        logging.getLogger("some.library").warning("store %s unreachable", uri)
    finally:
        summary_logger.removeHandler(handler)
        logging.getLogger().removeHandler(handler)
    text = buf.getvalue()
    assert "tracking_uri" in text and "alice:***@mlflow.example" in text and "unreachable" in text
    assert SECRET not in text and TOKEN not in text


@pytest.mark.slow
def test_cli_run_with_credentials_in_the_uri_leaks_nothing(data, tmp_path):
    """A real `mlflow server` reached through http://user:password@...: a CLI training run prints, saves and logs
    no credential (the server ignores basic auth, so the run succeeds and everything is written)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import REPO

    port = _closed_port()  # free now; the server binds it
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                               "--default-artifact-root", str(store / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=store)
    try:
        for _ in range(120):
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}/"
        out = tmp_path / "run"
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(_cfg("train.yaml")),
               "--meta_file", _cfg("metadata.json")[0], "--datalist", str(data), "--output_dir", str(out),
               "--tracking_uri", uri, *[a for k, v in FAST.items() for a in (f"--{k}", json.dumps(v))]]
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "alice:***@" in res.stdout + res.stderr
        assert SECRET not in res.stdout + res.stderr
        for f in list(out.rglob("*")) + list(store.rglob("*")):
            assert not f.is_file() or SECRET.encode() not in f.read_bytes(), f
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_config_resolved_params_and_tags_are_redacted(tmp_path, monkeypatch):
    import mlflow
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    from ffcl_monai.workflows.records import save_resolved_config
    from ffcl_monai.handlers.mlflow_tracking import SafeMLFlowHandler, log_report

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote = f"https://alice:{SECRET}@mlflow.example.org/?access_token={TOKEN}"
    # save_resolved_config finds the running ConfigParser on the call stack, here in this frame's `parser`
    parser = ConfigParser({"tracking_uri": remote, "nested": {"urls": [remote]}})  # noqa: F841
    text = Path(save_resolved_config(tmp_path)).read_text()
    assert SECRET not in text and TOKEN not in text and "alice:***@mlflow.example.org" in text
    assert json.loads(text)["nested"]["urls"] == ["https://alice:***@mlflow.example.org/?access_token=***"]

    store = f"sqlite:///{tmp_path}/mlruns.db"
    handler = SafeMLFlowHandler(tracking_uri=store, experiment_name="e", run_name="r",
                                experiment_param={"upstream": remote})
    handler.start(Engine(lambda e, b: None))
    run_id = log_report(store, "e", "report", params={"a": {"uri": remote}}, tags={"source": remote})
    client = mlflow.MlflowClient(store)
    logged = [client.get_run(handler.cur_run.info.run_id).data, client.get_run(run_id).data]
    values = [*logged[0].params.values(), *logged[1].params.values(), *logged[1].tags.values()]
    assert logged[0].params["upstream"] == logged[1].params["a.uri"] == logged[1].tags["source"]
    assert not [v for v in values if SECRET in v or TOKEN in v], values


def test_mlflow_artifacts_stay_under_output_dir(data, tmp_path, monkeypatch):
    from ffcl_monai.handlers.mlflow_tracking import close_parent_run, open_parent_run

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    run_bundle(_cfg("train.yaml", "evaluate.yaml"), datalist=str(data), output_dir=str(out), n_bootstrap=10,
               checkpoint=str(_untrained_checkpoint(tmp_path / "m.pt")), **EVAL)
    uri = f"sqlite:///{tmp_path / 'pipe'}/mlruns.db"
    (tmp_path / "pipe").mkdir()
    parent = open_parent_run(uri, "pipelines", "pipeline:x")
    (tmp_path / "pipe" / "summary.json").write_text("{}")
    close_parent_run(uri, parent, "FINISHED", artifacts=[(tmp_path / "pipe" / "summary.json", "results")])
    assert not (cwd / "mlruns").exists(), sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    assert list((out / "mlruns").rglob("metrics.json")) and list((out / "mlruns").rglob("predictions.csv"))
    assert list((tmp_path / "pipe" / "mlruns").rglob("results/summary.json"))


def test_outputs_hold_no_dicom_identifiers(tmp_path, monkeypatch, capfd):
    """Regression guard: outputs copy no DICOM metadata (they hold paths relative to the datalist and numbers)."""
    import pydicom
    from pydicom.data import get_testdata_file

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "data"
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    identifiers = ["MRN-4711-XQ", "DOE^JANE", "19470101", "St Example Hospital", "ACC-99871"]
    splits = {}
    for split, n in (("training", 4), ("validation", 2), ("test", 2)):
        (root / split).mkdir(parents=True)
        splits[split] = []
        for i in range(n):
            ds = base.copy()
            ds.PatientID, ds.PatientName, ds.PatientBirthDate = identifiers[0], identifiers[1], identifiers[2]
            ds.InstitutionName, ds.AccessionNumber = identifiers[3], identifiers[4]
            ds.save_as(root / split / f"img_{i}.dcm", enforce_file_format=True)
            splits[split].append({"image": f"{split}/img_{i}.dcm", "label": i % 2})
    datalist = write_datalist(root, splits)
    out = tmp_path / "out"
    small = {**RUN, "max_epochs": 1, "batch_size": 4}
    _train(datalist, out, **small)
    small.pop("max_epochs")
    run_bundle(_cfg("train.yaml", "evaluate.yaml"), datalist=str(datalist), output_dir=str(out), n_bootstrap=10,
               **small)
    run_bundle(_cfg("inference.yaml"), datalist=str(datalist), output_dir=str(out / "infer"),
               checkpoint=str(out / "models" / "model.pt"), **small)
    written = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"predictions.csv", "metrics.json", "config_resolved.json", "inference.csv", "mlruns.db"} <= names
    with sqlite3.connect(out / "mlruns.db") as db:  # params, tags, metrics, run names as MLflow stored them
        rows = [str(r) for t in ("params", "tags", "runs", "experiments")
                for r in db.execute(f"select * from {t}").fetchall()]  # noqa: S608 (fixed table names)
    logs = capfd.readouterr()
    for ident in identifiers:
        assert not [p for p in written if ident.encode() in p.read_bytes()], ident
        assert not [r for r in rows if ident in r] and ident not in logs.out + logs.err, ident
