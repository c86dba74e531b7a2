"""Bad input fails fast with a message that names the entry or key and the fix; inputs are never modified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, cfg, make_2d, run_bundle, tree_digest, user_error


def _train(datalist: Path, out: Path, **extra) -> None:
    o = {**{k: v for k, v in FAST.items() if k != "n_bootstrap"}, **extra}
    run_bundle(cfg("train.yaml", *extra.pop("overlays", [])) if "overlays" in extra else cfg("train.yaml"),
               datalist=str(datalist), output_dir=str(out), **{k: v for k, v in o.items() if k != "overlays"})


@pytest.fixture()
def data(tmp_path) -> Path:
    return make_2d(tmp_path / "data", counts=(8, 4, 4))


def _edit(datalist: Path, fn) -> None:
    content = json.loads(datalist.read_text())
    fn(content)
    datalist.write_text(json.dumps(content))


def _expect(datalist: Path, out: Path, pattern: str, **extra) -> BaseException:
    before = tree_digest(datalist.parent)
    with pytest.raises(Exception) as info:
        _train(datalist, out, **extra)
    err = user_error(info.value)
    assert pytest.importorskip("re").search(pattern, str(err)), str(err)
    assert tree_digest(datalist.parent) == before, "the input data was modified"
    assert not (out / "models" / "model.pt").exists(), "training started before the error"
    return err


def test_missing_file(data, tmp_path):
    _edit(data, lambda c: c["training"][3].update(image="training/nope.png"))
    err = _expect(data, tmp_path / "o", r"do not exist")
    assert "training[3]" in str(err) and "nope.png" in str(err)


def test_truncated_image(data, tmp_path):
    victim = data.parent / "training" / "img_002.png"
    victim.write_bytes(victim.read_bytes()[:150])
    err = _expect(data, tmp_path / "o", r"cannot read image")
    assert "img_002.png" in str(err) and "data_prep check" in str(err)


def test_label_outside_classes(data, tmp_path):
    _edit(data, lambda c: c["validation"][1].update(label=7))
    err = _expect(data, tmp_path / "o", r"label 7 is outside")
    assert "validation[1]" in str(err) and "num_classes" in str(err)


def test_2d_data_given_to_3d_config(data, tmp_path):
    # the header says 2D: stopped at start
    _expect(data, tmp_path / "o1", r"holds 2D images.*spatial_dims=3", overlays=["3d.yaml"], image_size=[16, 16, 16])
    # no header: the image itself is checked while the cache is built, before training
    _edit(data, lambda c: c.pop("spatial_dims"))
    err = _expect(data, tmp_path / "o2", r"has 2 spatial dims.*spatial_dims=3", overlays=["3d.yaml"], image_size=[16, 16, 16])
    assert ".png" in str(err)


def test_empty_split(data, tmp_path):
    _edit(data, lambda c: c.update(validation=[]))
    _expect(data, tmp_path / "o", r"split 'validation'.*empty")


def test_num_classes_mismatch_names_the_override(data, tmp_path):
    # the config takes the classes from the header; a command line that contradicts it is stopped, naming the fix
    _edit(data, lambda c: c.update(num_classes=3, labels={"0": "a", "1": "b", "2": "c"}))
    _expect(data, tmp_path / "o", r"--num_classes 3", num_classes=2)


def test_classes_come_from_the_datalist_header(data, tmp_path):
    """No --num_classes/--task/--class_names: a 3-class multiclass header gives a 3-way head and its class names."""
    _edit(data, lambda c: c.update(num_classes=3, task="multiclass", labels={"0": "a", "1": "b", "2": "c"}))
    out = tmp_path / "o"
    _train(data, out)
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state.get("model", state)["head.weight"].shape[0] == 3
    summary = json.loads((out / "dataset_summary.json").read_text())
    assert "a" in json.dumps(summary) and "c" in json.dumps(summary), summary


class NanOnSecondEpochLoss(torch.nn.Module):
    """Cross-entropy that turns NaN after ``good_calls`` iterations (simulates a diverging run)."""

    def __init__(self, good_calls: int = 2) -> None:
        super().__init__()
        self.calls = 0
        self.good_calls = good_calls

    def forward(self, logits, target):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if self.calls > self.good_calls else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(Exception) as info:
        # 8 training images, batch 4: epoch 1 is good (2 iterations), epoch 2 diverges
        _train(data, out, batch_size=4, max_epochs=3, loss={"_target_": "test_bad_inputs.NanOnSecondEpochLoss"})
    err = user_error(info.value)
    assert isinstance(err, FloatingPointError) and "epoch 2" in str(err) and "learning_rate" in str(err)
    resume = torch.load(out / "checkpoints" / "resume.pt", weights_only=True)
    assert resume["trainer"]["epoch"] == 1
    best = torch.load(out / "models" / "model.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())
