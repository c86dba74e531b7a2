"""Unit checks of the MONAI Label app's own code (no server): --conf parsing, label mapping, config merging.

Run in the label environment: ``.label-venv/bin/python -m pytest -m label tests/label``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.label

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "monailabel_app"
CONFIGS = REPO / "bundle" / "configs"
NAMES = {0: "NORMAL", 1: "PNEUMONIA"}


@pytest.fixture(scope="module")
def lib():
    pytest.importorskip("monailabel", reason="MONAI Label runs in its own environment: bash monailabel_app/setup_env.sh")
    sys.path.insert(0, str(APP))
    try:
        import lib.configs
        import lib.models
        import lib.trainers.classifier

        yield lib
    finally:
        sys.path.remove(str(APP))


def test_parse_models_defaults_and_overrides(lib, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"x")
    specs = lib.models.parse_models({"models": "xray,volume3d", "model_path": str(ckpt), "model_dir": str(tmp_path)})
    xray, vol = specs
    assert (xray.dimension, xray.overlays, xray.checkpoint) == (2, (), ckpt.resolve())
    assert (vol.dimension, vol.overlays) == (3, ("3d.yaml",))
    assert vol.checkpoint == CONFIGS.parent / "models" / "model_3d.pt"  # model_path is the first model's only
    assert xray.trained_checkpoint == tmp_path.resolve() / "xray" / "models" / "model.pt"
    assert [p.name for p in vol.config_files("inference")] == ["inference.yaml", "3d.yaml"]
    custom = lib.models.parse_models({"models": "oct", "oct_overlays": ""})[0]
    assert (custom.dimension, custom.overlays) == (2, ())


@pytest.mark.parametrize(
    "conf, message",
    [
        ({"models": "ct"}, "unknown model name"),
        ({"models": ""}, "empty"),
        ({"models": "xray", "model_path": "/nonexistent/model.pt"}, "does not exist"),
        ({"models": "xray", "bundle_path": "/tmp"}, "is not a bundle"),
    ],
)
def test_parse_models_errors(lib, conf: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lib.models.parse_models(conf)


def test_class_names_from_channel_def(lib) -> None:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    names = lib.models.class_names(meta)
    assert names == {int(k): v for k, v in meta["network_data_format"]["outputs"]["pred"]["channel_def"].items()}


@pytest.mark.parametrize(
    "file_name, content, info, expected",
    [
        ("a.json", '{"label": "PNEUMONIA"}', None, 1),
        ("a.json", '{"class": "normal"}', None, 0),
        ("a.json", '"Pneumonia"', None, 1),
        ("a.json", "1", None, 1),
        ("a.txt", "NORMAL\n", None, 0),
        ("a.txt", "0", None, 0),
        ("a.json", "{}", {"label": "PNEUMONIA"}, 1),
        ("a.nii.gz", "not read", {"label": 0}, 0),
    ],
)
def test_read_class_label(lib, tmp_path: Path, file_name: str, content: str, info, expected: int) -> None:
    path = tmp_path / file_name
    path.write_text(content)
    assert lib.trainers.classifier.read_class_label(str(path), info, NAMES) == expected


@pytest.mark.parametrize("content, info", [('{"label": "COVID"}', None), ("2", None), ("{}", None), ("{", None)])
def test_read_class_label_errors(lib, tmp_path: Path, content: str, info) -> None:
    path = tmp_path / "a.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"label|JSON"):
        lib.trainers.classifier.read_class_label(str(path), info, NAMES)


def test_overlay_merge_matches_monai_and_skips_other_workflow_sections(lib, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    files = [CONFIGS / "train.yaml", CONFIGS / "3d.yaml"]
    merged = lib.configs.merge_config_files(files)
    assert merged == ConfigParser.load_config_files([str(f) for f in files]), "must merge exactly as MONAI does"
    assert merged["spatial_dims"] == 3
    # an overlay key for another workflow's section: MONAI raises KeyError, the app skips it
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("spatial_dims: 3\ntrain#augmentations: []\n+deterministic_transforms: []\n")
    infer = lib.configs.merge_config_files([CONFIGS / "inference.yaml", overlay])
    assert infer["spatial_dims"] == 3 and "train" not in infer


def test_torchvision_stub_only_covers_utils(lib) -> None:
    code = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1])\n"
        "from lib.compat import install_torchvision_stub\n"
        "real = importlib.util.find_spec('torchvision') is not None\n"
        "installed = install_torchvision_stub()\n"
        "assert installed != real\n"
        "from torchvision.utils import make_grid\n"
        "if installed:\n"
        "    try:\n"
        "        import torchvision\n"
        "        raise SystemExit('torchvision must stay un-importable')\n"
        "    except ImportError:\n"
        "        pass\n"
        "    try:\n"
        "        make_grid(None)\n"
        "        raise SystemExit('the stand-in must raise')\n"
        "    except ImportError as e:\n"
        "        assert 'not available' in str(e)\n"
        "import monailabel.transform.post  # the import that needs it\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(APP)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


# --- outside input: /train bodies and the server guard (no server; a stand-in ASGI app behind the guard) ----------
@pytest.fixture(scope="module")
def guard_mod(lib):
    sys.path.insert(0, str(APP))
    try:
        import lib.server_guard
        import lib.train_request

        yield lib
    finally:
        sys.path.remove(str(APP))


@pytest.mark.parametrize(
    "params, key",
    [
        ({"max_epochs": "$__import__('os').system('true')"}, "max_epochs"),
        ({"device": ["cpu", "$1"]}, "device[1]"),
        ({"max_epochs": {"_target_": "builtins.open"}}, "max_epochs"),
        ({"tracking_uri": "http://u:p@host"}, "tracking_uri"),
        ({"run_id": "x"}, "run_id"),
        ({"model_filename": "../../x.pt"}, "model_filename"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"max_epochs": 0}, "max_epochs"),
    ],
)
def test_train_params_refused(guard_mod, params: dict, key: str) -> None:
    from ffcl_monai.workflows.untrusted import UntrustedInputError

    with pytest.raises(UntrustedInputError) as e:
        guard_mod.train_request.validate_train_params(params, "POST /train/xray")
    assert key in str(e.value)
    assert "u:p@" not in str(e.value)


def test_train_request_assembled_by_monailabel(guard_mod) -> None:
    req = {"model": "xray", "bundle_path": "/b", "device": ["cpu"], "pretrained": True, "max_epochs": "2",
           "val_split": 0.2, "multi_gpu": False, "seed": 3}
    assert guard_mod.train_request.validate_assembled_request(req, ["xray"]) == {
        "model": "xray", "device": "cpu", "pretrained": True, "max_epochs": 2, "val_split": 0.2, "multi_gpu": False,
        "seed": 3}
    with pytest.raises(ValueError, match="unknown model"):
        guard_mod.train_request.validate_assembled_request({**req, "model": "other"}, ["xray"])


@pytest.mark.parametrize("value, bad", [("IM-0001", False), ("1.2.840.113619.2.55", False), ("a..b", False),
                                        ("../x", True), ("/etc/passwd", True), ("..", True), ("a\\b", True),
                                        ("x\x00y", True), ("C:x", True), ("~root", True), ("a/b", True)])
def test_bad_image_ids(guard_mod, value: str, bad: bool) -> None:
    assert guard_mod.server_guard.bad_id(value) is bad


def test_allowed_origins_default_to_loopback(guard_mod) -> None:
    origins = guard_mod.server_guard.allowed_origins([], 8123)
    assert "http://127.0.0.1:8123" in origins and "http://localhost:8123" in origins
    assert all("8123" in o for o in origins)
    assert guard_mod.server_guard.allowed_origins(["https://viewer.example.org/"], 1) == ["https://viewer.example.org"]


def _call(guard, method: str, path: str, headers: dict[str, str], body: bytes = b"", chunks: int = 1):
    """Drive the ASGI guard once; returns (status, headers, body, what the inner app received or None)."""
    import asyncio

    seen: dict = {}

    async def inner(scope, receive, send):
        data = b""
        more = True
        while more:
            m = await receive()
            data += m.get("body", b"")
            more = m.get("more_body", False)
        seen["body"] = data
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard.app = inner
    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    messages = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]
    sent: list = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    path_only, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": path_only, "query_string": query.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out_body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), out_body, seen.get("body")


def test_guard_behaviour(guard_mod) -> None:
    sg = guard_mod.server_guard
    guard = sg.ServerGuard(None, sg.allowed_origins([], 8000), token="tok", max_body_bytes=100)
    auth = {"Authorization": "Bearer tok"}
    assert _call(guard, "GET", "/info/", {})[0] == 401
    assert _call(guard, "GET", "/info/", {"Authorization": "Bearer nope"})[0] == 401
    assert _call(guard, "GET", "/info/", auth)[0] == 200
    # foreign origin: refused, even a preflight, and nothing reaches the app
    status, headers, _, reached = _call(guard, "OPTIONS", "/train/xray", {"Origin": "http://evil.example"})
    assert status == 403 and "access-control-allow-origin" not in headers and reached is None
    # own origin preflight passes without the token (browsers send none with a preflight)
    assert _call(guard, "OPTIONS", "/info/", {"Origin": "http://localhost:8000"})[0] == 200
    # body limit: by Content-Length and while streaming a chunked body
    assert _call(guard, "PUT", "/datastore/image?image=a", {**auth, "content-length": "101"}, b"x" * 101)[0] == 413
    assert _call(guard, "PUT", "/datastore/image?image=a", auth, b"x" * 101, chunks=3)[0] == 413
    assert _call(guard, "PUT", "/datastore/image?image=a", auth, b"x" * 100, chunks=3)[0] == 200
    # image ids
    assert _call(guard, "POST", "/infer/xray?image=..%2F..%2Fetc%2Fpasswd", auth)[0] == 400
    assert _call(guard, "POST", "/infer/xray?image=IM-0001", auth)[0] == 200
    # /train: checked, then replayed unchanged
    status, _, body, reached = _call(guard, "POST", "/train/xray", auth, b'{"max_epochs": "$1"}')
    assert status == 422 and b"max_epochs" in body and reached is None
    status, _, _, reached = _call(guard, "POST", "/train/xray", auth, b'{"max_epochs": 2}', chunks=2)
    assert status == 200 and reached == b'{"max_epochs": 2}'
    assert _call(guard, "POST", "/train/", auth, b'{"xray": {"tracking_uri": "x"}}')[0] == 422
    assert _call(guard, "POST", "/train/xray", auth, b"not json")[0] == 400


@pytest.mark.parametrize("env, code", [({"LABEL_HOST": "0.0.0.0"}, 2), ({"LABEL_HOST": "10.1.2.3"}, 2)])
def test_start_server_refuses_a_public_host_without_auth(tmp_path: Path, env: dict, code: int) -> None:
    """MONAI Label's own default is every interface with auth off: the script refuses that without a token."""
    import os

    run_env = {k: v for k, v in os.environ.items() if k not in ("LABEL_TOKEN", "LABEL_ALLOW_NO_AUTH")}
    res = subprocess.run(["bash", str(APP / "start_server.sh"), str(tmp_path), "8123"], env={**run_env, **env},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == code and "LABEL_TOKEN" in res.stderr, (res.returncode, res.stderr)
