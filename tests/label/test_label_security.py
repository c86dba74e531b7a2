"""The MONAI Label server under attack, over real HTTP: code in /train bodies, a missing token, oversized uploads,
image ids that are paths, and secrets in the served log.

One server from ``monailabel_app/start_server.sh`` with ``LABEL_TOKEN`` set and a small ``LABEL_MAX_UPLOAD_BYTES``.
The CORS behaviour of the default start-up (no token) is checked in ``test_label_e2e.py`` against its own server.
"""

from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path
from typing import Iterator

import pytest

from test_label_e2e import (
    STARTUP_TIMEOUT_S,
    Server,
    free_port,
    http,
    make_checkpoint,
    multipart,
    raw_request,
    sample_studies,
)

pytestmark = [pytest.mark.label, pytest.mark.timeout(900)]

TOKEN = "s3cret-token-for-the-test"
LIMIT = 200_000  # bytes; LABEL_MAX_UPLOAD_BYTES of this server
PASSWORD = "hunter2-db-password"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    pytest.importorskip("monailabel", reason="MONAI Label runs in its own environment: bash monailabel_app/setup_env.sh")
    work = tmp_path_factory.mktemp("label_security")
    studies, picked = sample_studies(work, 1)
    ids = sorted(picked)
    (work / "ckpt").mkdir()
    make_checkpoint(work / "ckpt" / "model.pt", [], seed=0)
    conf = ["--conf", "models", "xray", "--conf", "model_path", str(work / "ckpt" / "model.pt"),
            "--conf", "model_dir", str(work / "model")]
    server = Server(studies, free_port(), conf, work,
                    env={"LABEL_TOKEN": TOKEN, "LABEL_MAX_UPLOAD_BYTES": str(LIMIT)})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        server.wait_ready(STARTUP_TIMEOUT_S, headers=auth)
        yield types.SimpleNamespace(work=work, studies=studies, server=server, url=server.url, auth=auth, ids=ids)
    finally:
        server.stop()


def test_token_is_required(guarded: types.SimpleNamespace) -> None:
    for method, path in (("GET", "/info/"), ("POST", "/train/xray"), ("POST", f"/infer/xray?image={guarded.ids[0]}"),
                         ("GET", "/logs/")):
        status, _ = http(method, guarded.url + path, data=b"{}" if method == "POST" else None,
                         headers={"Content-Type": "application/json"})
        assert status == 401, (method, path, status)
        status, _ = http(method, guarded.url + path, data=b"{}" if method == "POST" else None,
                         headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"})
        assert status == 401, (method, path, status)
    status, _ = http("GET", f"{guarded.url}/info/?token={TOKEN}")
    assert status == 401, "the token is read from the Authorization header only, never from the query string"
    status, res = http("POST", f"{guarded.url}/infer/xray?image={guarded.ids[0]}", data=b"", headers=guarded.auth)
    assert status == 200 and len(res["prediction"]) == 2, (status, res)


def payload(name: str, sentinel: Path) -> dict:
    """A /train body that would write ``sentinel`` if any of it reached MONAI's config evaluation."""
    code = f"$open({str(sentinel)!r}, 'w').write('1')"
    return {
        "dollar": {"max_epochs": code},
        "nested": {"device": ["cpu", code]},
        "target": {"max_epochs": {"_target_": "builtins.open", "file": str(sentinel), "mode": "w"}},
        "reference": {"val_split": "@network_def"},
    }[name]


@pytest.mark.parametrize("name", ["dollar", "nested", "target", "reference"])
def test_code_in_a_train_body_is_refused_before_queueing(guarded: types.SimpleNamespace, name: str) -> None:
    sentinel = guarded.work / f"sentinel_{name}"
    params = payload(name, sentinel)
    status, res = http("POST", f"{guarded.url}/train/xray", data=json.dumps(params).encode(),
                       headers={**guarded.auth, "Content-Type": "application/json"})
    assert 400 <= status < 500, (status, res)
    assert next(iter(params)) in res["detail"], res
    time.sleep(2)
    assert not sentinel.exists()
    status, task = http("GET", f"{guarded.url}/train/", headers=guarded.auth)
    assert status == 404, f"a training task was queued: {task}"


def test_tracking_uri_and_unknown_keys_are_refused_and_never_logged(guarded: types.SimpleNamespace) -> None:
    for params in ({"tracking_uri": f"http://alice:{PASSWORD}@127.0.0.1:9"}, {"run_id": "x"}, {"lr": 1},
                   {"max_epochs": 1.5}, {"device": "cuda; rm -rf /"}):
        status, res = http("POST", f"{guarded.url}/train/xray", data=json.dumps(params).encode(),
                           headers={**guarded.auth, "Content-Type": "application/json"})
        assert status == 422, (params, status, res)
        assert next(iter(params)) in res["detail"]
        assert PASSWORD not in json.dumps(res)
    status, logs = http("GET", f"{guarded.url}/logs/?lines=2000", headers=guarded.auth)
    assert status == 200
    assert PASSWORD not in str(logs) and TOKEN not in str(logs)
    assert PASSWORD not in guarded.server.log_tail(10**7) and TOKEN not in guarded.server.log_tail(10**7)


def test_upload_one_byte_over_the_limit_gets_413(guarded: types.SimpleNamespace) -> None:
    def body_of(total: int) -> tuple[bytes, str]:
        head, ctype = multipart({"file": ("big.png", b"", "application/octet-stream")})
        return multipart({"file": ("big.png", b"\0" * (total - len(head)), "application/octet-stream")})

    body, ctype = body_of(LIMIT + 1)
    assert len(body) == LIMIT + 1
    status, res = http("PUT", f"{guarded.url}/datastore/image?image=upload_big", data=body,
                       headers={**guarded.auth, "Content-Type": ctype})
    assert status == 413, (status, res)
    assert not list(guarded.studies.glob("upload_big*"))
    body, ctype = body_of(LIMIT)
    status, _ = http("PUT", f"{guarded.url}/datastore/image?image=upload_ok", data=body,
                     headers={**guarded.auth, "Content-Type": ctype})
    assert status != 413, "a body at the limit is accepted by the guard"


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "/etc/passwd", "..", "a/../../b", "x%00y", "C:evil",
                                      "..%2F..%2Fetc%2Fpasswd"])
def test_image_ids_that_leave_the_studies_folder_are_refused(guarded: types.SimpleNamespace, image_id: str) -> None:
    for method, path in (("POST", f"/infer/xray?image={image_id}"), ("GET", f"/datastore/image?image={image_id}"),
                         ("GET", f"/datastore/image/info?image={image_id}")):
        status, res = http(method, guarded.url + path, data=b"" if method == "POST" else None, headers=guarded.auth)
        assert status == 400, (method, path, status, res)


def test_foreign_origin_is_refused_even_with_the_token(guarded: types.SimpleNamespace) -> None:
    status, headers, _ = raw_request("POST", f"{guarded.url}/train/xray",
                                     {**guarded.auth, "Origin": "https://evil.example", "Content-Type": "text/plain"},
                                     data=b'{"max_epochs": 1}')
    assert status == 403 and "access-control-allow-origin" not in headers


def test_infer_never_reads_a_file_outside_the_studies_folder(guarded: types.SimpleNamespace) -> None:
    """MONAI Label reads request["image"] directly when that path exists; `params` may set it, and so may an id that
    names a file in the server's working directory. Both are refused; an upload still works."""
    outside = guarded.work / "outside.jpeg"  # the server's working directory, not the studies folder
    shutil.copy(next(guarded.studies.glob("*.jpeg")), outside)
    form, ctype = multipart({"params": (None, json.dumps({"image": str(outside)}).encode(), "application/json")})
    status, res = http("POST", f"{guarded.url}/infer/xray?image={guarded.ids[0]}", data=form,
                       headers={**guarded.auth, "Content-Type": ctype})
    assert status == 400, (status, res)
    status, res = http("POST", f"{guarded.url}/infer/xray?image=outside.jpeg", data=b"", headers=guarded.auth)
    assert status == 400, (status, res)
    upload, ctype = multipart({"file": ("mine.jpeg", outside.read_bytes(), "image/jpeg")})
    status, res = http("POST", f"{guarded.url}/infer/xray", data=upload, headers={**guarded.auth, "Content-Type": ctype})
    assert status == 200 and len(res["prediction"]) == 2, (status, res)
