"""The seed overlays: `seed001_simclr.yaml` (SimCLR, seed 001), `seed002_ff.yaml` (keras Forward-Forward, seed 002)
and `seed003_ff.yaml` (Sadam & Bui-Thanh's notes, seed 003) give each seed's settings with one file.

The expected values below are written from the seed texts (quoted next to each), not copied from the overlays; the
configs are resolved as `python -m monai.bundle run` would (ConfigParser through ffcl_monai.workflows.runner, nothing
trained) and the resolved objects are checked by behaviour where a value alone would say little (the temperature in
the loss value, the head's layers, the FF layer normalisation and goodness against the seed's formulas). One tiny
1-epoch run per overlay shows that it runs end to end. docs/pretraining.md and docs/forward_forward.md hold the
"seed value | project default | why" tables.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import CONFIGS, cfg, run_bundle
from ffcl_monai.engines.forward_forward import TensorBatches, create_ff_trainer, shuffled_labels
from ffcl_monai.losses.forward_forward import ff_softplus_loss
from ffcl_monai.networks.forward_forward import FFNet
from ffcl_monai.workflows import runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIMCLR = ["train.yaml", "pretrain_simclr.yaml", "seed001_simclr.yaml"]
FF002 = ["train.yaml", "ff.yaml", "seed002_ff.yaml"]
FF003 = ["train.yaml", "ff.yaml", "seed003_ff.yaml"]

# Seed 001, "Contrastive Learning Pipeline".
SEED001 = {
    "temperature": 1.0,  # "in many implementations, including mine, we set the temperature term to 1"
    "batch_size": 50,  # "a larger MNIST dataset of 10,000 images, with a batch size of 50, and now only 100 epochs"
    "max_epochs": 100,
    "backbone": "resnet18",  # "For more complex datasets, a ResNet-18 or ResNet-34 can be used in place of the vanilla CNN"
}
# Seed 002, keras-io examples/vision/forwardforward.py.
SEED002 = {
    "hidden": [500, 500],  # FFNetwork(dims=[784, 500, 500])
    "threshold": 1.5,  # FFDense.__init__: self.threshold = 1.5
    "ff_loss": "softplus",  # log(1 + exp(concat([-g_pos + threshold, g_neg - threshold])))
    "negatives": "shuffled_label",  # random_y = tf.random.shuffle(y)
    "schedule": "simultaneous",  # every layer trains on every batch (train_step loops over the layers)
    "epochs": 250,  # epochs = 250
    "batch_size": 60000,  # train_dataset.batch(60000)
    "learning_rate": 0.03,  # keras.optimizers.Adam(learning_rate=0.03)
    "embedding": "overlay",  # overlay_y_on_x
    "prediction": "goodness",  # predict_one_sample: argmax over labels of the summed goodness
    "skip_first": False,  # the goodness of every layer is summed
    "val_source": "none",  # model.fit on all of x_train, no validation
    "max_shift": 0,
    "lr_schedule": "constant",
    "image_size": [28, 28],  # MNIST, dims=[784, ...]
    "label_scale": 1.0,  # overlay_y_on_x: one-hot x the image maximum, unscaled
    "weight_decay": 0.0,  # keras Adam's default
}
# Seed 003, Sadam & Bui-Thanh, "Notes on the Forward-Forward Algorithm", section 4 and the adj_FFA0_0 row.
SEED003 = {
    "hidden": [800, 10],  # "A 784x800x10 network was used in all cases"
    "ff_loss": "L0_adjusted",  # Eq. 4.1, adj_FFA0_0 (the best FFA row)
    "negatives": "other_sample",  # Eq. 3.3: x_i* = x_j, j != i
    "schedule": "greedy",  # "Training is a greedy layer-by-layer approach"
    "epochs": 400,  # Epochs 400
    "batch_size": 50,  # Start 50
    "learning_rate": 0.001,  # Rate 1e-3
    "prediction": "goodness",  # "the label with the highest probability is chosen"
    "image_size": [28, 28],  # MNIST, 784 inputs
    "goodness": "sum",  # Eq. 3.5: g = ||a||^2
    "weight_decay": 0.0,  # none in the notes
}


def _parser(files: list[str], **overrides):
    return runner.load(runner.config_files(files), overrides)


def _yaml_keys(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _defined(content: dict, key: str) -> bool:
    if key in content:
        return True
    node = content
    for part in key.split("#"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# ------------------------------------------------------------------------------------------- every overlay
@pytest.mark.parametrize("files", [SIMCLR, FF002, FF003], ids=["seed001", "seed002", "seed003"])
def test_overlay_sets_only_keys_its_workflow_has(files: list[str]) -> None:
    """A misspelt key in an overlay would be a new, unused key and the seed's value would silently not apply."""
    base = [_yaml_keys(f) for f in files[:-1]]
    unknown = [k for k in _yaml_keys(files[-1]) if not any(_defined(b, k) for b in base)]
    assert not unknown, f"bundle/configs/{files[-1]} sets keys {files[:-1]} do not define: {unknown}"


# ------------------------------------------------------------------------------------------- seed 001
def _nt_xent_by_hand(z1: list[list[float]], z2: list[list[float]], tau: float) -> float:
    """SimCLR Eq. 1 written out with loops: the mean over the 2B anchors of -log softmax over the 2B - 1 others."""
    z = [*z1, *z2]
    n, b = len(z), len(z1)
    unit = [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in z]
    sim = [[sum(a * c for a, c in zip(unit[i], unit[k])) for k in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(sim[i][k] / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(sim[i][pos] / tau) / denom)
    return total / n


def test_seed001_simclr_values() -> None:
    p = _parser(SIMCLR)
    for key, value in SEED001.items():
        assert p.get_parsed_content(key) == value, key
    # tau = 1 is what the loss computes with (a hand-computed NT-Xent at tau = 1 and, for contrast, at 0.5)
    z1, z2 = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]], [[1.0, 0.2, 1.5], [0.0, -1.0, 0.3]]
    loss = p.get_parsed_content("loss")(torch.tensor(z1), torch.tensor(z2))
    assert loss.item() == pytest.approx(_nt_xent_by_hand(z1, z2, 1.0), rel=1e-5)
    assert loss.item() != pytest.approx(_nt_xent_by_hand(z1, z2, 0.5), rel=1e-3)
    # "a MLP classification head with ReLU nonlinearity": Linear-ReLU-Linear, no BatchNorm, on ResNet-18's 512 features
    net = p.get_parsed_content("network_def")
    assert [type(m) for m in net.projector.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert net.projector.net[0].in_features == 512
    # the project's default head keeps its BatchNorm
    default_head = _parser(SIMCLR[:-1]).get_parsed_content("network_def").projector.net
    assert any(isinstance(m, nn.BatchNorm1d) for m in default_head)


def test_seed001_simclr_one_epoch(tiny2d, tmp_path: Path) -> None:
    out = tmp_path / "simclr_seed001"
    run_bundle(cfg(*SIMCLR), datalist=str(tiny2d), output_dir=str(out), image_size=[16, 16], max_epochs=1,
               monitor_plot="none")
    ckpt = torch.load(out / "backbone.pt", weights_only=True)
    assert ckpt["method"] == "simclr" and ckpt["temperature"] == 1.0 and ckpt["backbone_name"] == "resnet18"
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and math.isfinite(rows[0]["train_loss"])


# ------------------------------------------------------------------------------------------- seed 002
def _seed002_dense(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Seed 002's FFDense.call: relu(dense(x / (||x|| + 1e-4)))."""
    w, b = layer.linear.weight, layer.linear.bias
    return F.relu((x / (x.norm(dim=1, keepdim=True) + 1e-4)) @ w.t() + b)


def test_seed002_ff_values() -> None:
    p = _parser(FF002)
    for key, value in SEED002.items():
        assert p.get_parsed_content(key) == value, key
    assert p.get_parsed_content("ff_max_epochs") == 250  # simultaneous: every layer in each of the 250 epochs
    net = p.get_parsed_content("network_def")
    assert isinstance(net, FFNet)
    assert [(l.linear.in_features, l.linear.out_features) for l in net.layers] == [(784, 500), (500, 500)]
    torch.manual_seed(0)
    x = torch.rand(5, 784) * 3
    h = net.layers[0](x)
    torch.testing.assert_close(h, _seed002_dense(net.layers[0], x))  # x / (||x|| + 1e-4), not rms
    torch.testing.assert_close(net.layer_goodness(h), h.square().mean(1))  # ops.mean(ops.power(h, 2), 1)
    # overlay_y_on_x: the first m pixels become a one-hot code times the image maximum
    y = torch.tensor([1, 0, 1, 1, 0])
    ref = x.clone()
    ref[:, : net.num_classes] = 0
    ref[torch.arange(5), y] = x.amax(1)
    torch.testing.assert_close(net.embed(x, net.one_hot(y)[:, None, :])[:, 0], ref)
    opt = p.get_parsed_content("optimizer")
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[0]["weight_decay"] == 0.0


def test_shuffled_labels_are_a_permutation_that_can_hit_the_true_label() -> None:
    """tf.random.shuffle(y): the negatives' labels are the batch's labels reordered, so each class keeps its count and
    about sum_c p_c^2 of them (0.1 for 10 balanced classes) are the sample's own label."""
    torch.manual_seed(0)
    y = torch.arange(10).repeat(1000)
    neg = shuffled_labels(y)
    assert torch.equal(neg.sort().values, y.sort().values)
    assert 0.08 < (neg == y).float().mean().item() < 0.12


def test_shuffled_label_step_uses_the_permuted_labels() -> None:
    """One engine step with `negatives: shuffled_label` gives the seed's loss: positives with y, negatives with
    y[randperm] drawn from the same generator state, each layer's goodness through the softplus loss at theta."""
    torch.manual_seed(0)
    net = FFNet(12, 3, (6,), embedding="concat", norm="l2", goodness="mean")
    before = copy.deepcopy(net)
    x, y = torch.rand(8, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    engine = create_ff_trainer(net, torch.optim.Adam(net.parameters(), lr=0.03), negatives="shuffled_label",
                               threshold=1.5, loss="softplus")
    torch.manual_seed(123)
    engine.run(TensorBatches(x, y, batch_size=8, shuffle=False), max_epochs=1)
    torch.manual_seed(123)
    y_neg = y[torch.randperm(len(y))]
    eye = torch.eye(3)
    with torch.no_grad():
        g_pos = before.layers[0](before.embed(x, eye[y][:, None, :]))[:, 0].square().mean(1)
        g_neg = before.layers[0](before.embed(x, eye[y_neg][:, None, :]))[:, 0].square().mean(1)
    expected = ff_softplus_loss(g_pos, g_neg, 1.5)
    assert engine.state.output["layer0_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_seed002_ff_one_epoch(tiny2d, tmp_path: Path) -> None:
    out = tmp_path / "ff_seed002"
    run_bundle(cfg(*FF002), datalist=str(tiny2d), output_dir=str(out), image_size=[16, 16], epochs=1, n_bootstrap=20)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"value", "ci_low", "ci_high"} <= set(metrics["auc"])
    resolved = json.loads((out / "config_resolved.json").read_text())
    assert resolved["negatives"] == "shuffled_label" and resolved["threshold"] == 1.5 and resolved["norm"] == "l2"
    assert (out / "models" / "model.pt").is_file()  # val_source none: the final weights


# ------------------------------------------------------------------------------------------- seed 003
def test_seed003_ff_values() -> None:
    p = _parser(FF003)
    for key, value in SEED003.items():
        assert p.get_parsed_content(key) == value, key
    assert p.get_parsed_content("ff_max_epochs") == 800  # greedy: 400 epochs for each of the 2 layers
    net = p.get_parsed_content("network_def")
    assert [(l.linear.in_features, l.linear.out_features) for l in net.layers] == [(784, 800), (800, 10)]
    torch.manual_seed(0)
    h = net.layers[1](torch.rand(4, 800))
    torch.testing.assert_close(net.layer_goodness(h), h.square().sum(1))  # Eq. 3.5: g = ||a||^2
    opt = p.get_parsed_content("optimizer")
    assert type(opt) is torch.optim.ASGD and opt.param_groups[0]["lr"] == 0.001  # "Opt ASGD", "Rate 1e-3"


def test_seed003_ff_one_epoch(tiny2d, tmp_path: Path) -> None:
    out = tmp_path / "ff_seed003"
    run_bundle(cfg(*FF003), datalist=str(tiny2d), output_dir=str(out), image_size=[16, 16], epochs=1, n_bootstrap=20)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"value", "ci_low", "ci_high"} <= set(metrics["auc"])
    resolved = json.loads((out / "config_resolved.json").read_text())
    assert resolved["negatives"] == "other_sample" and resolved["ff_loss"] == "L0_adjusted"
    assert resolved["optimizer"]["_target_"] == "torch.optim.ASGD"
