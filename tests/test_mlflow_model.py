"""The trained classifier logged as an MLflow model: pixels (arrays or encoded PNG/JPEG bytes) in, class probabilities
out, equal to the bundle's inference workflow on the same image files; served by `mlflow models serve`; registered
under `registered_model_name`; file paths refused; an MLflow failure warns and training goes on."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CONFIGS, FAST, cfg, make_2d, make_3d, run_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = {k: v for k, v in FAST.items() if k != "n_bootstrap"}
REGISTERED = "ffcl-test-classifier"
TOL = 1e-4


def _bundle_inference(images: list[Path], out: Path, **overrides) -> dict[str, list[float]]:
    """The bundle's inference workflow on image files: {file name: class probabilities}."""
    run_bundle(cfg("inference.yaml", *overrides.pop("overlays", [])), images=[str(p) for p in images],
               output_dir=str(out), **overrides)
    rows = json.loads((out / "inference.json").read_text())
    names = overrides.get("class_names", ["NORMAL", "PNEUMONIA"])
    return {Path(r["image"]).name: [r[c] for c in names] for r in rows}


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="module", autouse=True)
def _cwd_outside_the_repo(tmp_path_factory):
    """MLflow's default store is ./mlflow.db: whatever falls back to it here writes into a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run (FAST settings) with `registered_model_name` set, and the bundle's inference on its
    test images plus two RGB JPEG copies (the Kermany JPEGs are RGB)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mlflow_model")
    datalist = make_2d(root / "data")
    out = root / "run"
    t0 = time.time()
    run_bundle(cfg("train.yaml"), datalist=str(datalist), output_dir=str(out),
               registered_model_name=REGISTERED, **TRAIN)
    train_s = time.time() - t0
    images = sorted((root / "data" / "test").glob("*.png"))
    (root / "rgb").mkdir()
    for p in images[:2]:  # non-square RGB JPEGs: the axis order and the RGB -> gray step both matter
        Image.open(p).convert("RGB").resize((40, 32)).save(root / "rgb" / (p.stem + ".jpeg"), quality=90)
    images += sorted((root / "rgb").glob("*.jpeg"))
    expected = _bundle_inference(images, root / "infer", datalist=str(datalist),
                                 checkpoint=str(out / "models" / "model.pt"), **TRAIN)
    uri = f"sqlite:///{out / 'mlruns.db'}"
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("ffcl_monai")
    run = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}["train:run"]
    return SimpleNamespace(root=root, out=out, uri=uri, client=client, run=run, images=images, expected=expected,
                           datalist=datalist, train_s=train_s)


@pytest.fixture
def tracking(trained, monkeypatch):
    """`runs:/` and `models:/` URIs resolve against the run's SQLite store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    mlflow.set_tracking_uri(trained.uri)
    yield trained.uri
    mlflow.set_tracking_uri(None)


def _check(pred: pd.DataFrame, names: list[str], expected: dict[str, list[float]]) -> float:
    assert list(pred.columns) == ["NORMAL", "PNEUMONIA"]
    got = pred.to_numpy(dtype=float)
    want = np.array([expected[n] for n in names])
    diff = float(np.abs(got - want).max())
    assert diff < TOL, (diff, got, want)
    return diff


def test_training_logs_a_pyfunc_model_that_matches_bundle_inference(trained, tracking):
    import mlflow
    from mlflow.models import Model

    client, run = trained.client, trained.run
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in models] == ["model"] and models[0].source_run_id == run.info.run_id
    assert str(models[0].status).endswith("READY")
    outputs = client.get_run(run.info.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [models[0].model_id]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    names = [p.name for p in trained.images]
    pixels = [_pixels(p) for p in trained.images]  # H x W (PNG) and H x W x 3 (RGB JPEG), numpy's axis order
    _check(model.predict(pd.DataFrame({"image": pixels})), names, trained.expected)
    _check(model.predict({"image": [p.tolist() for p in pixels]}), names, trained.expected)  # nested lists
    _check(model.predict(pd.DataFrame({"image_bytes": [_b64(p) for p in trained.images]})), names, trained.expected)

    # the same model through its MLflow 3 model URI
    same = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    _check(same.predict(pd.DataFrame({"image": pixels})), names, trained.expected)

    # signature and input example: pixels, never file names
    meta = model.metadata
    assert {c.name for c in meta.get_input_schema().inputs} == {"image", "image_bytes"}
    assert [c.name for c in meta.get_output_schema().inputs] == ["NORMAL", "PNEUMONIA"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{models[0].model_id}"))
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == ["image"]
    arr = np.asarray(example["image"].iloc[0], dtype=float)
    assert arr.ndim == 2 and 8 <= min(arr.shape) and max(arr.shape) <= 32 and arr.std() > 0
    for f in ("input_example.json", "serving_input_example.json"):
        text = (local / f).read_text()
        assert ".png" not in text and str(trained.root) not in text
    spec = json.loads(next(local.rglob("preprocessing.json")).read_text())
    assert spec["class_names"] == ["NORMAL", "PNEUMONIA"] and spec["spatial_dims"] == 2
    assert spec["image_size"] == [32, 32] and spec["in_channels"] == 1 and spec["network"]["backbone"] == "resnet10"
    assert str(trained.root) not in json.dumps(spec)
    # the weights travel as the training's best checkpoint, loadable with weights_only=True
    ckpt = torch.load(next(local.rglob("model.pt")), weights_only=True)
    ref = torch.load(trained.out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], ref["model"][k]) for k in ref["model"])
    assert not list(local.rglob("*.pkl"))  # models from code: nothing is unpickled when the model loads


def test_registered_model_name_registers_a_version(trained, tracking):
    import mlflow

    versions = trained.client.search_model_versions(f"name = '{REGISTERED}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", trained.run.info.run_id)]
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/1")
    _check(model.predict(pd.DataFrame({"image": [_pixels(p) for p in trained.images]})),
           [p.name for p in trained.images], trained.expected)


def test_without_a_registered_name_nothing_is_registered(trained, tracking, tmp_path):
    """Default `registered_model_name: null`: the model is logged to the run, the registry stays empty."""
    import mlflow
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml")])
    assert parser["log_model"] is True and parser["registered_model_name"] is None

    from ffcl_monai.serving.mlflow_pyfunc import log_classifier_model

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(exp, run_name="r")
    (logged,) = trained.client.search_logged_models(experiment_ids=[trained.run.info.experiment_id])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}"))
    spec = json.loads(next(local.rglob("preprocessing.json")).read_text())
    info = log_classifier_model(uri, run.info.run_id, trained.out / "models" / "model.pt", spec)
    assert info.model_uri.startswith("models:/") and info.registered_model_version is None
    assert client.search_registered_models() == []
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # the training's handler closes its run


def test_file_paths_are_refused(trained, tracking):
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"runs:/{trained.run.info.run_id}/model")
    path = str(trained.images[0])
    for frame in (pd.DataFrame({"image": [path]}), pd.DataFrame({"image_bytes": [path]}),
                  pd.DataFrame({"image": ["file://" + path]})):
        with pytest.raises(MlflowException, match="file path") as e:
            model.predict(frame)
        assert "image_bytes" in str(e.value)  # the message says what to send instead
    with pytest.raises(MlflowException, match="`image` or `image_bytes`"):
        model.predict(pd.DataFrame({"path": [path]}))
    with pytest.raises(MlflowException, match="not a PNG or JPEG"):
        model.predict(pd.DataFrame({"image_bytes": [base64.b64encode(b"not an image at all").decode()]}))
    with pytest.raises(MlflowException, match="NaN"):
        model.predict(pd.DataFrame({"image": [np.full((8, 8), np.nan)]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_like_bundle_inference(trained, tmp_path):
    """`mlflow models serve --env-manager local` on a free loopback port, with the registered model's URI."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    mlflow_cli = [sys.executable, "-c", "from mlflow.cli import cli; cli()"]
    log = open(tmp_path / "serve.log", "w")
    t0 = time.time()
    proc = subprocess.Popen([*mlflow_cli, "models", "serve", "-m", f"models:/{REGISTERED}/1", "--env-manager", "local",
                             "-p", str(port), "-h", "127.0.0.1"], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() - t0 < 180, "the server did not start in 180 s"
                time.sleep(0.5)
        startup_s = time.time() - t0
        names = [p.name for p in trained.images]
        pixels = [_pixels(p).tolist() for p in trained.images]
        status, body = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[p] for p in pixels]}})
        assert status == 200, body
        d1 = _check(pd.DataFrame(body["predictions"]), names, trained.expected)
        status, body = _post(port, {"inputs": {"image_bytes": [_b64(p) for p in trained.images]}})
        assert status == 200, body
        d2 = _check(pd.DataFrame(body["predictions"]), names, trained.expected)
        status, body = _post(port, {"dataframe_records": [{"image": str(trained.images[0])}]})
        assert status == 400 and "file path" in body["message"], body
        print(f"\nserver up in {startup_s:.1f} s; max |served - bundle inference|: arrays {d1:.2e}, bytes {d2:.2e}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_3d_volumes_match_bundle_inference(tmp_path):
    """3D: the volume array as nibabel gives it (MONAI's loader order) equals bundle inference on the NIfTI files.
    A saved (not logged) model from a random-init checkpoint: the preprocessing and axis order are what is tested."""
    import mlflow
    import nibabel as nib
    from monai.bundle import ConfigParser

    from ffcl_monai.networks.classifier import Classifier
    from ffcl_monai.serving.mlflow_pyfunc import model_spec_from_config, save_classifier_model

    datalist = make_3d(tmp_path / "data", counts=(2, 2, 3))
    o = dict(datalist=str(datalist), image_size=[12, 14, 16], batch_size=2, class_names=["absent", "present"],
             backbone="resnet10")
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": Classifier("resnet10", 2, 3, 1).state_dict()}, ckpt)
    images = sorted((tmp_path / "data" / "test").glob("*.nii.gz"))
    expected = _bundle_inference(images, tmp_path / "infer", checkpoint=str(ckpt), overlays=["3d.yaml"], **o)

    parser = ConfigParser()
    parser.read_config(cfg("train.yaml", "3d.yaml"))
    parser.update(o)
    spec = model_spec_from_config(parser)
    assert spec["spatial_dims"] == 3 and spec["image_size"] == [12, 14, 16]
    save_classifier_model(tmp_path / "pyfunc", ckpt, spec)
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    vols = [np.asarray(nib.load(str(p)).dataobj) for p in images]
    pred = model.predict(pd.DataFrame({"image": vols}))
    got = pred.to_numpy(dtype=float)
    want = np.array([expected[p.name] for p in images])
    assert list(pred.columns) == ["absent", "present"] and float(np.abs(got - want).max()) < TOL


def test_mlflow_failure_warns_and_training_goes_on(tmp_path, monkeypatch):
    from ignite.engine import Engine, Events

    import ffcl_monai.serving.mlflow_pyfunc as pyfunc
    from ffcl_monai.handlers.mlflow_model import MLflowModelLogger
    from ffcl_monai.handlers.mlflow_tracking import SafeMLFlowHandler

    def server_went_away(*args, **kwargs):
        raise ConnectionError("server went away")

    monkeypatch.setattr(pyfunc, "log_classifier_model", server_went_away)
    mlflow_handler = SafeMLFlowHandler(tracking_uri="http://127.0.0.1:1", experiment_name="e")  # never contacted
    mlflow_handler.cur_run = SimpleNamespace(info=SimpleNamespace(run_id="x"))
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.STARTED, mlflow_handler._step_aside_if_duplicated)  # found on the engine
    ckpt = tmp_path / "model.pt"  # never read: logging fails first
    MLflowModelLogger(checkpoint=ckpt, spec={"class_names": ["a", "b"]}).attach(engine)
    with pytest.warns(UserWarning, match=r"MLflow model logging failed \(ConnectionError: server went away\); "
                                         "training continues"):
        state = engine.run([0], max_epochs=1)
    assert state.epoch == 1
    # no MLflow handler on the engine: a warning too, never an error
    bare = Engine(lambda e, b: None)
    MLflowModelLogger(checkpoint=ckpt, spec={"class_names": ["a", "b"]}).attach(bare)
    with pytest.warns(UserWarning, match="no MLflow run"):
        bare.run([0], max_epochs=1)
