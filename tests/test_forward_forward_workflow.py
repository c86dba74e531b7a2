"""The ff bundle workflow end to end on the embedded Kermany sample (tiny settings), FF and the backprop baseline."""

from __future__ import annotations

import json
import os

import pytest

from ffcl_monai import bundle_root

CONFIGS = [os.path.join(bundle_root(), "configs", "train.yaml"), os.path.join(bundle_root(), "configs", "ff.yaml")]
SAMPLE = os.path.join(bundle_root(), "sample", "kermany64", "datalist.json")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.skipif(not os.path.isfile(SAMPLE), reason="embedded sample datalist missing")
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"method": "ff", "embedding": "concat", "prediction": "goodness", "val_source": "auto"}, id="ff"),
        # the other two cover the same wiring with other keys: slow suite (make test-slow)
        pytest.param(
            {"method": "ff", "schedule": "greedy", "prediction": "linear", "val_source": "none", "readout_epochs": 2},
            id="ff-greedy-linear", marks=pytest.mark.slow,
        ),
        pytest.param({"method": "backprop", "val_source": "carve"}, id="backprop", marks=pytest.mark.slow),
    ],
)
def test_ff_workflow_writes_metrics(tmp_path, overrides) -> None:
    from monai.bundle import run

    out = tmp_path / "run"
    run(
        config_file=CONFIGS,
        datalist=SAMPLE,
        output_dir=str(out),
        image_size=[16, 16],
        hidden=[32, 32],
        threshold=32.0,
        epochs=2,
        batch_size=64,
        n_bootstrap=20,
        **overrides,
    )
    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    # operating point as evaluate.yaml: chosen on the model-selection split, applied to the test split; without a
    # validation split (val_source: none) nothing is fitted and the rule is the fixed 0.5
    op = report["operating_point"]
    if overrides["val_source"] == "none":
        assert op["chosen_on"] == "fixed" and op["at_threshold"]["threshold"] == pytest.approx(0.5)
    else:
        assert op["rule"] == "youden" and op["chosen_on"] == "validation" and op["same_split"] is False
        assert op["n_chosen_on"] > 0 and 0.0 < op["at_threshold"]["threshold"] < 1.0
    assert report["calibration"]["ece"] >= 0.0
    for key in ("accuracy", "f1", "auc"):
        assert {"value", "ci_low", "ci_high"} <= set(metrics[key])
    assert (out / "models" / "model.pt").is_file()
    if overrides["method"] == "ff":
        assert (out / "goodness.png").is_file()
