"""Seed 004 (in-domain CXR pretraining with auxiliary targets): the view target, head sizes from the datalist, the
CheXpert laterals crash, multi-task fine-tuning, headers driving train.yaml, and Kermany's `pathogen` target.

Expected values are computed here from the fixtures' own files (CSV columns, file names) and from the loss formulas
written out by hand, never by the code under test.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cfg, run_bundle, user_error
from data_prep.__main__ import main as data_prep
from data_prep._testing import CHEXPERT_OBS, NIH_FINDINGS, make_chexpert, make_kermany, make_nih
from ffcl_monai.losses.auxiliary import (
    AuxTargetError, MaskedMultiHeadLoss, MultiTaskLoss, encode_view_target, resolve_heads,
)
from ffcl_monai.networks.classifier import Classifier, MultiTaskClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"image_size": [16, 16], "backbone": "resnet10", "batch_size": 8, "max_epochs": 1, "torch_threads": 1,
        "monitor_interval": 0, "log_model": False}
VIEW_HEADER = {"view_names": {"0": "AP", "1": "PA", "2": "LATERAL"}}
HEADS = {"view": {"kind": "ce"}, "sex": {"kind": "bce"}, "age": {"kind": "smooth_l1", "scale": 100.0}}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _datalist(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def chexpert_json(tmp_path_factory) -> Path:
    """CheXpert layout with lateral views kept (patients 1, 4, 7, 10, 64541 have one per study), --metadata."""
    root = tmp_path_factory.mktemp("cx")
    src = make_chexpert(root / "raw")
    out = root / "dl" / "cx.json"
    assert data_prep(["chexpert", str(src), "--out", str(out), "--metadata", "--val-count", "6", "--no-progress"]) == 0
    return out


# --- the view target and the head sizes ------------------------------------------------------------------------------

def test_view_target_codes_and_head_sizes_by_hand():
    items = [{"image": f"{i}.png", "view": v} for i, v in enumerate([0, 1, 2, None, 2, 0])]
    want = {  # stored AP 0 / PA 1 / LATERAL 2 -> each target's classes, by the definitions in the docs
        "frontal_lateral": ([0, 0, 1, None, 1, 0], 2),
        "ap_pa": ([0, 1, None, None, None, 0], 2),
        "ap_pa_lateral": ([0, 1, 2, None, 2, 0], 3),
        "as_is": ([0, 1, 2, None, 2, 0], 3),  # classes = the header's 3 view_names
    }
    for target, (codes, n) in want.items():
        enc = encode_view_target(items, {"view": {}}, VIEW_HEADER, target, "d.json")
        assert [e["view"] for e in enc] == codes, target
        specs = resolve_heads({"view": {"kind": "ce", "weight": 0.5}}, enc, VIEW_HEADER, target, "d.json")
        assert specs["view"]["num_outputs"] == n and specs["view"]["weight"] == 0.5, target
    assert [d["view"] for d in items] == [0, 1, 2, None, 2, 0]  # the input entries are not modified
    # no view_names in the header (a hand-made datalist): the values are the classes, their count from the data
    plain = [{"image": "a", "view": 0}, {"image": "b", "view": 3}]
    enc = encode_view_target(plain, HEADS, {}, "frontal_lateral", "d.json")
    assert resolve_heads({"view": {"kind": "ce"}}, enc, {}, "frontal_lateral", "d.json")["view"]["num_outputs"] == 4
    with pytest.raises(AuxTargetError, match="view_target"):
        encode_view_target(items, HEADS, VIEW_HEADER, "oblique", "d.json")


def test_resolve_heads_refuses_naming_the_entry_and_key():
    three_way = [{"image": f"img{i}.png", "view": i % 3} for i in range(6)]
    with pytest.raises(AuxTargetError) as e:
        resolve_heads({"view": {"kind": "ce", "num_outputs": 2}}, three_way, VIEW_HEADER, "ap_pa_lateral", "cx.json")
    msg = str(e.value)
    assert "cx.json, training[2] (img2.png)" in msg and "aux_heads#view#num_outputs" in msg and "= 2" in msg
    # frontal-only data (NIH): frontal vs lateral is constant -> refused, AP vs PA suggested
    frontal = encode_view_target([{"image": "a", "view": 0}, {"image": "b", "view": 1}], HEADS, VIEW_HEADER,
                                 "frontal_lateral", "nih.json")
    with pytest.raises(AuxTargetError, match=r"--view_target ap_pa"):
        resolve_heads({"view": {"kind": "ce"}}, frontal, VIEW_HEADER, "frontal_lateral", "nih.json")
    with pytest.raises(AuxTargetError, match=r"training\[1\].*binary head"):
        resolve_heads({"sex": {"kind": "bce"}}, [{"image": "a", "sex": 0}, {"image": "b", "sex": 2}], {}, "as_is", "d")
    with pytest.raises(AuxTargetError, match="whole class indices"):
        resolve_heads({"grade": {"kind": "ce"}}, [{"image": "a", "grade": 0}, {"image": "b", "grade": 1.5}], {},
                      "as_is", "d")
    with pytest.raises(AuxTargetError, match="must be a number or null"):
        resolve_heads({"sex": {"kind": "bce"}}, [{"image": "a", "sex": "M"}], {}, "as_is", "d")
    with pytest.raises(AuxTargetError, match="batch key"):  # multi-task fine-tuning: `label` is the pathology
        resolve_heads({"label": {"kind": "bce"}}, [{"image": "a", "label": 0}], {}, "as_is", "d",
                      reserved=("image", "label"))
    # pretraining may use the label field as one more metadata head (tests/test_kill_resume.py does)
    two = [{"image": "a", "label": 0}, {"image": "b", "label": 1}]
    assert resolve_heads({"label": {"kind": "ce"}}, two, {}, "as_is", "d")["label"]["num_outputs"] == 2
    # a value outside the header's names (a pathogen code 3 with 3 names)
    with pytest.raises(AuxTargetError, match=r"outside the 3 classes 0\.\.2 .*0 NORMAL"):
        resolve_heads({"pathogen": {"kind": "ce"}}, [{"image": "a", "pathogen": 0}, {"image": "b", "pathogen": 3}],
                      {"pathogen_names": {"0": "NORMAL", "1": "BACTERIA", "2": "VIRUS"}}, "as_is", "d")


# --- the multi-task loss, network and trainer ---------------------------------------------------------------------

def _ce(logits: list[float], y: int) -> float:
    return -logits[y] + math.log(sum(math.exp(v) for v in logits))


def _bce(z: float, y: float) -> float:
    return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))


def _smooth_l1(d: float, beta: float = 1.0) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def test_multitask_loss_by_hand():
    label_logits = [[2.0, -1.0], [0.5, 0.25], [-1.0, 1.5]]
    view_logits = [[1.0, 0.0], [0.0, 3.0], [0.2, 0.1]]
    sex_logits, age_pred = [0.3, -2.0, 1.0], [0.5, 0.1, 0.9]
    preds = {"label": torch.tensor(label_logits), "view": torch.tensor(view_logits),
             "sex": torch.tensor(sex_logits).reshape(3, 1), "age": torch.tensor(age_pred).reshape(3, 1)}
    nan = float("nan")
    targets = {"label": torch.tensor([0, 1, 1]), "view": torch.tensor([1.0, nan, 0.0]),
               "sex": torch.tensor([1.0, 0.0, nan]), "age": torch.tensor([nan, 270.0, 60.0])}
    heads = {"view": {"kind": "ce", "num_outputs": 2, "weight": 0.5}, "sex": {"kind": "bce", "weight": 2.0},
             "age": {"kind": "smooth_l1", "scale": 100.0, "weight": 1.0}}
    task = sum(_ce(label_logits[i], [0, 1, 1][i]) for i in range(3)) / 3
    view = (_ce(view_logits[0], 1) + _ce(view_logits[2], 0)) / 2        # sample 1 unknown
    sex = (_bce(0.3, 1.0) + _bce(-2.0, 0.0)) / 2                           # sample 2 unknown
    age = (_smooth_l1(0.1 - 2.7) + _smooth_l1(0.9 - 0.6)) / 2              # sample 0 unknown; years / 100
    loss = MultiTaskLoss(torch.nn.CrossEntropyLoss(), heads)
    total = loss(preds, targets)
    assert float(total) == pytest.approx(task + 0.5 * view + 2.0 * sex + 1.0 * age, rel=1e-5)
    assert loss.last["loss_label"] == pytest.approx(task, rel=1e-5)
    assert loss.last["loss_view"] == pytest.approx(view, rel=1e-5) and loss.last["known_view"] == 2
    # the auxiliary part alone is the pretraining loss
    assert float(MaskedMultiHeadLoss(heads)(preds, targets)) == pytest.approx(0.5 * view + 2.0 * sex + age, rel=1e-5)
    # a class target beyond the head: a clear error naming the key, not an IndexError
    with pytest.raises(AuxTargetError, match="num_outputs"):
        loss(preds, {**targets, "view": torch.tensor([2.0, 0.0, 1.0])})


def test_multitask_classifier_is_the_classifier_plus_heads():
    torch.manual_seed(0)
    clf = Classifier("resnet10", num_classes=3, dropout=0.2, freeze_backbone=True)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    mt = MultiTaskClassifier(clf, {"view": 2, "sex": 1})
    assert mt.classifier is clf and clf.state_dict().keys() == before.keys()  # the served model is unchanged
    assert {k for k in mt.state_dict() if not k.startswith("classifier.")} == {
        "aux_heads.view.weight", "aux_heads.view.bias", "aux_heads.sex.weight", "aux_heads.sex.bias"}
    mt.eval()
    x = torch.rand(4, 1, 16, 16)
    out = mt(x)
    torch.testing.assert_close(out["label"], clf(x))
    assert out["view"].shape == (4, 2) and out["sex"].shape == (4, 1)
    mt.train()
    assert not clf.backbone.training and clf.training  # the linear probe's frozen BatchNorm stays frozen
    with pytest.raises(TypeError, match="multi_gpu_train"):
        MultiTaskClassifier(torch.nn.parallel.DataParallel(clf), {"view": 2})


def test_multitask_trainer_batches_carry_the_targets_and_handlers_see_them():
    """lr 0: the weights stay put, so each iteration's loss can be recomputed from the network afterwards."""
    from monai.engines import IterationEvents

    from ffcl_monai.engines.auxiliary import MultiTaskTrainer

    torch.manual_seed(0)
    net = MultiTaskClassifier(Classifier("resnet10", num_classes=2), {"view": 2})
    nan = float("nan")
    batches = [
        {"image": torch.rand(3, 1, 16, 16), "label": torch.tensor([0, 1, 1]), "view": torch.tensor([1.0, nan, 0.0])},
        {"image": torch.rand(2, 1, 16, 16), "label": torch.tensor([1, 0]), "view": torch.tensor([0.0, nan])},
    ]
    heads = {"view": {"kind": "ce", "num_outputs": 2, "weight": 0.5}}
    trainer = MultiTaskTrainer("cpu", 1, batches, net, torch.optim.SGD(net.parameters(), lr=0.0),
                               MultiTaskLoss(torch.nn.CrossEntropyLoss(), heads), amp=False)
    seen = []
    trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED,
                              lambda e: seen.append((sorted(e.state.output["label"]), sorted(e.state.output["pred"]))))
    trainer.run()
    assert seen == [(["label", "view"], ["label", "view"])] * 2
    net.train()  # as in the run: BatchNorm on batch statistics, so each batch gives the same outputs again
    task, view, n_view = [], [], []
    with torch.no_grad():
        for b in batches:
            out = net(b["image"])
            lg, vl = out["label"].tolist(), out["view"].tolist()
            task.append(sum(_ce(lg[i], int(b["label"][i])) for i in range(len(lg))) / len(lg))
            known = [i for i in range(len(vl)) if not math.isnan(float(b["view"][i]))]
            view.append(sum(_ce(vl[i], int(b["view"][i])) for i in known) / len(known))
            n_view.append(len(known))
    m = trainer.state.metrics
    # epoch means over samples: task by batch size (3 + 2), view by known targets (2 + 1)
    assert m["task_loss"] == pytest.approx((3 * task[0] + 2 * task[1]) / 5, rel=1e-4)
    assert m["aux_loss_view"] == pytest.approx((n_view[0] * view[0] + n_view[1] * view[1]) / 3, rel=1e-4)
    assert float(trainer.state.output["loss"]) == pytest.approx(task[1] + 0.5 * view[1], rel=1e-4)


# --- data_prep: headers, NIH, Kermany ------------------------------------------------------------------------------

def _train_yaml_keys(datalist: Path) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(cfg("train.yaml"))
    parser["datalist"] = str(datalist)
    return {k: parser.get_parsed_content(k) for k in ("task", "num_classes", "class_names")}


def test_headers_drive_train_yaml_for_chexpert_and_nih(chexpert_json, tmp_path):
    # the class names are the fixture CSVs' own columns (CheXpert) and findings (NIH), in order
    with open(next(chexpert_json.parent.parent.glob("raw/*/train.csv")), newline="") as f:
        cx_columns = next(csv.reader(f))[5:]
    assert _train_yaml_keys(chexpert_json) == {"task": "multilabel", "num_classes": 14, "class_names": cx_columns}
    out = tmp_path / "cx_class.json"
    src = next(chexpert_json.parent.parent.glob("raw/*"))
    assert data_prep(["chexpert", str(src), "--out", str(out), "--uncertain", "class", "--val-count", "6",
                      "--no-progress"]) == 0
    assert _train_yaml_keys(out) == {"task": "multilabel", "num_classes": 28,
                                     "class_names": cx_columns + [f"{c} (uncertain)" for c in cx_columns]}
    nih = make_nih(tmp_path / "nih")
    out = tmp_path / "nih.json"
    assert data_prep(["nih", str(nih), "--out", str(out), "--val-count", "5", "--no-progress"]) == 0
    assert _train_yaml_keys(out) == {"task": "multilabel", "num_classes": 14, "class_names": list(NIH_FINDINGS)}
    assert cx_columns == CHEXPERT_OBS


def test_nih_view_is_ap_pa_and_frontal_lateral_is_refused(tmp_path, capsys):
    src = make_nih(tmp_path / "nih")
    out = tmp_path / "nih.json"
    assert data_prep(["nih", str(src), "--out", str(out), "--metadata", "--val-count", "5", "--no-progress"]) == 0
    assert "--view_target ap_pa" in capsys.readouterr().err  # data_prep says it when it writes the datalist
    d = _datalist(out)
    header = {k: v for k, v in d.items() if k not in ("training", "validation", "test")}
    items = encode_view_target(d["training"], HEADS, header, "frontal_lateral", str(out))
    assert {e["view"] for e in items} == {0}  # every NIH image is frontal
    with pytest.raises(AuxTargetError, match="--view_target ap_pa"):
        resolve_heads({"view": {"kind": "ce"}}, items, header, "frontal_lateral", str(out))
    items = encode_view_target(d["training"], HEADS, header, "ap_pa", str(out))
    assert resolve_heads({"view": {"kind": "ce"}}, items, header, "ap_pa", str(out))["view"]["num_outputs"] == 2
    positions = {r["Image Index"]: r["View Position"] for r in _rows(src / "Data_Entry_2017.csv")}
    assert [e["view"] for e in items] == [{"AP": 0, "PA": 1}[positions[Path(e["image"]).name]] for e in items]


def test_kermany_pathogen_target_keeps_labels_and_splits(tmp_path):
    src = make_kermany(tmp_path / "raw", test=True)
    plain, meta = tmp_path / "plain.json", tmp_path / "meta.json"
    for out, extra in ((plain, []), (meta, ["--metadata"])):
        assert data_prep(["kermany", str(src), "--out", str(out), "--val-count", "10", "--no-progress", *extra]) == 0
    a, b = _datalist(plain), _datalist(meta)
    for split in ("training", "validation", "test"):
        assert [(e["image"], e["label"]) for e in a[split]] == [(e["image"], e["label"]) for e in b[split]], split
        for e in b[split]:
            name = Path(e["image"]).name
            want = 0 if "/NORMAL/" in e["image"] else 1 if "_bacteria_" in name else 2 if "_virus_" in name else None
            assert e["pathogen"] == want and e["label"] == int(want != 0), name
        assert "pathogen" not in a[split][0]
    assert b["pathogen_names"] == {"0": "NORMAL", "1": "BACTERIA", "2": "VIRUS"} and "pathogen_names" not in a
    assert {e["pathogen"] for e in b["training"]} == {0, 1, 2}
    header = {k: v for k, v in b.items() if k not in ("training", "validation", "test")}
    assert resolve_heads({"pathogen": {"kind": "ce"}}, b["training"], header, "frontal_lateral",
                         str(meta))["pathogen"]["num_outputs"] == 3
    # multi-task fine-tuning on it: the binary classifier, plus a 3-class pathogen head (its size from the header)
    out = tmp_path / "mt"
    run_bundle(cfg("train.yaml", "multitask.yaml"), datalist=str(meta), output_dir=str(out),
               aux_heads={"pathogen": {"kind": "ce", "weight": 0.5}}, **TINY)
    assert _resume_heads(out, "aux_heads.") == {"pathogen.weight": (3, 512), "pathogen.bias": (3,)}
    assert set(torch.load(out / "models" / "model.pt", weights_only=True)["model"]) == set(
        Classifier("resnet10", num_classes=2).state_dict())
    row = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["aux_loss_pathogen"]) and np.isfinite(row["task_loss"]) and "val_auc" in row


# --- workflows on the CheXpert layout with laterals ------------------------------------------------------------------

def _resume_heads(out: Path, prefix: str) -> dict[str, tuple]:
    state = torch.load(out / "checkpoints" / "resume.pt", weights_only=True)["model"]
    return {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


def test_aux_pretraining_on_chexpert_with_laterals(chexpert_json, tmp_path):
    """Before: the stored codes 0/1/2 met a 2-output view head -> IndexError at the first lateral."""
    views = [e["view"] for e in _datalist(chexpert_json)["training"]]
    assert 2 in views and {0, 1} <= set(views)  # laterals, APs and PAs are all there
    out = tmp_path / "aux"
    run_bundle(cfg("train.yaml", "pretrain_aux.yaml"), datalist=str(chexpert_json), output_dir=str(out), **TINY)
    assert _resume_heads(out, "heads.")["view.weight"] == (2, 512)  # frontal vs lateral (resnet10: 512 features)
    row = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(row[k]) for k in ("aux_loss_view", "aux_loss_sex", "aux_loss_age"))
    assert torch.load(out / "backbone.pt", weights_only=True)["view_target"] == "frontal_lateral"


def test_aux_pretraining_three_way_view_and_a_too_small_head(chexpert_json, tmp_path):
    out = tmp_path / "aux3"
    run_bundle(cfg("train.yaml", "pretrain_aux.yaml"), datalist=str(chexpert_json), output_dir=str(out),
               view_target="ap_pa_lateral", aux_heads={"view": {"kind": "ce"}}, **TINY)
    assert _resume_heads(out, "heads.") == {"view.weight": (3, 512), "view.bias": (3,)}
    bad = tmp_path / "bad"
    with pytest.raises(Exception) as err:
        run_bundle(cfg("train.yaml", "pretrain_aux.yaml"), datalist=str(chexpert_json), output_dir=str(bad),
                   view_target="ap_pa_lateral", aux_heads={"view": {"kind": "ce", "num_outputs": 2}}, **TINY)
    msg = str(user_error(err.value))
    assert "aux_heads#view#num_outputs" in msg and str(chexpert_json) in msg and "'view' = 2" in msg
    assert not bad.exists()  # refused before the output folder was claimed, let alone trained


def test_multitask_finetuning_on_chexpert(chexpert_json, tmp_path):
    out = tmp_path / "mt"
    run_bundle(cfg("train.yaml", "multitask.yaml"), datalist=str(chexpert_json), output_dir=str(out),
               aux_heads={"view": {"kind": "ce", "weight": 0.5}, "sex": {"kind": "bce", "weight": 0.25}}, **TINY)
    # the saved (served) model is the plain 14-label classifier, nothing more
    best = torch.load(out / "models" / "model.pt", weights_only=True)["model"]
    clf = Classifier("resnet10", num_classes=14)
    assert set(best) == set(clf.state_dict())
    clf.load_state_dict(best, strict=True)
    # the heads train and resume with it
    assert _resume_heads(out, "aux_heads.") == {"view.weight": (2, 512), "view.bias": (2,), "sex.weight": (1, 512),
                                                "sex.bias": (1,)}
    row = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite(row[k]) for k in ("task_loss", "aux_loss_view", "aux_loss_sex", "train_loss"))
    assert "val_auc" in row  # validation selected the model on the pathology labels


def test_plain_training_on_chexpert_with_metadata_and_uncertain_ignore(tmp_path):
    """train.yaml alone on a CheXpert datalist written with --metadata (nulls in sex/age) and --uncertain ignore
    (label_mask only on entries with a -1): the extra fields must not reach the collate (they broke it: KeyError
    'label_mask', 'Could not infer dtype of NoneType'), and the -1 labels are masked by the loss."""
    src = make_chexpert(tmp_path / "raw")
    dl = tmp_path / "dl" / "cx.json"
    assert data_prep(["chexpert", str(src), "--out", str(dl), "--metadata", "--uncertain", "ignore",
                      "--val-count", "6", "--no-progress"]) == 0
    entries = _datalist(dl)["training"]
    assert any("label_mask" in e for e in entries) and any("label_mask" not in e for e in entries)
    assert any(e.get("sex") is None for e in entries) or any(e.get("age") is None for e in entries)
    out = tmp_path / "run"
    run_bundle(cfg("train.yaml"), datalist=str(dl), output_dir=str(out), **TINY)
    row = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["train_loss"]) and "val_auc" in row
