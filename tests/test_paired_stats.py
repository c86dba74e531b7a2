"""Paired statistics (ffcl_monai/evaluation/paired.py) against independently computed values: DeLong's placement-value
formulas written out here in O(n^2) from the 1988 paper, a worked example done by hand, scikit-learn's AUC, the
project's own bootstrap_ci, and the pooling formula with hand-chosen numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ffcl_monai.evaluation.paired import (
    check_same_images,
    compare_seeds,
    delong_per_class,
    delong_test,
    joint_bootstrap,
    paired_bootstrap,
    pool_seeds,
    read_predictions,
)
from ffcl_monai.handlers.metrics import bootstrap_ci, classification_metrics


def _delong_direct(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float, float]:
    """DeLong, DeLong & Clarke-Pearson (1988), Section 2, literally: the kernel psi over every (positive, negative)
    pair, the structural components V10 (per positive) and V01 (per negative), their covariance matrices S10 (divisor
    m - 1) and S01 (divisor n - 1), and Var(theta_a - theta_b) = L S L' with L = (1, -1), S = S10/m + S01/n."""

    def psi(x, v):
        return 1.0 if x > v else (0.5 if x == v else 0.0)

    models = [a, b]
    xs = [s[y == 1] for s in models]
    ys = [s[y == 0] for s in models]
    m, n = len(xs[0]), len(ys[0])
    theta, v10, v01 = [], [], []
    for r in range(2):
        v10.append([sum(psi(xs[r][i], ys[r][j]) for j in range(n)) / n for i in range(m)])
        v01.append([sum(psi(xs[r][i], ys[r][j]) for i in range(m)) / m for j in range(n)])
        theta.append(sum(v10[r]) / m)
    s10 = [[sum((v10[r][i] - theta[r]) * (v10[s][i] - theta[s]) for i in range(m)) / (m - 1) for s in range(2)]
           for r in range(2)]
    s01 = [[sum((v01[r][j] - theta[r]) * (v01[s][j] - theta[s]) for j in range(n)) / (n - 1) for s in range(2)]
           for r in range(2)]
    var = (s10[0][0] + s10[1][1] - 2 * s10[0][1]) / m + (s01[0][0] + s01[1][1] - 2 * s01[0][1]) / n
    se = math.sqrt(var)
    z = (theta[0] - theta[1]) / se
    p = 2 * (1 - 0.5 * (1 + math.erf(abs(z) / math.sqrt(2))))
    return theta[0], theta[1], se, z, p


@pytest.mark.parametrize("seed,n,decimals", [(0, 60, 1), (1, 97, 2), (2, 40, 6)])
def test_delong_matches_the_direct_placement_formulas(seed, n, decimals):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    common = rng.normal(size=n)  # shared difficulty: the two models are correlated, as on one test split
    a = np.round(1 / (1 + np.exp(-(1.2 * y + common + rng.normal(size=n)))), decimals)  # rounding makes ties
    b = np.round(1 / (1 + np.exp(-(0.6 * y + common + rng.normal(size=n)))), decimals)
    res = delong_test(a, b, y)
    auc_a, auc_b, se, z, p = _delong_direct(a, b, y)
    assert res.auc_a == pytest.approx(auc_a, abs=1e-12) and res.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert res.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert res.delta == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert res.se == pytest.approx(se, rel=1e-9) and res.z == pytest.approx(z, rel=1e-9)
    assert res.p == pytest.approx(p, rel=1e-7, abs=1e-12)
    assert res.ci_low == pytest.approx(res.delta - 1.959963984540054 * se, rel=1e-9)
    assert (res.n_pos, res.n_neg) == (int(y.sum()), int(n - y.sum()))


def test_delong_worked_example_by_hand():
    # positives (label 1) are cases 0, 1; negatives cases 2, 3.
    # model A: positives 0.9, 0.4; negatives 0.4, 0.1 (a tie between a positive and a negative at 0.4)
    #   psi: (0.9,0.4)=1 (0.9,0.1)=1 (0.4,0.4)=1/2 (0.4,0.1)=1 -> AUC_A = 3.5/4 = 0.875
    #   V10_A = [1, 0.75]   (per positive, mean over the negatives)
    #   V01_A = [0.75, 1]   (per negative, mean over the positives)
    # model B: positives 0.8, 0.3; negatives 0.5, 0.2
    #   psi: (0.8,0.5)=1 (0.8,0.2)=1 (0.3,0.5)=0 (0.3,0.2)=1 -> AUC_B = 3/4 = 0.75
    #   V10_B = [1, 0.5], V01_B = [0.5, 1]
    # delta = 0.875 - 0.75 = 0.125
    # S10 (m = 2, divisor 1): deviations A [+.125, -.125], B [+.25, -.25]
    #   S10_AA = 2 * .125^2 = .03125, S10_BB = 2 * .25^2 = .125, S10_AB = 2 * .125 * .25 = .0625
    # S01 (n = 2): deviations A [-.125, +.125], B [-.25, +.25] -> the same three numbers
    # Var(delta) = (.03125 + .125 - 2 * .0625) / 2 + (.03125 + .125 - 2 * .0625) / 2 = .015625 + .015625 = .03125
    # SE = sqrt(.03125) = 0.1767767; z = .125 / .1767767 = 1 / sqrt(2); p = 2 (1 - Phi(1/sqrt 2)) = erfc(1/2)
    # 95% CI = .125 -+ 1.9599640 * .1767767 = .125 -+ .3464760 = [-0.2214760, 0.4714760]
    y = np.array([1, 1, 0, 0])
    res = delong_test([0.9, 0.4, 0.4, 0.1], [0.8, 0.3, 0.5, 0.2], y)
    assert res.auc_a == 0.875 and res.auc_b == 0.75 and res.delta == 0.125
    assert res.se == pytest.approx(0.17677669529663687, rel=1e-12)
    assert res.z == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    assert res.p == pytest.approx(0.4795001221869535, rel=1e-12)
    assert (res.ci_low, res.ci_high) == pytest.approx((-0.2214759561, 0.4714759561), abs=1e-9)


def test_delong_identical_models_and_too_few_cases():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 30)
    s = rng.random(30)
    res = delong_test(s, s, y)
    assert res.delta == 0 and res.se == 0 and res.z == 0 and res.p == 1.0 and res.ci_low == res.ci_high == 0
    one_pos = delong_test([0.9, 0.2, 0.1], [0.8, 0.3, 0.2], [1, 0, 0])
    assert one_pos.auc_a == 1.0 and math.isnan(one_pos.p)  # variance needs two cases of each class
    with pytest.raises(ValueError, match="both classes"):
        delong_test([0.1, 0.2], [0.3, 0.4], [0, 0])


def test_delong_per_class_is_one_vs_rest():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    pa = rng.dirichlet(np.ones(3), 90) + 0.5 * np.eye(3)[y]
    pb = rng.dirichlet(np.ones(3), 90) + 0.2 * np.eye(3)[y]
    out = delong_per_class(pa, pb, y, "multiclass", ["x", "y", "z"])
    assert set(out) == {"x", "y", "z"}
    for j, name in enumerate("xyz"):
        assert out[name].auc_a == pytest.approx(roc_auc_score(y == j, pa[:, j]), abs=1e-12)
        assert out[name].auc_b == pytest.approx(roc_auc_score(y == j, pb[:, j]), abs=1e-12)


def _binary(n, rng, strength):
    y = rng.integers(0, 2, n)
    logit = strength * (2 * y - 1) + rng.normal(size=n)
    p1 = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p1, p1], 1), y


def test_paired_bootstrap_identical_models_give_zero_width():
    rng = np.random.default_rng(5)
    probs, y = _binary(50, rng, 1.0)
    out = paired_bootstrap(probs, probs.copy(), y, "binary", n_bootstrap=200, seed=1)
    assert set(out) == {"accuracy", "f1", "precision", "recall", "auc"}
    for m, d in out.items():
        # independent resampling of the two models would give a non-zero spread here
        assert d["value"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0, m


def test_paired_bootstrap_better_on_every_image_is_above_zero():
    rng = np.random.default_rng(6)
    n = 60
    y = np.arange(n) % 2
    # A: correct on every image, positives scored above every negative; B: right on about a third of them
    p_a = np.where(y == 1, 0.7 + 0.2 * rng.random(n), 0.1 + 0.2 * rng.random(n))
    p_b = np.where(rng.random(n) < 0.35, p_a, 1 - p_a)
    a, b = np.stack([1 - p_a, p_a], 1), np.stack([1 - p_b, p_b], 1)
    out = paired_bootstrap(a, b, y, "binary", n_bootstrap=300, seed=0)
    acc_a, acc_b = 1.0, float(((p_b >= 0.5) == y).mean())
    assert out["accuracy"]["value"] == pytest.approx(acc_a - acc_b)
    assert out["accuracy"]["ci_low"] > 0 and out["auc"]["ci_low"] > 0
    assert out["auc"]["value"] == pytest.approx(1.0 - roc_auc_score(y, p_b))


def test_joint_bootstrap_scores_every_model_on_the_same_resample():
    rng = np.random.default_rng(7)
    a, y = _binary(40, rng, 1.0)
    b, _ = _binary(40, rng, 0.3)  # unrelated scores, same labels
    jb = joint_bootstrap({"a": a, "b": b}, y, "binary", n_bootstrap=50, seed=3, keep_indices=True)
    assert jb.indices.shape == (50, 40)
    expected = np.random.default_rng(3)  # bootstrap_ci's draw: one rng.integers(0, n, n) per resample
    for i in range(50):
        idx = expected.integers(0, 40, size=40)
        assert np.array_equal(jb.indices[i], idx)
        for name, probs in (("a", a), ("b", b)):
            m = classification_metrics(probs[idx], y[idx], "binary")
            assert jb.draws[name]["auc"][i] == pytest.approx(m["auc"], abs=1e-12)
            assert jb.draws[name]["accuracy"][i] == m["accuracy"]
    # each model's own percentile interval from the joint draws is the project's bootstrap_ci for that seed
    for name, probs in (("a", a), ("b", b)):
        ref = bootstrap_ci(probs, y, "binary", n_bootstrap=50, seed=3)
        draws = jb.draws[name]["auc"]
        lo, hi = np.quantile(draws[~np.isnan(draws)], [0.025, 0.975])
        assert (lo, hi) == pytest.approx((ref["auc"]["ci_low"], ref["auc"]["ci_high"]), abs=1e-12)
    d = jb.delta("a", "b", "accuracy")
    diff = jb.draws["a"]["accuracy"] - jb.draws["b"]["accuracy"]
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])), abs=1e-12)


def test_pool_seeds_against_the_formula_by_hand():
    # deltas per seed 0.02, 0.04, 0.06: mean 0.04; sample variance ((-.02)^2 + 0 + .02^2) / 2 = .0004;
    # V_seed = .0004 / 3 = 1.3333e-4.
    # joint resamples (rows = seeds, columns = 4 resamples); seed-means per resample .03, .05, .04, .04:
    # mean .04, deviations -.01 .01 0 0 -> V_img = .0002 / 3 = 6.6667e-5.
    # total = 2e-4, SE = .0141421356; normal CI = .04 -+ 1.959964 * .0141421356 = [.0122819, .0677181]
    # df = total^2 / (V_seed^2 / (S - 1)) = 4e-8 / (1.7778e-8 / 2) = 4.5
    deltas = [0.02, 0.04, 0.06]
    boot = np.array([[0.02, 0.03, 0.01, 0.05],
                     [0.03, 0.06, 0.05, 0.04],
                     [0.04, 0.06, 0.06, 0.03]])
    assert boot.mean(0) == pytest.approx([0.03, 0.05, 0.04, 0.04])
    normal = pool_seeds(deltas, boot, quantile="normal")
    assert normal.mean == pytest.approx(0.04)
    assert normal.var_seeds == pytest.approx(0.0004 / 3) and normal.var_images == pytest.approx(0.0002 / 3)
    assert normal.se == pytest.approx(math.sqrt(2e-4))
    assert (normal.ci_low, normal.ci_high) == pytest.approx((0.0122819, 0.0677181), abs=1e-6)
    t = pool_seeds(deltas, boot)
    assert t.df == pytest.approx(4.5)
    from scipy.stats import t as student

    q = student.ppf(0.975, 4.5)  # about 2.67
    assert (t.ci_low, t.ci_high) == pytest.approx((0.04 - q * math.sqrt(2e-4), 0.04 + q * math.sqrt(2e-4)))
    assert t.seeds_estimated and t.n_seeds == 3


def test_pool_one_seed_is_image_sampling_only():
    boot = np.array([[0.1, 0.3, np.nan, 0.2]])  # a NaN resample (one class only) is left out
    one = pool_seeds([0.2], boot)
    assert one.mean == 0.2 and not one.seeds_estimated and math.isinf(one.df)
    assert one.var_images == pytest.approx(0.01)  # var(.1, .3, .2), divisor 2
    assert (one.ci_low, one.ci_high) == pytest.approx((0.2 - 1.959964 * 0.1, 0.2 + 1.959964 * 0.1), abs=1e-6)


def test_compare_seeds_pairs_seed_k_with_seed_k():
    rng = np.random.default_rng(8)
    _, y = _binary(50, rng, 1.0)
    mk = lambda s: np.stack([1 - s, s], 1)  # noqa: E731
    a = {k: mk(1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(size=50))))) for k in (0, 1, 2)}
    b = {k: mk(1 / (1 + np.exp(-(0.5 * (2 * y - 1) + rng.normal(size=50))))) for k in (0, 1, 3)}
    out = compare_seeds(a, b, y, "binary", n_bootstrap=100)
    assert out["seeds"] == [0, 1]
    for k in (0, 1):
        want = classification_metrics(a[k], y, "binary")["auc"] - classification_metrics(b[k], y, "binary")["auc"]
        assert out["per_seed"][k]["auc"]["value"] == pytest.approx(want)
        assert out["per_seed"][k]["delong"].delta == pytest.approx(want)
    pooled = out["pooled"]["auc"]
    assert pooled.mean == pytest.approx(np.mean([out["per_seed"][k]["auc"]["value"] for k in (0, 1)]))
    assert pooled.n_seeds == 2 and pooled.ci_low < pooled.mean < pooled.ci_high


def test_read_predictions_from_the_report_writer(tmp_path):
    from ffcl_monai.handlers.reports import TestReport

    rng = np.random.default_rng(9)
    probs, y = _binary(12, rng, 1.0)
    data = [{"image": str(tmp_path / "imgs" / f"{i}.png")} for i in range(12)]
    rep = TestReport(data, tmp_path / "a", "binary", ["N", "P"], datalist_dir=str(tmp_path))
    rep.metrics = bootstrap_ci(probs, y, "binary", ["N", "P"], n_bootstrap=5)
    rep.write_files(probs, y)
    p = read_predictions(tmp_path / "a" / "predictions.csv", "binary")
    assert p.images == [f"imgs/{i}.png" for i in range(12)] and p.class_names == ["N", "P"]
    assert np.array_equal(p.labels, y) and np.allclose(p.probs, probs, atol=5e-7)
    shuffled = type(p)(p.path.with_name("other.csv"), p.images[::-1], p.labels[::-1], p.probs, p.class_names,
                       p.scores)
    with pytest.raises(ValueError, match="same images"):
        check_same_images([p, shuffled])
    check_same_images([p, p])


def test_saturated_models_are_compared_on_full_precision_scores(tmp_path):
    """Confident models' probabilities round to 1.000000 / 0.000000 in predictions.csv and tie there; the paired
    comparison must rank images by the full-precision log-odds the report also writes (score_<class>), so that its
    AUC is the report's own (metrics.json), not a lower one made by rounding."""
    import torch

    from ffcl_monai.evaluation.paired import binary_delong
    from ffcl_monai.handlers.metrics import log_odds, probabilities
    from ffcl_monai.handlers.reports import TestReport

    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 20)
    data = [{"image": str(tmp_path / f"{i}.png")} for i in range(len(y))]
    read = {}
    for name, shift in (("a", 4.0), ("b", 2.0)):
        # a model sure that every image is positive (p rounds to 1.000000), positives a little surer than negatives
        z = 25.0 + shift * y + rng.normal(scale=2.0, size=len(y))
        logits = torch.tensor(np.stack([-z / 2, z / 2], 1))
        probs, scores = probabilities(logits, "binary").numpy(), log_odds(logits, "binary").numpy()
        rep = TestReport(data, tmp_path / name, "binary", ["N", "P"], datalist_dir=str(tmp_path))
        rep.metrics = bootstrap_ci(probs, y, "binary", ["N", "P"], n_bootstrap=5, scores=scores)
        rep.write_files(probs, y, scores=scores)
        p = read_predictions(tmp_path / name / "predictions.csv", "binary")
        np.testing.assert_array_equal(p.scores, scores)  # written at full precision
        rounded_auc = classification_metrics(p.probs, y, "binary", ["N", "P"])["auc"]
        assert rounded_auc < rep.metrics["auc"]["value"] - 0.01  # the 6-decimal probabilities lose the ranking
        read[name] = (p, rep.metrics["auc"]["value"])
    jb = joint_bootstrap({k: p.probs for k, (p, _) in read.items()}, y, "binary", ["N", "P"], n_bootstrap=50,
                         scores_by_model={k: p.scores for k, (p, _) in read.items()})
    for k, (_, auc) in read.items():
        assert jb.point[k]["auc"] == pytest.approx(auc, abs=1e-12)
    d = binary_delong(read["a"][0].scores, read["b"][0].scores, y, "binary")
    assert d.auc_a == pytest.approx(read["a"][1], abs=1e-12) and d.auc_b == pytest.approx(read["b"][1], abs=1e-12)


def test_predictions_without_score_columns_fall_back_to_probabilities(tmp_path):
    """Files written before the score columns existed still read, ranking by the probabilities."""
    rng = np.random.default_rng(4)
    probs, y = _binary(10, rng, 1.0)
    from ffcl_monai.handlers.reports import TestReport

    rep = TestReport([{"image": f"{i}.png"} for i in range(10)], tmp_path, "binary", ["N", "P"])
    rep.metrics = bootstrap_ci(probs, y, "binary", ["N", "P"], n_bootstrap=5)
    rep.write_files(probs, y)
    p = read_predictions(tmp_path / "predictions.csv", "binary")
    assert np.array_equal(p.scores, p.probs)
