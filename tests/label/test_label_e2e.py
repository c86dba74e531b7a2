"""Issue 7 end to end: a real MONAI Label server, real HTTP, the bundle's classifier.

What it does, in order:
1. a studies folder with real Kermany JPEGs from ``bundle/sample`` (labels from its datalist), one of them also as
   PNG, a 2D DICOM (pydicom's ``CT_small.dcm``) and a small 3D NIfTI volume (nibabel's ``anatomical.nii``);
2. deterministic random-init 2D and 3D classifier checkpoints (``{"model": state_dict}``), built from the bundle's
   ``network_def``;
3. ``monailabel_app/start_server.sh`` on a free loopback port, with the HTTP(S) proxy pointed at a closed port so
   that any model-zoo look-up or download would fail (the server must start offline);
4. while it starts, the reference: the bundle's own inference workflow (``python -m monai.bundle run`` with
   ``inference.yaml`` [+ 3D overlay]) on the same images and checkpoints;
5. ``/info/`` lists both models, ``POST /infer/<model>?image=<id>`` returns probabilities equal to the reference
   within 1e-4 that sum to 1 (softmax);
6. labels saved through ``PUT /datastore/label``, one short training through ``POST /train/xray``, and a new
   checkpoint that the infer task then serves;
7. shutdown: SIGTERM, exit, nothing left in the server's process group.

Run it in the label environment (``bash monailabel_app/setup_env.sh`` creates it)::

    .label-venv/bin/python -m pytest -m label tests/label
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = [pytest.mark.label, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
SAMPLE = BUNDLE / "sample" / "kermany64"
START_SCRIPT = REPO / "monailabel_app" / "start_server.sh"

TOL = 1e-4
STARTUP_TIMEOUT_S = 420  # imports on a busy 2-core machine are slow
TRAIN_TIMEOUT_S = 900
N_PER_CLASS = 3
CLOSED_PROXY = "http://127.0.0.1:9"  # discard port: nothing listens, so any outbound request fails fast


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 120) -> tuple[int, Any]:
    """(status, parsed JSON or text). Talks to 127.0.0.1 directly, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def multipart(fields: dict[str, tuple[str | None, bytes, str]]) -> tuple[bytes, str]:
    """Encode form fields ``name -> (filename or None, content, content type)`` as multipart/form-data."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, (filename, content, ctype) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def inference_overlay(overlay: Path, out_dir: Path) -> Path:
    """The 3D overlay restricted to keys that make sense for the inference workflow.

    An overlay key nested in another workflow's section (``train#...``) makes ``monai.bundle run`` of
    ``inference.yaml`` fail with ``KeyError: query key: train``. Such keys are dropped, as the server's config merge
    does; the current ``3d.yaml`` has none, so this is a plain copy.
    """
    import yaml

    sections = set()
    for name in ("inference.yaml",):
        sections |= set((yaml.safe_load((CONFIGS / name).read_text()) or {}).keys())
    content = yaml.safe_load(overlay.read_text()) or {}
    kept = {k: v for k, v in content.items() if k.lstrip("+").replace("::", "#").split("#")[0] in sections
            or "#" not in k.replace("::", "#")}
    path = out_dir / f"{overlay.stem}_inference.yaml"
    path.write_text(yaml.safe_dump(kept, sort_keys=False))
    return path


def make_checkpoint(path: Path, overlays: list[Path], seed: int) -> None:
    """Deterministic random-init classifier from the bundle's ``network_def``, saved as ``{"model": state_dict}``.

    The head is scaled up so that probabilities spread away from 0.5: the comparison with the reference then
    checks something.
    """
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), *map(str, overlays)])
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    state = net.state_dict()
    for k in state:
        if k.startswith("head."):
            state[k] = state[k] * 20.0
    torch.save({"model": state}, path)


def bundle_inference(images: list[Path], checkpoint: Path, out_dir: Path, overlays: list[Path]) -> dict[str, list[float]]:
    """Class probabilities per image from the bundle's own inference workflow (``python -m monai.bundle run``)."""
    configs = [str(CONFIGS / "inference.yaml"), *map(str, overlays)]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", json.dumps(configs),
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--images", json.dumps([str(p) for p in images]),
        "--checkpoint", str(checkpoint),
        "--output_dir", str(out_dir),
    ]
    res = subprocess.run(cmd, cwd=out_dir.parent, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"bundle inference failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    rows = json.loads((out_dir / "inference.json").read_text())
    names = class_names()
    return {Path(r["image"]).name: [r[n] for n in names] for r in rows}


def class_names() -> list[str]:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return [channel_def[k] for k in sorted(channel_def, key=int)]


def sample_studies(work: Path, per_class: int) -> tuple[Path, dict[str, str]]:
    """``work/studies`` with ``per_class`` real Kermany JPEGs per class from the embedded sample's training split;
    returns the folder and ``{image id: class name}`` (the id is the file name without its extension)."""
    studies = work / "studies"
    studies.mkdir()
    datalist = json.loads((SAMPLE / "datalist.json").read_text())
    picked: dict[str, str] = {}
    for idx, name in enumerate(class_names()):
        items = [d for d in datalist["training"] if d["label"] == idx][:per_class]
        assert len(items) == per_class, f"the sample has fewer than {per_class} {name} training images"
        for d in items:
            src = SAMPLE / d["image"]
            shutil.copy(src, studies / src.name)
            picked[src.name.rsplit(".", 1)[0]] = name
    return studies, picked


class Server:
    """``monailabel_app/start_server.sh`` in its own process group (so that its training children go with it)."""

    def __init__(self, studies: Path, port: int, conf: list[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "server.log"
        env = {
            **os.environ,
            "LABEL_VENV": sys.prefix,  # the environment running this test
            "http_proxy": CLOSED_PROXY, "https_proxy": CLOSED_PROXY,
            "HTTP_PROXY": CLOSED_PROXY, "HTTPS_PROXY": CLOSED_PROXY,
            "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
            "MONAI_LABEL_SESSION_PATH": str(workdir / "sessions"),
            **(env or {}),
        }
        env.pop("MLFLOW_TRACKING_URI", None)  # training tracks to SQLite next to its checkpoint
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["bash", str(START_SCRIPT), str(studies), str(port), *conf],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
        )
        self.pgid = self.proc.pid  # start_new_session: the script (then, by exec, the server) leads its group

    def log_tail(self, n: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float, headers: dict[str, str] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                status, info = http("GET", f"{self.url}/info/", headers=headers, timeout=10)
                if status == 200:
                    return info
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        pytest.fail(f"server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def group_members(self) -> list[Any]:
        import psutil

        members = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) == self.pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    members.append(p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return members

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM to the group, wait; SIGKILL only as a last resort (and then the caller's assertions fail)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(timeout=30)
                self._log.close()
                return None
        self._log.close()
        return self.proc.returncode


# ----------------------------------------------------------------------------------------------------------------
# the session: studies, checkpoints, server, reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    pytest.importorskip("monailabel", reason="MONAI Label runs in its own environment: bash monailabel_app/setup_env.sh")
    import nibabel
    import pydicom.data

    work = tmp_path_factory.mktemp("label_e2e")
    names = class_names()
    studies, picked = sample_studies(work, N_PER_CLASS)  # image id -> class name
    # one PNG (same pixels as a sample JPEG, another id) for the PNG path
    from PIL import Image

    png_id = f"{sorted(picked)[0]}_png"
    Image.open(studies / f"{sorted(picked)[0]}.jpeg").save(studies / f"{png_id}.png")
    dicom = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    shutil.copy(dicom, studies / "CT_small.dcm")
    volume = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"
    shutil.copy(volume, studies / "anatomical.nii")

    ckpt = work / "ckpt"
    ckpt.mkdir()
    overlay_3d = inference_overlay(CONFIGS / "3d.yaml", work)
    make_checkpoint(ckpt / "model_2d.pt", [], seed=0)
    make_checkpoint(ckpt / "model_3d.pt", [CONFIGS / "3d.yaml"], seed=1)

    port = free_port()
    conf = [
        # `untrained`: a 2D model whose checkpoint does not exist, which must refuse rather than serve random weights
        "--conf", "models", "xray,volume3d,untrained",
        "--conf", "untrained_overlays", "",
        "--conf", "model_path", str(ckpt / "model_2d.pt"),
        "--conf", "volume3d_model_path", str(ckpt / "model_3d.pt"),
        "--conf", "model_dir", str(work / "model"),
    ]
    server = Server(studies, port, conf, work)
    try:
        # the reference runs while the server starts
        images_2d = sorted(studies.glob("*.jpeg")) + [studies / f"{png_id}.png", studies / "CT_small.dcm"]
        ref_2d = bundle_inference(images_2d, ckpt / "model_2d.pt", work / "ref_2d", [])
        ref_3d = bundle_inference([studies / "anatomical.nii"], ckpt / "model_3d.pt", work / "ref_3d", [overlay_3d])
        info = server.wait_ready(STARTUP_TIMEOUT_S)
        yield types.SimpleNamespace(
            work=work, studies=studies, server=server, info=info, labels=picked, names=names,
            ref={**ref_2d, **ref_3d}, ckpt=ckpt, png_id=png_id,
        )
    finally:
        if server.proc.poll() is None:
            print(server.log_tail())
        server.stop()


def infer(session: types.SimpleNamespace, model: str, image_id: str) -> dict:
    status, res = http("POST", f"{session.server.url}/infer/{model}?image={image_id}", data=b"")
    assert status == 200, f"/infer/{model}?image={image_id} -> {status}: {res}\n{session.server.log_tail()}"
    return res


def check_prediction(session: types.SimpleNamespace, res: dict, file_name: str) -> None:
    pred = res["prediction"]
    assert [p["idx"] for p in pred] == list(range(len(session.names)))
    assert [p["label"] for p in pred] == session.names, "class names must come from metadata.json channel_def"
    scores = [p["score"] for p in pred]
    ref = session.ref[file_name]
    assert all(abs(a - b) <= TOL for a, b in zip(scores, ref)), f"{file_name}: server {scores} vs bundle {ref}"
    assert abs(sum(scores) - 1.0) <= TOL, f"{file_name}: softmax scores sum to {sum(scores)}"
    assert max(scores) - min(scores) > 1e-3, "degenerate test: all classes equally likely"


# ----------------------------------------------------------------------------------------------------------------
# tests (in file order; the last one shuts the server down)
# ----------------------------------------------------------------------------------------------------------------
def test_info_lists_models_and_studies(session: types.SimpleNamespace) -> None:
    info = session.info
    models = info["models"]
    assert set(models) == {"xray", "volume3d", "untrained"}
    expected_labels = {n: i for i, n in enumerate(session.names)}
    for name, dim in (("xray", 2), ("volume3d", 3)):
        assert models[name]["type"] == "classification"
        assert models[name]["labels"] == expected_labels
        assert models[name]["dimension"] == dim
    assert "xray" in info["trainers"]
    # .jpeg, .dcm and .nii studies are all recognised
    assert info["datastore"]["total"] == 2 * N_PER_CLASS + 3, info["datastore"]
    status, ds = http("GET", f"{session.server.url}/datastore/?output=all")
    assert status == 200
    assert set(ds["objects"]) == {"CT_small", "anatomical", session.png_id, *session.labels}, ds["objects"].keys()


def test_infer_2d_jpeg_png_dicom_match_bundle(session: types.SimpleNamespace) -> None:
    for image_id in sorted(session.labels):
        check_prediction(session, infer(session, "xray", image_id), f"{image_id}.jpeg")
    check_prediction(session, infer(session, "xray", session.png_id), f"{session.png_id}.png")
    check_prediction(session, infer(session, "xray", "CT_small"), "CT_small.dcm")


def test_infer_3d_nifti_matches_bundle(session: types.SimpleNamespace) -> None:
    check_prediction(session, infer(session, "volume3d", "anatomical"), "anatomical.nii")


def test_model_without_checkpoint_refuses(session: types.SimpleNamespace) -> None:
    status, res = http("POST", f"{session.server.url}/infer/untrained?image={sorted(session.labels)[0]}", data=b"")
    assert status == 503, (status, res)
    assert "no checkpoint" in res["detail"]


def test_unknown_image_is_an_error(session: types.SimpleNamespace) -> None:
    status, _ = http("POST", f"{session.server.url}/infer/xray?image=does-not-exist", data=b"")
    assert status >= 400


def raw_request(method: str, url: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, dict[str, str], str]:
    """(status, lower-cased response headers, body text), never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode(errors="replace")


def test_default_server_answers_no_foreign_origin(session: types.SimpleNamespace) -> None:
    """Under the default start_server.sh a web page from another origin gets no CORS grant (MONAI Label alone: `*`)."""
    url = session.server.url
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = raw_request("OPTIONS", f"{url}/train/xray", preflight)
    assert "access-control-allow-origin" not in headers, (status, headers)
    assert status >= 400
    # a "simple" cross-origin POST (no preflight in browsers) is refused too, before it can queue anything
    status, headers, _ = raw_request("POST", f"{url}/infer/xray?image={sorted(session.labels)[0]}",
                                     {"Origin": "http://evil.example"}, data=b"")
    assert status == 403 and "access-control-allow-origin" not in headers
    # the server's own loopback origin still works from a browser
    own = url.replace("127.0.0.1", "localhost")
    status, headers, _ = raw_request("OPTIONS", f"{url}/info/", {**preflight, "Origin": own})
    assert status == 200 and headers.get("access-control-allow-origin") == own, (status, headers)


def test_train_from_datastore_labels_writes_new_checkpoint(session: types.SimpleNamespace) -> None:
    url = session.server.url
    for image_id, name in session.labels.items():
        body, ctype = multipart({"label": ("label.json", json.dumps({"label": name}).encode(), "application/json")})
        status, res = http("PUT", f"{url}/datastore/label?image={image_id}&tag=final", data=body,
                           headers={"Content-Type": ctype})
        assert status == 200, res

    trained = session.work / "model" / "xray" / "models" / "model.pt"
    assert not trained.exists()
    params = {"max_epochs": 1, "val_split": 0.34, "device": "cpu"}
    status, res = http("POST", f"{url}/train/xray", data=json.dumps(params).encode(),
                       headers={"Content-Type": "application/json"})
    assert status == 200, res

    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    task: dict = {}
    while time.monotonic() < deadline:
        status, task = http("GET", f"{url}/train/")
        if status == 200 and task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(3)
    details = "\n".join(task.get("details", []))
    assert task.get("status") == "DONE", f"training: {task.get('status')}\n{details}\n{session.server.log_tail()}"
    assert trained.is_file(), f"no new checkpoint at {trained}\n{details}"

    import torch

    state = torch.load(trained, map_location="cpu", weights_only=True)["model"]
    initial = torch.load(session.ckpt / "model_2d.pt", map_location="cpu", weights_only=True)["model"]
    assert state.keys() == initial.keys()
    assert any(not torch.equal(state[k], initial[k]) for k in state), "training did not change the weights"

    # the infer task now serves the new checkpoint
    status, info = http("GET", f"{url}/info/")
    assert info["models"]["xray"]["checkpoint"] == str(trained)
    res = infer(session, "xray", sorted(session.labels)[0])
    assert abs(sum(p["score"] for p in res["prediction"]) - 1.0) <= TOL


def test_shutdown_is_clean(session: types.SimpleNamespace) -> None:
    server = session.server
    assert server.proc.poll() is None, "server died before shutdown"
    code = server.stop()
    assert code is not None, f"server ignored SIGTERM and had to be killed:\n{server.log_tail()}"
    left = server.group_members()
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) != 0, "port still open"
