"""MONAI Label ``/infer`` with ``{"saliency": true}``: a Grad-CAM map next to unchanged class scores.

A real server (``monailabel_app/start_server.sh``, offline, default guard) serves three models:
``xray`` (2D, 64 px), ``volume3d`` (3D overlay, 28^3) and ``big`` (2D, an overlay with ``image_size`` 96 x 80, whose
map is pooled down to the documented 64 x 53). Checked:

- without the option the reply has no ``saliency`` (default off) and ``/info`` offers the option, off;
- with it, the scores are exactly those without it, and the map has the model input's shape (2D and 3D) or the
  documented pooled shape, values in [0, 1], explains the top class, and comes with an RGBA heat-map PNG that holds
  no image pixels;
- the map equals the one the bundle's own inference workflow writes with ``--save_saliency true``;
- Grad-CAM++ on request; a malformed option is a 400 naming it, never a 500.

Run in the label environment: ``.label-venv/bin/python -m pytest -q -m label tests/label/test_label_saliency.py``.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from test_label_e2e import (  # noqa: I001 (helpers of the end-to-end test, same directory)
    CONFIGS, STARTUP_TIMEOUT_S, Server, class_names, free_port, http, inference_overlay, make_checkpoint,
    multipart, sample_studies,
)

pytestmark = [pytest.mark.label, pytest.mark.timeout(1800)]

BIG_SIZE = [96, 80]
BIG_REPLY = [64, 53]  # longest axis pooled to 64, aspect kept: round(80 * 64 / 96) = 53


def bundle_saliency(images: list[Path], checkpoint: Path, out_dir: Path, overlays: list[Path]) -> dict[str, dict]:
    """Scores and maps from the bundle's inference workflow with ``--save_saliency true``, by file name."""
    configs = [str(CONFIGS / "inference.yaml"), *map(str, overlays)]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
           "--meta_file", str(CONFIGS / "metadata.json"), "--images", json.dumps([str(p) for p in images]),
           "--checkpoint", str(checkpoint), "--output_dir", str(out_dir), "--save_saliency", "true"]
    res = subprocess.run(cmd, cwd=out_dir.parent, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"bundle inference failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    names = class_names()
    return {Path(r["image"]).name: {"scores": [r[n] for n in names], "map": np.load(out_dir / r["saliency"])}
            for r in json.loads((out_dir / "inference.json").read_text())}


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[types.SimpleNamespace]:
    pytest.importorskip("monailabel", reason="MONAI Label runs in its own environment: monailabel_app/setup_env.sh")
    import nibabel

    work = tmp_path_factory.mktemp("label_saliency")
    studies, picked = sample_studies(work, 1)
    ids = list(picked)  # one per class, in class order
    shutil.copy(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii", studies / "anatomical.nii")

    ckpt = work / "ckpt"
    ckpt.mkdir()
    make_checkpoint(ckpt / "model_2d.pt", [], seed=0)
    make_checkpoint(ckpt / "model_3d.pt", [CONFIGS / "3d.yaml"], seed=1)
    big = work / "big.yaml"
    big.write_text(f"image_size: {json.dumps(BIG_SIZE)}\n")

    conf = [
        "--conf", "models", "xray,volume3d,big",
        "--conf", "model_path", str(ckpt / "model_2d.pt"),
        "--conf", "volume3d_model_path", str(ckpt / "model_3d.pt"),
        "--conf", "big_model_path", str(ckpt / "model_2d.pt"),
        "--conf", "big_overlays", str(big),
        "--conf", "big_dimension", "2",
        "--conf", "model_dir", str(work / "model"),
    ]
    server = Server(studies, free_port(), conf, work)
    try:
        # the reference runs while the server starts
        ref = bundle_saliency(sorted(studies.glob("*.jpeg")), ckpt / "model_2d.pt", work / "ref_2d", [])
        ref.update(bundle_saliency([studies / "anatomical.nii"], ckpt / "model_3d.pt", work / "ref_3d",
                                   [inference_overlay(CONFIGS / "3d.yaml", work)]))
        info = server.wait_ready(STARTUP_TIMEOUT_S)
        yield types.SimpleNamespace(work=work, server=server, info=info, ids=ids, ref=ref, names=class_names())
    finally:
        if server.proc.poll() is None:
            print(server.log_tail())
        server.stop()


def infer(session: types.SimpleNamespace, model: str, image_id: str, params: dict | None = None,
          status_expected: int = 200) -> dict:
    url = f"{session.server.url}/infer/{model}?image={image_id}"
    if params is None:
        status, res = http("POST", url, data=b"")
    else:
        body, ctype = multipart({"params": (None, json.dumps(params).encode(), "text/plain")})
        status, res = http("POST", url, data=body, headers={"Content-Type": ctype})
    assert status == status_expected, f"{url} {params} -> {status}: {res}\n{session.server.log_tail()}"
    return res


def scores(res: dict) -> list[float]:
    return [p["score"] for p in res["prediction"]]


def check_map(session: types.SimpleNamespace, res: dict, input_shape: list[int], shape: list[int],
              method: str = "gradcam") -> np.ndarray:
    sal = res["saliency"]
    assert sal["method"] == method
    assert sal["input_shape"] == input_shape and sal["shape"] == shape
    m = np.asarray(sal["map"], dtype=np.float64)
    assert list(m.shape) == shape
    assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 + 1e-6
    top = int(np.argmax(scores(res)))
    assert sal["class_idx"] == top and sal["label"] == session.names[top]
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(sal["heatmap_png"]))) as png:
        assert png.format == "PNG" and png.mode == "RGBA" and min(png.size) >= 256
        alpha = np.asarray(png)[..., 3]
    # the map alone, no image pixels: transparent where the map is 0, at most half opaque
    assert alpha.max() <= 128 and (alpha.max() > 0) == (m.max() > 0)
    return m


def test_info_offers_saliency_off_by_default(session: types.SimpleNamespace) -> None:
    for model in ("xray", "volume3d", "big"):
        config = session.info["models"][model]["config"]
        assert config["saliency"] is False and config["saliency_method"] == "gradcam", config
    res = infer(session, "xray", session.ids[0])
    assert "saliency" not in res and len(res["prediction"]) == len(session.names)


def test_2d_saliency_same_scores_and_input_shape(session: types.SimpleNamespace) -> None:
    for image_id in session.ids:
        plain = infer(session, "xray", image_id)
        res = infer(session, "xray", image_id, {"saliency": True})
        assert scores(res) == scores(plain), "the saliency option changed the scores"
        m = check_map(session, res, [64, 64], [64, 64])
        ref = session.ref[f"{image_id}.jpeg"]
        assert np.abs(np.asarray(scores(res)) - ref["scores"]).max() <= 1e-4
        # the same map as the bundle's inference workflow (the reply rounds to 4 decimals)
        assert np.abs(m - ref["map"]).max() <= 1e-3, np.abs(m - ref["map"]).max()
    off = infer(session, "xray", session.ids[0], {"saliency": False})
    assert "saliency" not in off


def test_3d_saliency_has_the_volume_shape(session: types.SimpleNamespace) -> None:
    plain = infer(session, "volume3d", "anatomical")
    res = infer(session, "volume3d", "anatomical", {"saliency": "true"})
    assert scores(res) == scores(plain)
    m = check_map(session, res, [28, 28, 28], [28, 28, 28])
    assert np.abs(m - session.ref["anatomical.nii"]["map"]).max() <= 1e-3


def test_large_input_map_is_pooled_to_documented_shape(session: types.SimpleNamespace) -> None:
    plain = infer(session, "big", session.ids[1])
    res = infer(session, "big", session.ids[1], {"saliency": True, "saliency_method": "gradcampp"})
    assert scores(res) == scores(plain)
    check_map(session, res, BIG_SIZE, BIG_REPLY, method="gradcampp")


def test_malformed_saliency_options_are_400(session: types.SimpleNamespace) -> None:
    res = infer(session, "xray", session.ids[0], {"saliency": "maybe"}, status_expected=400)
    assert "saliency" in res["detail"]
    res = infer(session, "xray", session.ids[0], {"saliency": True, "saliency_method": "lime"}, status_expected=400)
    assert "saliency_method" in res["detail"]
    assert "saliency" not in infer(session, "xray", session.ids[0])  # the server still answers normally
