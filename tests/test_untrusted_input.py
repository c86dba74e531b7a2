"""Outside text (datalist headers, request bodies) never reaches MONAI's `$`-evaluation (GHSA-873f-pvrv-4x83).

Every entry point that reads a datalist is given a header whose class name would run code if a config evaluated it,
and one whose class name is a `_target_` dict; each must refuse (naming the key) and no sentinel file may appear.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FAST, cfg, make_2d, run_bundle
from ffcl_monai.workflows import untrusted
from ffcl_monai.workflows.untrusted import UntrustedInputError, header_overrides, refuse_config_syntax, validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _payload(sentinel: Path) -> str:
    return f"$open({str(sentinel)!r}, 'w').write('1') and 'NORMAL'"


@pytest.mark.parametrize(
    "value, key_in_error",
    [
        ("$__import__('os').system('true')", "`x`"),
        ("  $1+1", "`x`"),
        ("@network_def", "`x`"),
        ("%bundle/configs/train.yaml#network_def", "`x`"),
        (["ok", ["fine", "$1"]], "x[1][1]"),
        ({"a": {"_target_": "os.system", "command": "true"}}, "x.a"),
        ({"_requires_": "$1"}, "`x`"),
        ({"$key": 1}, "`x`"),
    ],
)
def test_config_syntax_is_refused_at_any_depth(value, key_in_error):
    with pytest.raises(UntrustedInputError) as e:
        refuse_config_syntax(value, "x", "test input")
    assert key_in_error in str(e.value) and "test input" in str(e.value)


def test_plain_data_passes():
    refuse_config_syntax({"labels": {"0": "NORMAL", "1": "50% opacity"}, "n": [1, 2.5, True, None]}, "h", "t")


def test_validate_types_and_allow_list():
    schema = {
        "max_epochs": untrusted.integer(1, 100),
        "lr": untrusted.number(0, 1),
        "pretrained": untrusted.boolean(),
        "device": untrusted.device(),
        "data": untrusted.path(),
    }
    ok = validate({"max_epochs": "3", "lr": "1e-3", "pretrained": "false", "device": ["cuda:1"], "data": "/x"}, schema, "req")
    assert ok == {"max_epochs": 3, "lr": 0.001, "pretrained": False, "device": "cuda:1", "data": "/x"}
    bad = [
        {"max_epochs": "$__import__('os')"},
        {"max_epochs": 1.5},
        {"max_epochs": True},
        {"max_epochs": 0},
        {"lr": "nan"},
        {"device": "cuda; rm -rf /"},
        {"device": "$'cpu'"},
        {"tracking_uri": "http://evil"},
        {"data": "a\0b"},
    ]
    for raw in bad:
        with pytest.raises(UntrustedInputError) as e:
            validate(raw, schema, "POST /train")
        assert f"`{next(iter(raw))}`" in str(e.value)


def test_header_overrides_are_typed():
    hdr = {"task": "multiclass", "num_classes": 4, "spatial_dims": 2, "labels": {"1": "B", "0": "A", "2": 3, "3": "D"},
           "description": "anything"}
    assert header_overrides(hdr, "d.json") == {"task": "multiclass", "num_classes": 4, "spatial_dims": 2,
                                                "class_names": ["A", "B", "3", "D"]}
    with pytest.raises(UntrustedInputError, match="spatial_dims"):
        header_overrides({"spatial_dims": "$3"}, "d.json")
    with pytest.raises(UntrustedInputError, match="description"):
        header_overrides({"description": "@network_def"}, "d.json")


def _poisoned(root: Path, labels) -> Path:
    path = make_2d(root, counts=(8, 4, 4), size=32)
    content = json.loads(path.read_text())
    content["labels"] = labels
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def sentinel(tmp_path) -> Path:
    return tmp_path / "sentinel.txt"


@pytest.fixture(params=["dollar", "target"])
def poisoned(request, tmp_path, sentinel) -> Path:
    if request.param == "dollar":
        labels = {"0": _payload(sentinel), "1": "PNEUMONIA"}
    else:
        labels = {"0": {"_target_": "builtins.open", "file": str(sentinel), "mode": "w"}, "1": "PNEUMONIA"}
    return _poisoned(tmp_path / "data", labels)


def test_ablation_refuses_a_poisoned_header(poisoned, sentinel, tmp_path):
    from ffcl_monai.ablate import main

    with pytest.raises(SystemExit) as e:
        main(["--datalist", str(poisoned), "--output-dir", str(tmp_path / "abl"), "--variants", "rbp-random",
              "--backbone", "resnet10", "--image-size", "32", "--max-epochs", "1", "--batch-size", "8",
              "--set", "n_bootstrap=20"])
    assert e.value.code not in (0, None)
    assert "labels.0" in str(e.value.code)
    assert not sentinel.exists()


def test_train_workflow_refuses_a_poisoned_header(poisoned, sentinel, tmp_path):
    with pytest.raises(Exception) as e:
        run_bundle(cfg("train.yaml"), datalist=str(poisoned), output_dir=str(tmp_path / "run"), **FAST)
    assert "labels.0" in repr(e.value) or "labels.0" in str(e.value.__cause__)
    assert not sentinel.exists()


def test_ffcl_pipeline_refuses_a_poisoned_header(poisoned, sentinel, tmp_path):
    with pytest.raises(Exception):
        run_bundle(cfg("train.yaml", "ffcl.yaml"), datalist=str(poisoned), output_dir=str(tmp_path / "ffcl"),
                   local_epochs=1, global_epochs=1, **FAST)
    assert not sentinel.exists()
    assert not (tmp_path / "ffcl" / "models" / "model.pt").exists()


def test_label_efficiency_refuses_a_poisoned_header(poisoned, sentinel, tmp_path):
    from ffcl_monai.evaluation.label_efficiency import main
    from ffcl_monai.networks.backbones import build_backbone
    from ffcl_monai.networks.checkpoints import save_backbone

    ckpt = tmp_path / "backbone.pt"
    save_backbone(ckpt, build_backbone("resnet10"))
    with pytest.raises(Exception) as e:
        main(["--pretrained_ckpt", str(ckpt), "--datalist", str(poisoned), "--output_dir", str(tmp_path / "curve"),
              "--fractions", "1.0", "--modes", "probe", "--inits", "random", "--max_epochs", "1",
              "--backbone", "resnet10", "--image_size", "[32, 32]", "--batch_size", "8"])
    assert "labels.0" in repr(e.value) or "labels.0" in str(e.value.__cause__)
    assert not sentinel.exists()
