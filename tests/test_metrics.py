"""Reported metrics against scikit-learn's formulas, and bootstrap intervals."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from ffcl_monai.handlers.metrics import bootstrap_ci, classification_metrics, confusion_matrix


@pytest.mark.parametrize("c", [2, 4])
def test_single_label_metrics_match_sklearn(c):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, c, 200)
    logits = rng.normal(size=(200, c)) + 1.5 * np.eye(c)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(probs, labels, "binary" if c == 2 else "multiclass")
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["f1"] == pytest.approx(f1_score(labels, pred, average="macro"), abs=1e-6)
    assert m["precision"] == pytest.approx(precision_score(labels, pred, average="macro"), abs=1e-6)
    assert m["recall"] == pytest.approx(recall_score(labels, pred, average="macro"), abs=1e-6)
    expected_auc = roc_auc_score(labels, probs[:, 1]) if c == 2 else roc_auc_score(labels, probs, multi_class="ovr")
    assert m["auc"] == pytest.approx(expected_auc, abs=1e-6)
    cm = confusion_matrix(probs, labels)
    assert cm.sum() == 200 and np.trace(cm) == (pred == labels).sum()


def test_multilabel_masks_ignored_entries():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (100, 3)).astype(float)
    probs = np.clip(labels * 0.6 + rng.uniform(0, 0.4, (100, 3)), 0, 1)
    masked = labels.copy()
    masked[:30, 2] = -1
    m = classification_metrics(probs, masked, "multilabel")
    expected = np.mean([roc_auc_score(labels[:, 0], probs[:, 0]), roc_auc_score(labels[:, 1], probs[:, 1]),
                        roc_auc_score(labels[30:, 2], probs[30:, 2])])
    assert m["auc"] == pytest.approx(expected, abs=1e-6)


def test_bootstrap_interval_brackets_value_and_narrows_with_n():
    rng = np.random.default_rng(2)

    def sample(n):
        labels = rng.integers(0, 2, n)
        logits = rng.normal(size=(n, 2)) + np.eye(2)[labels]
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels

    small = bootstrap_ci(*sample(60), "binary", n_bootstrap=200)
    large = bootstrap_ci(*sample(600), "binary", n_bootstrap=200)
    for m in (small, large):
        for v in m.values():
            if not np.isnan(v["value"]):
                assert v["ci_low"] <= v["value"] <= v["ci_high"]
    width = lambda m: m["auc"]["ci_high"] - m["auc"]["ci_low"]  # noqa: E731
    assert width(large) < width(small)


def test_auc_keeps_its_resolution_when_softmax_saturates():
    import torch

    from ffcl_monai.handlers.metrics import ClassificationMetrics

    # confident logits: float32 softmax rounds every positive-class probability to exactly 1.0
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    margin = torch.tensor([30.0, 40.0, 50.0, 60.0, 35.0, 55.0])
    logits = torch.stack([torch.zeros(6), margin], dim=1)
    assert (torch.softmax(logits, 1)[:, 1] == 1.0).all()
    metric = ClassificationMetrics(task="binary", class_names=["a", "b"])
    metric.update((logits, labels))
    assert metric.compute() == pytest.approx(roc_auc_score(labels.numpy(), margin.numpy()))


def test_metrics_at_given_predictions_match_sklearn():
    """`pred` (e.g. decisions at a validation-chosen threshold) replaces argmax for accuracy/F1/precision/recall;
    the AUC stays threshold-free."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 120)
    logits = rng.normal(size=(120, 2)) + 1.2 * np.eye(2)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = (probs[:, 1] >= 0.3).astype(int)   # a lower threshold than argmax's 0.5
    assert (pred != probs.argmax(1)).any()
    m = classification_metrics(probs, labels, "binary", pred=pred)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["f1"] == pytest.approx(f1_score(labels, pred, average="macro"), abs=1e-6)
    assert m["precision"] == pytest.approx(precision_score(labels, pred, average="macro"), abs=1e-6)
    assert m["recall"] == pytest.approx(recall_score(labels, pred, average="macro"), abs=1e-6)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]), abs=1e-6)
    ci = bootstrap_ci(probs, labels, "binary", n_bootstrap=50, pred=pred)
    assert ci["accuracy"]["value"] == pytest.approx(accuracy_score(labels, pred))
    assert ci["accuracy"]["ci_low"] <= ci["accuracy"]["value"] <= ci["accuracy"]["ci_high"]
    with pytest.raises(ValueError, match="pred"):
        classification_metrics(probs, labels, "binary", pred=pred[:10])
    # without the AUCs: the same numbers, no auc keys
    no_auc = classification_metrics(probs, labels, "binary", pred=pred, with_auc=False)
    assert no_auc == {k: v for k, v in m.items() if not k.startswith("auc")}
