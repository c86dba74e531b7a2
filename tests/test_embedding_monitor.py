"""The online embedding monitor (kNN / linear-probe accuracy and AUC on frozen embeddings, 2D plot) in every
pretraining workflow: its kNN against scikit-learn, that it never changes training, that its numbers land in MLflow,
the unlabeled-datalist skip, FFCL per-block numbers, Forward-Forward layers, and (slow) torchrun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import cfg, make_2d, run_bundle

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"image_size": [16, 16], "backbone": "resnet10", "batch_size": 8}
QUIET = {"monitor_plot": "none"}  # workflow tests that are not about the plot skip t-SNE time


def _runs(out: Path) -> tuple[mlflow.MlflowClient, dict]:
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ffcl_monai")
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _steps(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


# ------------------------------------------------------------------------------------------------------------------
# the numbers
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (60, 0.07)])
def test_knn_equals_sklearn(num_classes, k, temperature):
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.neighbors import KNeighborsClassifier

    from ffcl_monai.handlers.embedding_monitor import knn_metrics, knn_scores

    rng = np.random.default_rng(num_classes * 100 + k)
    centres = rng.normal(size=(num_classes, 16))
    yb = rng.integers(0, num_classes, 60)
    yq = rng.integers(0, num_classes, 40)
    bank = (centres[yb] * 0.7 + rng.normal(size=(60, 16))).astype(np.float32)  # float32, as embeddings are
    query = (centres[yq] * 0.7 + rng.normal(size=(40, 16))).astype(np.float32)

    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights=lambda d: np.exp((1 - d) / temperature))
    proba = ref.fit(bank, yb).predict_proba(query)
    ours = knn_scores(torch.from_numpy(bank), yb, torch.from_numpy(query), k, temperature, num_classes, "multiclass")
    np.testing.assert_allclose(ours, proba, atol=1e-6, rtol=0)

    task = "binary" if num_classes == 2 else "multiclass"
    m = knn_metrics(bank, yb, query, yq, k, temperature, num_classes, task)
    want_auc = roc_auc_score(yq, proba[:, 1]) if num_classes == 2 else roc_auc_score(yq, proba, multi_class="ovr")
    assert abs(m["acc"] - accuracy_score(yq, proba.argmax(1))) < 1e-6
    assert abs(m["auc"] - want_auc) < 1e-6


def test_knn_multilabel_ignores_unknown_and_probe_separates():
    from ffcl_monai.handlers.embedding_monitor import knn_scores, probe_metrics

    bank = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([[1, -1], [0, 1], [-1, 0]])
    s = knn_scores(bank, labels, np.array([[1.0, 0.05]]), k=3, temperature=0.1, task="multilabel")
    w = np.exp((bank @ np.array([1.0, 0.05]) / np.linalg.norm([1.0, 0.05]) / np.linalg.norm(bank, axis=1)) / 0.1)
    np.testing.assert_allclose(s[0], [w[0] / (w[0] + w[1]), w[1] / (w[1] + w[2])], rtol=1e-9)

    rng = np.random.default_rng(0)
    y = np.arange(40) % 3
    x = np.eye(3)[y] * 3 + rng.normal(scale=0.3, size=(40, 3))
    m = probe_metrics(x[:30], y[:30], x[30:], y[30:], 3, "multiclass")
    assert m["auc"] == 1.0 and m["acc"] == 1.0
    assert math.isnan(probe_metrics(x[:5], np.zeros(5), x[30:], y[30:], 3, "multiclass")["auc"])  # one class only


def test_capped_subset_is_exact_stratified_and_seeded():
    from ffcl_monai.handlers.embedding_monitor import capped_subset

    items = [{"image": f"{i}.png", "label": int(i % 10 < 3)} for i in range(100)]  # 30 positives
    sub = capped_subset(items, 20, seed=1)
    assert len(sub) == 20 and sum(d["label"] for d in sub) == 6
    assert sub == capped_subset(items, 20, seed=1) and sub != capped_subset(items, 20, seed=2)
    assert [d["image"] for d in sub] == sorted((d["image"] for d in sub), key=lambda s: int(s.split(".")[0]))
    assert capped_subset(items, 500) == items
    rare = items + [{"image": "x.png", "label": 2}]
    assert 2 in {d["label"] for d in capped_subset(rare, 10)}  # every class kept when the cap allows


def test_handler_schedule_restores_state_and_never_leaves_stale_numbers(tiny2d, tmp_path):
    """interval 2 over 3 epochs: epoch 0 (before training), 2 and the last; module flags and RNG states restored."""
    from ignite.engine import Engine, Events
    from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityd

    from ffcl_monai.data.transforms import EnsureChannelsd, LabelToTensord, LoadImageNamedd
    from ffcl_monai.handlers.embedding_monitor import EmbeddingMonitor
    from ffcl_monai.networks.classifier import Classifier

    transforms = [LoadImageNamedd(keys="image", image_only=True, ensure_channel_first=True),
                  EnsureChannelsd(keys="image"), ScaleIntensityd(keys="image"),
                  Resized(keys="image", spatial_size=(16, 16)),
                  LabelToTensord(keys="label"), EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)]
    torch.manual_seed(0)
    net = Classifier("resnet10", num_classes=2)
    net.train()
    net.backbone.blocks[0].eval()  # a module that training keeps in eval mode must stay so
    monitor = EmbeddingMonitor(net, Compose(transforms), str(tiny2d), interval=2, k=[3, 5], plot="pca",
                               output_dir=tmp_path, batch_size=4)
    seen: dict[int, dict] = {}

    def step(engine, batch):
        return {"loss": torch.rand(())}

    engine = Engine(step)
    monitor.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.__setitem__(e.state.epoch, dict(e.state.metrics)))
    engine.run([0, 1], max_epochs=3)
    assert [r["epoch"] for r in monitor.history] == [0, 2, 3]
    assert "knn_auc" not in seen[1] and {"knn_acc", "knn_auc", "knn5_acc", "knn5_auc", "probe_auc"} <= set(seen[2])
    assert 0.0 <= seen[3]["knn_auc"] <= 1.0 and seen[3]["monitor_time_s"] > 0
    assert net.training and net.backbone.training and not net.backbone.blocks[0].training
    rows = [json.loads(x) for x in (tmp_path / "embedding_monitor.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 2, 3]
    plots = sorted(p.name for p in (tmp_path / "embeddings").iterdir())
    assert plots == ["epoch_000.png", "epoch_002.png", "epoch_003.png"]


def test_handler_leaves_rng_untouched(tiny2d, tmp_path):
    """The generators after a monitored epoch are exactly where they were before it."""
    from ignite.engine import Engine
    from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityd

    from ffcl_monai.data.transforms import EnsureChannelsd, LabelToTensord, LoadImageNamedd
    from ffcl_monai.handlers.embedding_monitor import EmbeddingMonitor
    from ffcl_monai.networks.backbones import build_backbone

    transforms = Compose([LoadImageNamedd(keys="image", image_only=True, ensure_channel_first=True),
                          EnsureChannelsd(keys="image"), ScaleIntensityd(keys="image"),
                          Resized(keys="image", spatial_size=(16, 16)), LabelToTensord(keys="label"),
                          EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)])
    monitor = EmbeddingMonitor(build_backbone("resnet10"), transforms, str(tiny2d), interval=1, plot="pca+tsne",
                               output_dir=tmp_path, batch_size=4)
    monitor._prepare()
    import random

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    monitor.run(Engine(lambda e, b: None), epoch=1)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_handler_bounds_its_cache_and_never_raises(tiny2d, tmp_path):
    from ignite.engine import Engine
    from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityd

    from ffcl_monai.data.transforms import EnsureChannelsd, LabelToTensord, LoadImageNamedd
    from ffcl_monai.handlers.embedding_monitor import EmbeddingMonitor
    from ffcl_monai.networks.backbones import build_backbone

    transforms = Compose([LoadImageNamedd(keys="image", image_only=True, ensure_channel_first=True),
                          EnsureChannelsd(keys="image"), ScaleIntensityd(keys="image"),
                          Resized(keys="image", spatial_size=(16, 16)), LabelToTensord(keys="label"),
                          EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)])
    ten_images = 10 * 16 * 16 * 4 / 2**30
    monitor = EmbeddingMonitor(build_backbone("resnet10"), transforms, str(tiny2d), interval=1, plot="none",
                               max_cache_gb=ten_images)
    monitor._prepare()  # 12 + 6 labelled images would not fit: fewer, both classes kept
    n_train, n_val = len(monitor._data["train"][1]), len(monitor._data["val"][1])
    assert n_train + n_val <= 10 and set(monitor._data["val"][1].tolist()) == {0, 1}

    def broken(net, x):
        raise RuntimeError("out of memory")

    no_val = EmbeddingMonitor(build_backbone("resnet10"), transforms, train_items=[{"image": "a.png", "label": 0}],
                              val_items=[])
    no_val._prepare()
    assert "val_source: none" in no_val.skip_reason

    failing = EmbeddingMonitor(build_backbone("resnet10"), transforms, str(tiny2d), interval=1, plot="none",
                               features=broken)
    engine = Engine(lambda e, b: None)
    failing.attach(engine)
    engine.run([0], max_epochs=1)  # a failing monitor warns; the run goes on
    assert "knn_auc" not in engine.state.metrics and failing.history == []


# ------------------------------------------------------------------------------------------------------------------
# workflows
# ------------------------------------------------------------------------------------------------------------------
def test_simclr_same_weights_with_and_without_monitor_and_numbers_in_mlflow(tiny2d, tmp_path):
    common = dict(datalist=str(tiny2d), max_epochs=2, **TINY)
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml"), output_dir=str(tmp_path / "plain"), monitor_interval=0,
               **common)
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml"), output_dir=str(tmp_path / "mon"), monitor_interval=1,
               monitor_k=[3, 5], **common)
    a = torch.load(tmp_path / "plain" / "backbone.pt", weights_only=True)["backbone"]
    b = torch.load(tmp_path / "mon" / "backbone.pt", weights_only=True)["backbone"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the monitor changed training"

    client, runs = _runs(tmp_path / "mon")
    run = runs["simclr:mon"].info.run_id
    for key in ("knn_acc", "knn_auc", "knn5_acc", "knn5_auc", "probe_acc", "probe_auc", "monitor_time_s"):
        assert _steps(client, run, key) == [0, 1, 2], key  # epoch 0 = before training, then every epoch
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run, "knn_auc"))
    assert _artifacts(client, run, "embeddings") == {f"embeddings/epoch_00{e}.png" for e in range(3)}
    assert (tmp_path / "mon" / "embeddings" / "epoch_002.png").stat().st_size > 5000
    client, runs = _runs(tmp_path / "plain")
    assert "knn_auc" not in runs["simclr:plain"].data.metrics


def test_unlabeled_datalist_skips_with_a_message(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    entries = []
    for i in range(8):
        Image.fromarray((rng.uniform(0, 1, (16, 16)) * 255).astype(np.uint8)).save(tmp_path / f"img/{i}.png")
        entries.append({"image": f"img/{i}.png"})
    datalist = tmp_path / "unlabeled.json"
    datalist.write_text(json.dumps({"spatial_dims": 2, "training": entries, "validation": entries[:4]}))
    out = tmp_path / "run"
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml"), datalist=str(datalist), output_dir=str(out), max_epochs=1,
               monitor_interval=1, **TINY)
    assert "embedding monitor skipped: the training split" in capsys.readouterr().out
    assert (out / "backbone.pt").is_file()
    client, runs = _runs(out)
    run = runs["simclr:run"]
    assert run.data.tags["embedding_monitor"].startswith("skipped: the training split")
    assert "knn_auc" not in run.data.metrics


def test_barlow_and_auxiliary_log_the_monitor(tiny2d, tmp_path):
    run_bundle(cfg("train.yaml", "pretrain_simclr.yaml", "pretrain_barlow.yaml"), datalist=str(tiny2d),
               output_dir=str(tmp_path / "barlow"), proj_hidden_dim=32, proj_dim=32, max_epochs=1, monitor_interval=1,
               **QUIET, **TINY)
    client, runs = _runs(tmp_path / "barlow")
    assert _steps(client, runs["barlow:barlow"].info.run_id, "knn_auc") == [0, 1]

    datalist = make_2d(tmp_path / "aux", counts=(12, 4, 4))
    content = json.loads(datalist.read_text())
    for i, e in enumerate(content["training"]):
        e["sex"] = i % 2
    datalist.write_text(json.dumps(content))
    out = tmp_path / "aux_run"
    run_bundle(cfg("train.yaml", "pretrain_aux.yaml"), datalist=str(datalist), output_dir=str(out), max_epochs=1,
               aux_heads={"sex": {"kind": "bce"}}, monitor_interval=1, **QUIET, **TINY)
    client, runs = _runs(out)
    assert _steps(client, runs["aux:aux_run"].info.run_id, "probe_auc") == [0, 1]


def test_ffcl_local_stage_logs_per_block_and_global_stage_final(tiny2d, tmp_path):
    from ffcl_monai.networks.backbones import build_backbone

    n_blocks = len(build_backbone("resnet10").blocks)
    common = dict(datalist=str(tiny2d), local_epochs=1, global_epochs=1, monitor_interval=1, **QUIET, **TINY)
    run_bundle(cfg("train.yaml", "ffcl.yaml", "ffcl_local.yaml"), output_dir=str(tmp_path / "local"),
               **common)
    client, runs = _runs(tmp_path / "local")
    run = runs["local:local"].info.run_id
    for i in range(1, n_blocks + 1):
        for key in ("knn_acc", "knn_auc", "probe_auc"):
            assert _steps(client, run, f"block{i}_{key}") == [0, 1], f"block{i}_{key}"
    last = client.get_metric_history(run, f"block{n_blocks}_knn_auc")
    assert [m.value for m in client.get_metric_history(run, "knn_auc")] == [m.value for m in last]
    history = [json.loads(x) for x in (tmp_path / "local" / "history.jsonl").read_text().splitlines()]
    assert "block1_knn_auc" in history[-1]
    # the monitor restores the random states it touches: the stage trains exactly as without it
    run_bundle(cfg("train.yaml", "ffcl.yaml", "ffcl_local.yaml"), output_dir=str(tmp_path / "local_plain"),
               **{**common, "monitor_interval": 0})
    a = torch.load(tmp_path / "local_plain" / "backbone.pt", weights_only=True)["backbone"]
    b = torch.load(tmp_path / "local" / "backbone.pt", weights_only=True)["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the monitor changed the local stage"

    run_bundle(cfg("train.yaml", "ffcl.yaml", "ffcl_global.yaml"), output_dir=str(tmp_path / "global"),
               **common)
    client, runs = _runs(tmp_path / "global")
    run = runs["global:global"]
    assert _steps(client, run.info.run_id, "knn_auc") == [0, 1] and "block1_knn_auc" not in run.data.metrics


def test_forward_forward_logs_per_layer(tiny2d, tmp_path):
    out = tmp_path / "ff"
    run_bundle(cfg("train.yaml", "ff.yaml"), datalist=str(tiny2d), output_dir=str(out), image_size=[16, 16],
               hidden=[32, 32], threshold=32.0, epochs=2, batch_size=8, n_bootstrap=10, monitor_interval=1, **QUIET)
    client, runs = _runs(out)
    run = runs["ff:ff"].info.run_id
    for key in ("knn_auc", "probe_auc", "layer0_knn_auc", "layer1_knn_auc"):
        assert _steps(client, run, key) == [0, 1, 2], key


# ------------------------------------------------------------------------------------------------------------------
# torchrun: rank 0 monitors, the others do not, and the weights are those of the run without the monitor
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_simclr_monitor_rank0_only_same_weights(tmp_path):
    from test_multi_gpu import TINY as MG_TINY
    from test_multi_gpu import _runs as all_runs
    from test_multi_gpu import _torchrun

    data = make_2d(tmp_path / "data", counts=(16, 6, 6))
    configs = ["train.yaml", "pretrain_simclr.yaml", "multi_gpu_train.yaml"]
    outs = {}
    for name, interval in (("plain", "0"), ("mon", "1")):
        outs[name] = tmp_path / name
        (tmp_path / f"t_{name}").mkdir()
        proc = _torchrun(tmp_path / f"t_{name}", configs,
                         ["--datalist", str(data), "--output_dir", str(outs[name]), "--max_epochs", "2",
                          "--monitor_interval", interval, "--monitor_plot", "pca", *MG_TINY])
    a = torch.load(outs["plain"] / "backbone.pt", weights_only=True)["backbone"]
    b = torch.load(outs["mon"] / "backbone.pt", weights_only=True)["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the monitor changed the distributed training"
    runs = all_runs(outs["mon"])
    assert len(runs) == 1
    client = mlflow.MlflowClient(f"sqlite:///{outs['mon'] / 'mlruns.db'}")
    assert _steps(client, runs[0].info.run_id, "knn_auc") == [0, 1, 2]  # once per epoch, not once per rank
    rows = [json.loads(x) for x in (outs["mon"] / "embedding_monitor.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert proc.stdout.count("embedding monitor, epoch 2") == 1  # only rank 0 computed it
