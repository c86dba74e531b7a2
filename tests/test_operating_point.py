"""Operating point (threshold from validation, sensitivity/specificity with Wilson CIs) and calibration (ECE,
reliability diagram, temperature scaling): ffcl_monai/evaluation/operating_point.py, its report wiring
(ffcl_monai/handlers/reports.py) and evaluate.yaml end to end.

Every expected number below is computed by hand (arithmetic in the comments), from a published table, or by an
independent implementation (scikit-learn's roc_curve) in the test itself.
"""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from ffcl_monai.evaluation import operating_point as op

# ------------------------------------------------------------------ threshold selection

# Eight validation images, scores (probability of the positive class) and labels; P = 4 positives, N = 4 negatives.
# Rule: positive iff score >= t; candidates t = the distinct scores.
#   t     predicted positive      TP FP  sens  spec   J = sens + spec - 1
#   0.1   all                     4  4   1.00  0.00  0.00
#   0.2   0.2..0.8                4  3   1.00  0.25  0.25
#   0.3   0.3..0.8                4  2   1.00  0.50  0.50
#   0.4   0.4..0.8                3  2   0.75  0.50  0.25
#   0.5   0.5..0.8                3  1   0.75  0.75  0.50
#   0.6   0.6..0.8                3  0   0.75  1.00  0.75   <- unique maximum
#   0.7   0.7, 0.8                2  0   0.50  1.00  0.50
#   0.8   0.8                     1  0   0.25  1.00  0.25
SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
LABELS = np.array([0, 0, 1, 0, 0, 1, 1, 1])


def test_youden_threshold_hand_example():
    c = op.youden_threshold(SCORES, LABELS)
    assert c.threshold == 0.6
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 0, 4, 1)
    assert c.sensitivity == 0.75 and c.specificity == 1.0 and c.youden_j == pytest.approx(0.75)
    # independent check: scikit-learn's ROC (same >= convention), argmax of tpr - fpr
    fpr, tpr, thr = roc_curve(LABELS, SCORES, drop_intermediate=False)
    assert c.threshold == thr[np.argmax(tpr - fpr)]


def test_youden_ties_go_to_the_smallest_threshold():
    # labels 0 0 1 0 1 0 1 1 (P = N = 4):
    #   t=0.3: TP 4 FP 2 -> J = 1 - 0.5 = 0.5;  t=0.5: TP 3 FP 1 -> 0.75 - 0.25 = 0.5;  t=0.7: TP 2 FP 0 -> 0.5
    #   every other t has J <= 0.25. Three-way tie -> the smallest threshold, 0.3 (highest sensitivity, 1.0).
    labels = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    c = op.youden_threshold(SCORES, labels)
    assert c.threshold == 0.3 and c.sensitivity == 1.0 and c.specificity == 0.5
    # floating-point J (1 - 0.5 vs 0.75 - 0.25 vs 0.5 - 0) must not break the tie by rounding: counts are integers
    assert c.youden_j == pytest.approx(0.5)


@pytest.mark.parametrize("target, expected, sens, spec", [
    (1.0, 0.3, 1.0, 0.5),    # all 4 positives needed: t <= 0.3; the largest such t is 0.3 (TP 4, FP 2)
    (0.9, 0.3, 1.0, 0.5),    # 0.9 * 4 = 3.6 -> 4 positives needed, as above
    (0.75, 0.6, 0.75, 1.0),  # 3 positives: t <= 0.6 (0.6, 0.7, 0.8); t = 0.6 also has the best specificity
    (0.5, 0.7, 0.5, 1.0),    # 2 positives: t <= 0.7
    (0.2, 0.8, 0.25, 1.0),   # 1 positive: t = 0.8, the largest score
])
def test_target_sensitivity_threshold_is_the_largest_meeting_the_target(target, expected, sens, spec):
    c = op.sensitivity_threshold(SCORES, LABELS, target)
    assert c.threshold == expected and c.sensitivity == sens and c.specificity == spec
    # the next larger candidate misses the target (otherwise it would have been chosen)
    larger = SCORES[SCORES > expected]
    if len(larger):
        tp = int(((SCORES >= larger.min()) & (LABELS == 1)).sum())
        assert tp / 4 < target


def test_tied_scores_are_one_candidate():
    # scores 0.2, 0.5, 0.5, 0.9 with labels 0 1 0 1: t = 0.5 makes both 0.5 images positive (TP 2, FP 1)
    c = op.sensitivity_threshold([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1], 1.0)
    assert c.threshold == 0.5 and (c.tp, c.fp, c.tn, c.fn) == (2, 1, 1, 0)


def test_threshold_inputs_are_checked():
    with pytest.raises(ValueError, match="both classes"):
        op.youden_threshold([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="finite"):
        op.youden_threshold([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="target"):
        op.sensitivity_threshold(SCORES, LABELS, 0.0)


@pytest.mark.parametrize("value, kind, target", [
    ("youden", "youden", None), ("Youden", "youden", None), (0.5, "fixed", 0.5), ("0.5", "fixed", 0.5),
    (0.3, "fixed", 0.3), ("sensitivity:0.9", "sensitivity", 0.9), ("sensitivity: 0.95", "sensitivity", 0.95),
])
def test_parse_threshold_rule(value, kind, target):
    rule = op.parse_threshold_rule(value)
    assert rule.kind == kind and rule.value == target


@pytest.mark.parametrize("value", ["youdn", "sensitivity:", "sensitivity:1.5", "sensitivity:0", 0.0, 1.0, 2, True,
                                   None])
def test_bad_threshold_rule_names_the_key(value):
    with pytest.raises(ValueError, match="`threshold`"):
        op.parse_threshold_rule(value)


def test_validation_pass_is_needed_only_to_fit_something_on_another_split():
    assert op.needs_validation_pass("binary", "test", "youden", False)
    assert op.needs_validation_pass("binary", "test", "sensitivity:0.9", False)
    assert not op.needs_validation_pass("binary", "test", 0.5, False)
    assert op.needs_validation_pass("binary", "test", 0.5, True)         # the temperature comes from validation
    assert not op.needs_validation_pass("multiclass", "test", "youden", False)  # argmax: nothing to choose
    assert op.needs_validation_pass("multiclass", "test", "youden", True)
    assert not op.needs_validation_pass("binary", "validation", "youden", True)  # fitted on the split itself


# ------------------------------------------------------------------ confidence intervals, sensitivity, specificity

@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Stat Med 17:857-872, Table II, method 3 (score interval without continuity correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(k, n, low, high):
    lo, hi = op.wilson_interval(k, n)
    assert round(lo, 4) == low and round(hi, 4) == high


def test_wilson_interval_formula_and_edge_cases():
    k, n, z = 8, 10, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert op.wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    lo, hi = op.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.69 < lo < 0.73  # p = 1: not a degenerate [1, 1] as a bootstrap would give
    assert all(math.isnan(v) for v in op.wilson_interval(0, 0))


def test_one_vs_rest_sensitivity_specificity_from_a_confusion_matrix():
    # rows = truth, columns = predicted (argmax)
    #          pred a  b  c
    # true a       5  1  0     row 6
    # true b       2  3  1     row 6
    # true c       0  2  4     row 6      total 18
    # class a: TP 5, FN 1, FP 2 (column a minus 5), TN = 18 - 6 - 2 = 10  -> sens 5/6, spec 10/12
    # class b: TP 3, FN 3, FP 3,                    TN = 18 - 6 - 3 = 9   -> sens 3/6, spec 9/12
    # class c: TP 4, FN 2, FP 1,                    TN = 18 - 6 - 1 = 11  -> sens 4/6, spec 11/12
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 2, 4]])
    labels, pred = [], []
    for t in range(3):
        for p in range(3):
            labels += [t] * cm[t, p]
            pred += [p] * cm[t, p]
    out = op.one_vs_rest(np.array(pred), np.array(labels), ["a", "b", "c"])
    expected = {"a": (5, 6, 10, 12), "b": (3, 6, 9, 12), "c": (4, 6, 11, 12)}
    for name, (tp, pos, tn, neg) in expected.items():
        s, sp = out[name]["sensitivity"], out[name]["specificity"]
        assert (s["k"], s["n"], sp["k"], sp["n"]) == (tp, pos, tn, neg)
        assert s["value"] == pytest.approx(tp / pos) and sp["value"] == pytest.approx(tn / neg)
        assert (s["ci_low"], s["ci_high"]) == pytest.approx(op.wilson_interval(tp, pos))


# ------------------------------------------------------------------ expected calibration error

def test_ece_binary_positive_probability_by_hand():
    # 5 bins of width 0.2, right-closed: (0, .2] (.2, .4] (.4, .6] (.6, .8] (.8, 1]
    #   (0, .2]:  p 0.1         y 0     conf 0.1    freq 0     |gap| 0.1    weight 1/6
    #   (.2, .4]: p 0.3, 0.35   y 1, 0  conf 0.325  freq 0.5   |gap| 0.175  weight 2/6
    #   (.6, .8]: p 0.8         y 1     conf 0.8    freq 1     |gap| 0.2    weight 1/6   (0.8 is the upper edge)
    #   (.8, 1]:  p 0.9, 0.95   y 1, 0  conf 0.925  freq 0.5   |gap| 0.425  weight 2/6
    #   ECE = (0.1 + 2 * 0.175 + 0.2 + 2 * 0.425) / 6 = 1.5 / 6 = 0.25
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.9, 0.95])
    y = np.array([0, 1, 0, 1, 1, 0])
    ece, bins = op.expected_calibration_error(p, y, n_bins=5)
    assert ece == pytest.approx(0.25)
    assert [b["count"] for b in bins] == [1, 2, 0, 1, 2]
    assert bins[1]["confidence"] == pytest.approx(0.325) and bins[1]["accuracy"] == pytest.approx(0.5)
    assert bins[2]["confidence"] is None and bins[2]["accuracy"] is None  # empty bin: no number, not NaN
    assert bins[3]["lower"] == pytest.approx(0.6) and bins[3]["upper"] == pytest.approx(0.8)
    # the task-level function reads the positive-class column of a softmax pair
    probs = np.stack([1 - p, p], 1)
    assert op.calibration_error(probs, y, "binary", n_bins=5)[0] == pytest.approx(0.25)


def test_ece_top_label_multiclass_by_hand():
    #   probs            label  top  conf  correct
    #   .7 .2 .1          0      0   .7    1
    #   .6 .3 .1          1      0   .6    0
    #   .2 .5 .3          1      1   .5    1
    #   .1 .1 .8          2      2   .8    1
    # 5 bins: (.4, .6] holds .5, .6: conf .55, acc .5, gap .05; (.6, .8] holds .7, .8: conf .75, acc 1, gap .25
    # ECE = 2/4 * .05 + 2/4 * .25 = 0.15
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 1, 2])
    ece, bins = op.calibration_error(probs, labels, "multiclass", n_bins=5)
    assert ece == pytest.approx(0.15)
    assert [b["count"] for b in bins] == [0, 0, 2, 2, 0]


def test_ece_default_is_15_bins_and_zero_goes_to_the_first():
    ece, bins = op.expected_calibration_error(np.array([0.0, 1 / 15, 1.0]), np.array([0, 0, 1]))
    assert len(bins) == 15 and [b["count"] for b in bins][:2] == [2, 0] and bins[-1]["count"] == 1
    # bin 1 holds 0 and 1/15 (upper edge): conf 1/30, freq 0; bin 15 holds 1.0 with freq 1: ECE = 2/3 * 1/30
    assert ece == pytest.approx(2 / 3 / 30)


# ------------------------------------------------------------------ temperature scaling

def _calibrated_binary(n, rng):
    z = rng.normal(0, 2.0, n)                         # a calibrated model's log-odds ...
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(int)   # ... labels drawn from exactly those odds
    return z, y


def test_temperature_scaling_recovers_a_known_temperature_binary():
    rng = np.random.default_rng(0)
    z, y = _calibrated_binary(20000, rng)
    over = 3.0 * z                                    # an overconfident copy: its best temperature is 3
    fit = op.fit_temperature(torch.tensor(over), torch.tensor(y), "binary")  # one log-odds per image: sigmoid/BCE
    assert fit.temperature == pytest.approx(3.0, rel=0.05) and not fit.at_bound
    assert fit.nll_after < fit.nll_before
    # the same data as a 2-logit softmax head (logits [0, z]) gives the same temperature
    pair = torch.tensor(np.stack([np.zeros_like(over), over], 1))
    fit2 = op.fit_temperature(pair, torch.tensor(y), "binary")
    assert fit2.temperature == pytest.approx(fit.temperature, rel=1e-4)
    before = op.calibration_error(op.scaled_probabilities(pair, "binary", 1.0), y, "binary")[0]
    after = op.calibration_error(op.scaled_probabilities(pair, "binary", fit2.temperature), y, "binary")[0]
    assert after < before / 3 and after < 0.02


def test_temperature_scaling_recovers_a_known_temperature_multiclass():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.5, (20000, 4))
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    y = (rng.uniform(size=(20000, 1)) > p.cumsum(1)).sum(1)  # categorical draw from the model's own softmax
    logits = torch.tensor(3.0 * x)
    fit = op.fit_temperature(logits, torch.tensor(y), "multiclass")
    assert fit.temperature == pytest.approx(3.0, rel=0.05)
    before = op.calibration_error(op.scaled_probabilities(logits, "multiclass", 1.0), y, "multiclass")[0]
    after = op.calibration_error(op.scaled_probabilities(logits, "multiclass", fit.temperature), y, "multiclass")[0]
    assert after < before / 3


def test_temperature_scaling_is_finite_for_huge_logits():
    # margins of 1e4, one image in ten on the wrong side: float64 probabilities are exactly 0/1, yet the NLL comes from
    # log-sum-exp and stays finite (1000 = 0.1 * 1e4 at T = 1); the best T is beyond the search bound of 100
    y = np.array([0, 1] * 50)
    side = np.where(y == 1, 1.0, -1.0)
    side[::10] *= -1
    logits = torch.tensor(np.stack([np.zeros(100), 1e4 * side], 1))
    fit = op.fit_temperature(logits, torch.tensor(y), "binary")
    assert fit.nll_before == pytest.approx(1000.0) and math.isfinite(fit.nll_after) and fit.nll_after < 100
    assert fit.temperature == pytest.approx(100.0) and fit.at_bound


def test_temperature_scaling_on_separable_data_stops_at_the_bound():
    # every image on the right side: the NLL keeps falling as T -> 0, no finite optimum; the fit says so
    y = np.array([0, 1] * 50)
    logits = torch.tensor(np.where(y == 1, 5.0, -5.0))
    fit = op.fit_temperature(logits, torch.tensor(y), "binary")
    assert fit.at_bound and fit.temperature == pytest.approx(0.01) and fit.nll_after < fit.nll_before
    # constant logits: every T gives the same NLL; T stays 1
    flat = op.fit_temperature(torch.zeros(10, 2), torch.tensor([0, 1] * 5), "binary")
    assert flat.temperature == 1.0 and not flat.at_bound and flat.nll_after == pytest.approx(math.log(2))


def test_temperature_scaling_multilabel_ignores_uncertain_entries():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2.0, (8000, 3))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    y[:2000, 2] = -1
    fit = op.fit_temperature(torch.tensor(2.0 * z), torch.tensor(y), "multilabel")
    assert fit.temperature == pytest.approx(2.0, rel=0.06)


# ------------------------------------------------------------------ the report: validation choice applied to test

def _engine(logits, labels, batch=4):
    """A stand-in for a MONAI evaluator: decollated {"pred", "label"} dicts per iteration."""
    return [SimpleNamespace(state=SimpleNamespace(output=[{"pred": torch.as_tensor(logits[i]),
                                                           "label": torch.as_tensor(labels[i])}
                                                          for i in range(s, min(s + batch, len(labels)))]))
            for s in range(0, len(labels), batch)]


def _run(handler, logits, labels):
    engines = _engine(logits, labels)
    handler._reset(engines[0])
    for e in engines:
        handler._collect(e)
    handler._report(engines[-1]) if hasattr(handler, "_report") else handler._complete(engines[-1])


def _binary_logits(z):
    return np.stack([np.zeros_like(z), z], 1)


def test_report_chooses_the_threshold_on_validation_and_applies_it_to_test(tmp_path, capsys):
    from ffcl_monai.handlers.reports import PredictionCollector, TestReport

    rng = np.random.default_rng(3)
    yv = np.array([0, 1] * 20)
    zv = rng.normal(0, 1, 40) + 1.5 * yv + 1.0         # validation: positives sit higher, everyone shifted up
    yt = np.array([0, 1] * 30)
    zt = rng.normal(0, 1, 60) + 1.5 * yt + 1.0
    ref = PredictionCollector("validation")
    _run(ref, _binary_logits(zv), yv)
    data = [{"image": f"/d/img{i}.png"} for i in range(60)]
    report = TestReport(data, tmp_path, "binary", ["NORMAL", "PNEUMONIA"], n_bootstrap=30, threshold="youden",
                        temperature_scaling=True, ece_bins=10, reference=ref, split="test")
    _run(report, _binary_logits(zt), yt)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert {"task", "class_names", "n", "n_bootstrap", "ci", "metrics"} <= set(m) and m["n"] == 60
    opp = m["operating_point"]
    # independent: Youden on the VALIDATION log-odds with scikit-learn (smallest threshold among ties)
    fpr, tpr, thr = roc_curve(yv, zv, drop_intermediate=False)
    j = tpr - fpr
    expected = thr[np.isclose(j, j.max(), atol=1e-12)].min()
    assert opp["chosen_on"] == "validation" and opp["same_split"] is False and opp["n_chosen_on"] == 40
    assert opp["at_threshold"]["threshold_log_odds"] == pytest.approx(expected, abs=1e-12)
    assert opp["at_threshold"]["threshold"] == pytest.approx(1 / (1 + math.exp(-expected)), abs=1e-12)
    # ... and applied unchanged to test: sensitivity counted by hand
    pos = zt >= expected
    sens = opp["at_threshold"]["sensitivity"]
    assert (sens["k"], sens["n"]) == (int((pos & (yt == 1)).sum()), 30)
    spec = opp["at_threshold"]["specificity"]
    assert (spec["k"], spec["n"]) == (int((~pos & (yt == 0)).sum()), 30)
    acc = opp["at_threshold"]["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx(float((pos == (yt == 1)).mean()))
    assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    # at 0.5 = argmax: log-odds > 0
    s05 = opp["at_0.5"]["sensitivity"]
    assert s05["k"] == int(((zt > 0) & (yt == 1)).sum())
    # calibration: ECE on the test split, before and after a temperature fitted on validation
    cal = m["calibration"]
    assert cal["n_bins"] == 10 and len(cal["reliability"]) == 10
    pt = 1 / (1 + np.exp(-zt))
    assert cal["ece"] == pytest.approx(op.expected_calibration_error(pt, yt, 10)[0])
    ts = cal["temperature_scaling"]
    t_fit = op.fit_temperature(torch.tensor(_binary_logits(zv)), torch.tensor(yv), "binary").temperature
    assert ts["fitted_on"] == "validation" and ts["temperature"] == pytest.approx(t_fit, rel=1e-9)
    assert ts["ece"] == pytest.approx(op.expected_calibration_error(1 / (1 + np.exp(-zt / t_fit)), yt, 10)[0])
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [r["predicted_at_threshold"] == "PNEUMONIA" for r in rows] == list(pos)
    table = capsys.readouterr().out
    assert "at 0.5" in table and "sensitivity" in table and "specificity" in table and "ECE" in table
    assert f"{opp['at_threshold']['threshold']:.4f}" in table


def test_report_on_the_validation_split_says_the_threshold_is_optimistic(tmp_path):
    from ffcl_monai.handlers.reports import PredictionCollector, TestReport

    rng = np.random.default_rng(4)
    y = np.array([0, 1] * 10)
    z = rng.normal(0, 1, 20) + 2 * y
    report = TestReport([{"image": f"i{i}"} for i in range(20)], tmp_path, "binary", ["n", "p"], n_bootstrap=10,
                        threshold="sensitivity:0.9", reference=PredictionCollector(), split="validation")
    _run(report, _binary_logits(z), y)
    opp = json.loads((tmp_path / "metrics.json").read_text())["operating_point"]
    assert opp["same_split"] is True and "optimistic" in opp["note"]
    assert opp["at_threshold"]["threshold_log_odds"] == op.sensitivity_threshold(z, y, 0.9).threshold
    assert opp["at_threshold"]["sensitivity"]["value"] >= 0.9


def test_report_refuses_to_fit_on_the_test_split(tmp_path):
    from ffcl_monai.handlers.reports import TestReport

    report = TestReport([{"image": f"i{i}"} for i in range(8)], tmp_path, "binary", ["n", "p"], n_bootstrap=5,
                        threshold="youden", split="test")
    with pytest.raises(ValueError, match="validation"):
        _run(report, _binary_logits(np.linspace(-2, 2, 8)), np.array([0, 1] * 4))


def test_report_multiclass_per_class_and_no_threshold(tmp_path, capsys):
    from ffcl_monai.handlers.reports import TestReport

    rng = np.random.default_rng(5)
    y = np.arange(30) % 3
    logits = rng.normal(0, 1, (30, 3)) + 2 * np.eye(3)[y]
    report = TestReport([{"image": f"i{i}"} for i in range(30)], tmp_path, "multiclass", ["a", "b", "c"],
                        n_bootstrap=10, threshold="youden", split="test")   # no reference needed: argmax
    _run(report, logits, y)
    m = json.loads((tmp_path / "metrics.json").read_text())
    pred = logits.argmax(1)
    per = m["operating_point"]["per_class"]
    for j, name in enumerate("abc"):
        assert per[name]["sensitivity"]["k"] == int(((pred == j) & (y == j)).sum())
        assert per[name]["specificity"]["k"] == int(((pred != j) & (y != j)).sum())
    probs = torch.softmax(torch.tensor(logits), 1).numpy()
    assert m["calibration"]["ece"] == pytest.approx(op.calibration_error(probs, y, "multiclass")[0])
    assert m["calibration"]["kind"] == "top-label"
    out = capsys.readouterr().out
    assert "sensitivity" in out and "ECE" in out


def test_report_defaults_fit_nothing(tmp_path):
    """TestReport built without the new keys (ff.yaml's report): 0.5 point and ECE, no threshold, no reference."""
    from ffcl_monai.handlers.reports import TestReport

    y = np.array([0, 1] * 5)
    z = np.linspace(-2, 2, 10) + y
    report = TestReport([{"image": f"i{i}"} for i in range(10)], tmp_path, "binary", ["n", "p"], n_bootstrap=5)
    _run(report, _binary_logits(z), y)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert "at_threshold" not in m["operating_point"] and "rule" not in m["operating_point"]
    assert m["operating_point"]["at_0.5"]["sensitivity"]["k"] == int(((z > 0) & (y == 1)).sum())
    assert m["calibration"]["temperature_scaling"] == {"enabled": False}
    header = list(csv.reader((tmp_path / "predictions.csv").open()))[0]
    # no threshold column without a threshold; score_<class> carries full-precision log-odds for the paired tests
    assert header == ["image", "label", "predicted", "prob_n", "prob_p", "score_n", "score_p"]


def test_format_metrics_table_without_sections_is_unchanged():
    from ffcl_monai.handlers.reports import format_metrics_table

    table = format_metrics_table({"auc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}})
    assert table.splitlines()[2] == "auc           0.9000   [0.8000, 0.9500]"


# ------------------------------------------------------------------ evaluate.yaml end to end

def test_evaluate_yaml_threshold_from_validation_reliability_and_mlflow(tmp_path):
    """Train 1 epoch at 16 px, then evaluate.yaml on `validation` (its predictions.csv gives the validation
    probabilities) and on `test`: the test report's threshold is Youden's on those validation probabilities,
    reliability.png exists, and MLflow holds the ECE."""
    import mlflow

    from conftest import cfg, make_2d, run_bundle

    datalist = make_2d(tmp_path / "data", counts=(8, 8, 6), size=16)
    out = tmp_path / "run"
    o = dict(datalist=str(datalist), output_dir=str(out), image_size=[16, 16], backbone="resnet10", batch_size=8,
             max_epochs=1, log_model=False, progress=False, torch_threads=1)
    run_bundle(cfg("train.yaml"), **o)
    ev = dict(o, n_bootstrap=20, saliency=False, temperature_scaling=True)
    run_bundle(cfg("train.yaml", "evaluate.yaml"), **ev, eval_split="validation")
    val = json.loads((out / "metrics.json").read_text())
    assert val["operating_point"]["same_split"] is True
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    pv = np.array([float(r["prob_PNEUMONIA"]) for r in rows])
    yv = np.array([int(r["label"]) for r in rows])

    run_bundle(cfg("train.yaml", "evaluate.yaml"), **ev)   # eval_split: test (default)
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 6 and {"accuracy", "f1", "precision", "recall", "auc"} <= set(m["metrics"])
    opp = m["operating_point"]
    assert opp["rule"] == "youden" and opp["chosen_on"] == "validation" and opp["same_split"] is False
    assert opp["n_chosen_on"] == 8
    # Youden recomputed here from the validation probabilities (6 decimals in predictions.csv), smallest among ties
    fpr, tpr, thr = roc_curve(yv, pv, drop_intermediate=False)
    j = tpr - fpr
    expected = thr[np.isclose(j, j.max(), atol=1e-9)].min()
    assert opp["at_threshold"]["threshold"] == pytest.approx(expected, abs=2e-6)
    assert val["operating_point"]["at_threshold"]["threshold"] == pytest.approx(expected, abs=2e-6)
    assert (out / "reliability.png").stat().st_size > 1000
    # ECE of the test split, recomputed from predictions.csv with the 15-bin formula
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    pt = np.array([float(r["prob_PNEUMONIA"]) for r in rows])
    yt = np.array([int(r["label"]) for r in rows])
    edges = np.arange(16) / 15
    idx = np.clip(np.searchsorted(edges, pt, side="left") - 1, 0, 14)
    ece = sum(abs(yt[idx == b].mean() - pt[idx == b].mean()) * (idx == b).mean() for b in range(15) if (idx == b).any())
    assert m["calibration"]["ece"] == pytest.approx(ece, abs=1e-5)
    assert m["calibration"]["temperature_scaling"]["temperature"] > 0

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ffcl_monai")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "evaluate:run"]
    test_run = next(r for r in runs if r.data.params.get("split") == "test")
    assert test_run.data.metrics["test_ece"] == pytest.approx(m["calibration"]["ece"])
    assert "test_ece_calibrated" in test_run.data.metrics and "test_threshold" in test_run.data.metrics
    assert "test_sensitivity_at_threshold" in test_run.data.metrics
    arts = {a.path for a in client.list_artifacts(test_run.info.run_id)}
    assert {"reliability.png", "metrics.json", "roc.png"} <= arts
