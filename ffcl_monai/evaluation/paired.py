"""Paired statistics for models scored on the SAME images: DeLong's test, the paired bootstrap, pooling over seeds.

Two models evaluated on one test split make errors on the same hard images, so their metrics are correlated; their
separate confidence intervals overlap even when one model is better on nearly every resample. A paired comparison
looks at the difference on the same images instead.

**DeLong's test** (binary AUC; DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837-845, with the midrank
algorithm of Sun & Xu 2014, IEEE Signal Processing Letters 21:1389-1393). With ``m`` positives ``X_i`` and ``n``
negatives ``Y_j`` and ``psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise``, model ``r`` has

    AUC_r     = 1/(m n) sum_ij psi(X_i^r, Y_j^r)
    V10_r(i)  = 1/n sum_j psi(X_i^r, Y_j^r)          (structural component of positive i)
    V01_r(j)  = 1/m sum_i psi(X_i^r, Y_j^r)          (structural component of negative j)
    S10[r,s]  = cov_i(V10_r, V10_s) (divisor m - 1),  S01[r,s] = cov_j(V01_r, V01_s) (divisor n - 1)
    S         = S10 / m + S01 / n
    Var(AUC_a - AUC_b) = S[a,a] + S[b,b] - 2 S[a,b],  z = (AUC_a - AUC_b) / sqrt(Var),  p = 2 (1 - Phi(|z|)).

Sun & Xu compute the same components from midranks in O(N log N): with ``T_z`` the midranks of all ``m + n``
scores, ``T_x`` those of the positives among themselves and ``T_y`` of the negatives among themselves,
``V10(i) = (T_z(i) - T_x(i)) / n``, ``V01(j) = 1 - (T_z(m + j) - T_y(j)) / m``, ``AUC = mean_i V10(i)``.
The 95% CI of the difference is ``delta +- z_0.975 * SE`` (as pROC's ``roc.test``). When both models rank every
pair alike the variance is 0: ``p = 1`` for a zero difference (pROC's convention), ``0`` otherwise.

*Multi-class and multi-label.* DeLong's statistic is defined for one ROC curve per model. It applies to each class
one-vs-rest (:func:`delong_per_class`), but the macro average of the per-class AUCs is not a Mann-Whitney statistic
of one ranking, and the per-class tests are not independent; the macro AUC is therefore compared with the paired
bootstrap only (no DeLong p for it).

**Paired bootstrap** (:func:`joint_bootstrap`, :func:`paired_bootstrap`). Draw ``n`` image indices with replacement
ONCE per resample and score every model on that same resample; the difference of a metric on the resample is one
draw of the difference. The 95% CI is the 2.5/97.5% percentile of the draws (resamples on which a metric is
undefined, e.g. one class only for the AUC, are left out, as in :func:`ffcl_monai.handlers.metrics.bootstrap_ci`).
Metrics come from :func:`ffcl_monai.handlers.metrics.classification_metrics` (accuracy, macro F1/precision/recall,
AUC), and the indices are drawn exactly as ``bootstrap_ci`` draws them (``numpy.random.default_rng(seed)``, one
``rng.integers(0, n, n)`` per resample), so a model's own percentile interval from the joint draws equals its
``bootstrap_ci`` interval for the same seed.

**Pooling over seeds** (:func:`pool_seeds`). Each seed ``k = 1..S`` trains both models again (seed ``k`` of the
variant is paired with seed ``k`` of the reference) and scores them on the same images, giving differences ``D_k``.
The estimate is the mean ``D = 1/S sum_k D_k``. Its variance has two parts:

- image sampling: every seed is scored on the same images, so the images are resampled jointly (one resample for
  every seed and both models) and ``V_img = Var_b(1/S sum_k D_k^(b))`` over the resamples (divisor B - 1);
- training randomness: ``V_seed = s^2 / S`` with ``s^2`` the sample variance of ``D_1..D_S`` (divisor S - 1).
  On fixed images the ``D_k`` differ only through training, so ``s^2`` estimates the seed-to-seed variance.

``SE = sqrt(V_img + V_seed)`` and the CI is ``D +- q * SE``. ``q`` is the t quantile with the Welch-Satterthwaite
degrees of freedom ``df = (V_img + V_seed)^2 / (V_seed^2 / (S - 1))`` (the bootstrap part counted as known
exactly): with 3 seeds and a dominant seed term ``df`` is near 2 and ``q`` near 4.3, where ``1.96`` would be
far too narrow; with a dominant image term ``df`` grows and ``q`` tends to 1.96. ``quantile="normal"`` uses 1.96.
With one seed ``V_seed`` cannot be estimated: the interval is the image-sampling one alone (normal quantile) and
``seeds_estimated`` is False; say so next to the number. The seed-by-image interaction enters both parts, which
makes the interval slightly conservative.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from ffcl_monai.errors import UserInputError
from ffcl_monai.handlers.metrics import HEADLINE, classification_metrics

__all__ = [
    "DeLongResult", "PooledDelta", "Predictions", "JointBootstrap",
    "midranks", "delong_test", "delong_per_class", "read_predictions", "check_same_images", "bootstrap_indices",
    "joint_bootstrap", "paired_bootstrap", "pool_seeds", "compare_seeds", "binary_delong",
]


# ------------------------------------------------------------------------------------------------ DeLong
@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of ``auc_a - auc_b`` on the same cases (``delta`` = a - b)."""

    auc_a: float
    auc_b: float
    delta: float
    se: float
    z: float
    p: float
    ci_low: float
    ci_high: float
    n_pos: int
    n_neg: int


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based midranks: tied values share the mean of their ranks (the ranks of Sun & Xu 2014)."""
    return stats.rankdata(np.asarray(x, dtype=np.float64), method="average")


def _structural_components(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k, N) scores, (N,) 0/1 labels -> AUCs (k,), V10 (k, m) of the positives, V01 (k, n) of the negatives."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    v10 = np.empty((len(scores), m))
    v01 = np.empty((len(scores), n))
    for r in range(len(scores)):
        tz = midranks(np.concatenate([pos[r], neg[r]]))
        v10[r] = (tz[:m] - midranks(pos[r])) / n  # negatives ranked below positive i (ties count 1/2)
        v01[r] = 1.0 - (tz[m:] - midranks(neg[r])) / m  # positives ranked above negative j
    return v10.mean(axis=1), v10, v01


def delong_test(scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[int],
                alpha: float = 0.05) -> DeLongResult:
    """DeLong's test for two correlated ROC AUCs (module docstring).

    Args:
        scores_a, scores_b: (N,) ranking scores of the two models on the same N cases (higher = more positive).
        labels: (N,) 1 for positive, 0 for negative.
        alpha: 1 - confidence level of the CI of the difference.

    Returns:
        the AUCs, ``delta = auc_a - auc_b``, its SE, z, two-sided p and CI. With fewer than two cases of a class the
        variance is undefined: SE, z, p and the CI are NaN.
    """
    y = np.asarray(labels).astype(int).ravel()
    s = np.vstack([np.asarray(scores_a, dtype=np.float64).ravel(), np.asarray(scores_b, dtype=np.float64).ravel()])
    if s.shape[1] != len(y):
        raise ValueError(f"delong_test: {s.shape[1]} scores for {len(y)} labels")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("delong_test: labels must be 0/1 (binary); use delong_per_class for one-vs-rest")
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m == 0 or n == 0:
        raise ValueError(f"delong_test: the AUC needs both classes ({m} positive, {n} negative cases)")
    aucs, v10, v01 = _structural_components(s, y)
    delta = float(aucs[0] - aucs[1])
    nan = float("nan")
    if m < 2 or n < 2:
        return DeLongResult(float(aucs[0]), float(aucs[1]), delta, nan, nan, nan, nan, nan, m, n)
    cov = np.cov(v10) / m + np.cov(v01) / n  # np.cov: rows are variables, divisor N - 1
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))  # rounding can leave -1e-18 for identical models
    if se == 0.0:
        z = 0.0 if delta == 0.0 else math.copysign(math.inf, delta)
    else:
        z = delta / se
    p = math.erfc(abs(z) / math.sqrt(2.0))  # 2 (1 - Phi(|z|)) without cancellation for large |z|
    q = float(stats.norm.ppf(1 - alpha / 2))
    return DeLongResult(float(aucs[0]), float(aucs[1]), delta, se, z, p, delta - q * se, delta + q * se, m, n)


def delong_per_class(probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray, task: str,
                     class_names: Sequence[str] | None = None, alpha: float = 0.05) -> dict[str, DeLongResult]:
    """One-vs-rest DeLong test per class (multi-class: class c against the rest; multi-label: label c, entries
    marked -1 left out). Not a test of the macro AUC (module docstring); classes absent or alone are skipped."""
    probs_a, probs_b, labels = np.asarray(probs_a), np.asarray(probs_b), np.asarray(labels)
    c = probs_a.shape[1]
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    out: dict[str, DeLongResult] = {}
    for j, name in enumerate(names):
        if task == "multilabel":
            keep = labels[:, j] >= 0
            y = labels[keep, j].astype(int)
        else:
            keep = np.ones(len(labels), dtype=bool)
            y = (labels.astype(int) == j).astype(int)
        if len(np.unique(y)) < 2:
            continue
        out[name] = delong_test(probs_a[keep, j], probs_b[keep, j], y, alpha)
    return out


# ------------------------------------------------------------------------------------------------ predictions files
@dataclass(frozen=True)
class Predictions:
    """One ``predictions.csv`` of the evaluate workflow (:class:`ffcl_monai.handlers.reports.TestReport`)."""

    path: Path
    images: list[str]
    labels: np.ndarray  # (N,) class index, or (N, C) 0/1/-1 for multi-label
    probs: np.ndarray  # (N, C)
    class_names: list[str]
    scores: np.ndarray  # (N, C) full-precision ranking scores (score_<class>); the probabilities in older files


def read_predictions(path: str | Path, task: str) -> Predictions:
    """Read ``predictions.csv`` (columns ``image, label, predicted, prob_<class>..., score_<class>...``; multi-label
    labels ``0|1|-1``).

    Probabilities are stored with 6 decimals: a confidently saturated softmax reads as 1.000000 / 0.000000, which
    would tie those images in an AUC. The ``score_<class>`` columns hold the report's full-precision log-odds, the
    scores ``metrics.json``'s AUCs rank by; ``scores`` are those (files written before they existed: the
    probabilities, with the ties).
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise UserInputError(f"cannot read predictions file {path}: {e}") from None
    if not rows or rows[0][:2] != ["image", "label"]:
        raise UserInputError(f"{path} is not a predictions.csv of the evaluate workflow (header image,label,...)")
    cols = [i for i, h in enumerate(rows[0]) if h.startswith("prob_")]
    if not cols:
        raise UserInputError(f"{path} has no prob_<class> columns")
    names = [rows[0][i][len("prob_"):] for i in cols]
    body = rows[1:]
    score_cols = [rows[0].index(f"score_{c}") for c in names if f"score_{c}" in rows[0]]
    try:
        probs = np.array([[float(r[i]) for i in cols] for r in body], dtype=np.float64).reshape(len(body), len(cols))
        scores = (np.array([[float(r[i]) for i in score_cols] for r in body], dtype=np.float64).reshape(probs.shape)
                  if len(score_cols) == len(cols) else probs)
        if task == "multilabel":
            labels = np.array([[int(v) for v in r[1].split("|")] for r in body], dtype=np.int64).reshape(len(body), -1)
        else:
            labels = np.array([int(r[1]) for r in body], dtype=np.int64)
    except (ValueError, IndexError) as e:
        raise UserInputError(f"{path}: unreadable row ({e}); rerun the evaluate step that wrote it") from None
    return Predictions(path, [r[0] for r in body], labels, probs, names, scores)


def check_same_images(preds: Sequence[Predictions]) -> None:
    """Refuse a paired comparison of predictions that are not the same images, in the same order, with the same
    labels and classes (it would pair unrelated cases)."""
    first = preds[0]
    for p in preds[1:]:
        if p.images != first.images or p.class_names != first.class_names or not np.array_equal(p.labels, first.labels):
            raise UserInputError(
                f"{p.path} and {first.path} do not hold the same images, labels and classes in the same order; a "
                "paired comparison needs both models evaluated on one split of one datalist.")


# ------------------------------------------------------------------------------------------------ paired bootstrap
def bootstrap_indices(n: int, n_bootstrap: int, seed: int = 0):
    """The resamples, one ``(n,)`` index array at a time, drawn as :func:`~ffcl_monai.handlers.metrics.bootstrap_ci`
    draws them (``default_rng(seed)``, ``rng.integers(0, n, size=n)`` per resample)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        yield rng.integers(0, n, size=n)


def _percentile_ci(draws: np.ndarray, alpha: float) -> tuple[float, float]:
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


@dataclass
class JointBootstrap:
    """Every model scored on the same resamples (:func:`joint_bootstrap`).

    ``point[model][metric]`` is the metric on all images, ``draws[model][metric]`` its (B,) values on the resamples,
    ``indices`` the (B, N) resamples when kept.
    """

    point: dict[Hashable, dict[str, float]]
    draws: dict[Hashable, dict[str, np.ndarray]]
    n_bootstrap: int
    seed: int
    indices: np.ndarray | None = None
    metrics: tuple[str, ...] = field(default=HEADLINE)

    def delta(self, a: Hashable, b: Hashable, metric: str, alpha: float = 0.05) -> dict[str, float]:
        """``metric(a) - metric(b)`` on all images, with its paired percentile bootstrap CI."""
        d = self.draws[a][metric] - self.draws[b][metric]
        lo, hi = _percentile_ci(d, alpha)
        return {"value": self.point[a][metric] - self.point[b][metric], "ci_low": lo, "ci_high": hi,
                "n_bootstrap": int((~np.isnan(d)).sum())}

    def pooled(self, pairs: Sequence[tuple[Hashable, Hashable]], metric: str, alpha: float = 0.05,
               quantile: str = "t") -> PooledDelta:
        """Mean of ``metric(a_k) - metric(b_k)`` over the (a_k, b_k) pairs (one per seed) with the CI of
        :func:`pool_seeds`."""
        deltas = [self.point[a][metric] - self.point[b][metric] for a, b in pairs]
        boot = np.vstack([self.draws[a][metric] - self.draws[b][metric] for a, b in pairs])
        return pool_seeds(deltas, boot, alpha, quantile)


def joint_bootstrap(probs_by_model: Mapping[Hashable, np.ndarray], labels: np.ndarray, task: str,
                    class_names: Sequence[str] | None = None, n_bootstrap: int = 1000, seed: int = 0,
                    metrics: Sequence[str] = HEADLINE, keep_indices: bool = False,
                    scores_by_model: Mapping[Hashable, np.ndarray] | None = None) -> JointBootstrap:
    """Score every model on the same ``n_bootstrap`` resamples of the images (module docstring).

    Args:
        probs_by_model: ``{model: (N, C) probabilities}``, all on the same N images in the same order.
        labels: (N,) class indices or (N, C) multi-label 0/1/-1.
        task, class_names: as for :func:`~ffcl_monai.handlers.metrics.classification_metrics`.
        n_bootstrap, seed: the resamples (:func:`bootstrap_indices`).
        metrics: which metrics to keep.
        keep_indices: keep the (B, N) resamples in the result (memory: 8 B N bytes).
        scores_by_model: ``{model: (N, C) ranking scores}`` for the AUCs (``Predictions.scores``); default the
            probabilities.
    """
    labels = np.asarray(labels)
    n = len(labels)
    probs = {k: np.asarray(v, dtype=np.float64) for k, v in probs_by_model.items()}
    for k, v in probs.items():
        if len(v) != n:
            raise ValueError(f"model {k!r}: {len(v)} predictions for {n} labels")
    metrics = tuple(metrics)
    scores = {k: None if scores_by_model is None else np.asarray(scores_by_model[k], dtype=np.float64) for k in probs}
    point = {}
    for k, v in probs.items():
        values = classification_metrics(v, labels, task, class_names, scores[k])
        point[k] = {m: values[m] for m in metrics}
    draws = {k: {m: np.empty(n_bootstrap) for m in metrics} for k in probs}
    kept = np.empty((n_bootstrap, n), dtype=np.int64) if keep_indices else None
    for b, idx in enumerate(bootstrap_indices(n, n_bootstrap, seed)):
        if kept is not None:
            kept[b] = idx
        y = labels[idx]
        for k, v in probs.items():  # one resample, every model: the pairing
            values = classification_metrics(v[idx], y, task, class_names, None if scores[k] is None else scores[k][idx])
            for m in metrics:
                draws[k][m][b] = values[m]
    return JointBootstrap(point, draws, n_bootstrap, seed, kept, metrics)


def paired_bootstrap(probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray, task: str,
                     class_names: Sequence[str] | None = None, n_bootstrap: int = 1000, seed: int = 0,
                     alpha: float = 0.05, metrics: Sequence[str] = HEADLINE) -> dict[str, dict[str, float]]:
    """``{metric: {"value": a - b, "ci_low", "ci_high", "n_bootstrap"}}``: the paired bootstrap of two models."""
    jb = joint_bootstrap({"a": probs_a, "b": probs_b}, labels, task, class_names, n_bootstrap, seed, metrics)
    return {m: jb.delta("a", "b", m, alpha) for m in jb.metrics}


# ------------------------------------------------------------------------------------------------ pooling over seeds
@dataclass(frozen=True)
class PooledDelta:
    """Mean difference over seeds with an interval that includes the seed-to-seed spread (:func:`pool_seeds`)."""

    mean: float
    se: float
    ci_low: float
    ci_high: float
    var_images: float  # Var of the seed-mean over joint image resamples
    var_seeds: float  # s^2 / S (NaN with one seed)
    df: float  # degrees of freedom of the quantile (inf: normal)
    n_seeds: int
    seeds_estimated: bool  # False with one seed: the interval covers image sampling only
    deltas: tuple[float, ...]


def pool_seeds(deltas: Sequence[float], boot: np.ndarray, alpha: float = 0.05, quantile: str = "t") -> PooledDelta:
    """Pool per-seed paired differences (module docstring).

    Args:
        deltas: (S,) difference per seed on all images.
        boot: (S, B) the differences on B joint resamples (resample b is the same images for every seed); a
            resample on which any seed's difference is undefined (NaN) is left out.
        alpha: 1 - confidence level.
        quantile: ``"t"`` (Welch-Satterthwaite degrees of freedom) or ``"normal"``.
    """
    if quantile not in ("t", "normal"):
        raise ValueError(f"quantile must be 't' or 'normal', not {quantile!r}")
    d = np.asarray(deltas, dtype=np.float64)
    boot = np.atleast_2d(np.asarray(boot, dtype=np.float64))
    s = len(d)
    if s == 0 or boot.shape[0] != s:
        raise ValueError(f"pool_seeds: {s} deltas and {boot.shape[0]} rows of bootstrap draws")
    seed_mean = boot.mean(axis=0)
    seed_mean = seed_mean[~np.isnan(seed_mean)]
    mean = float(d.mean())
    v_img = float(np.var(seed_mean, ddof=1)) if len(seed_mean) > 1 else float("nan")
    if s > 1:
        v_seed = float(np.var(d, ddof=1)) / s
        total = v_img + v_seed
        if quantile == "normal" or v_seed == 0.0:
            df = math.inf
        else:
            df = total**2 / (v_seed**2 / (s - 1))
    else:
        v_seed, total, df = float("nan"), v_img, math.inf
    se = math.sqrt(total) if total == total else float("nan")
    q = float(stats.norm.ppf(1 - alpha / 2)) if math.isinf(df) else float(stats.t.ppf(1 - alpha / 2, df))
    return PooledDelta(mean, se, mean - q * se, mean + q * se, v_img, v_seed, df, s, s > 1, tuple(float(x) for x in d))


def compare_seeds(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray], labels: np.ndarray, task: str,
                  class_names: Sequence[str] | None = None, n_bootstrap: int = 1000, seed: int = 0,
                  alpha: float = 0.05, metrics: Sequence[str] = ("auc", "accuracy"),
                  quantile: str = "t") -> dict[str, object]:
    """Model ``a`` against reference ``b`` over the seeds both have (``{seed: (N, C) probabilities}``).

    Returns:
        ``{"seeds": [...], "per_seed": {seed: {metric: delta dict, "delong": DeLongResult | None}},
        "pooled": {metric: PooledDelta}}``; DeLong for binary tasks only (module docstring).
    """
    seeds = [k for k in a if k in b]
    if not seeds:
        raise ValueError("compare_seeds: no seed is shared by the two models")
    jb = joint_bootstrap({**{("a", k): a[k] for k in seeds}, **{("b", k): b[k] for k in seeds}}, labels, task,
                         class_names, n_bootstrap, seed, metrics)
    per_seed: dict[int, dict[str, object]] = {}
    for k in seeds:
        per_seed[k] = {m: jb.delta(("a", k), ("b", k), m, alpha) for m in metrics}
        per_seed[k]["delong"] = binary_delong(a[k], b[k], labels, task, alpha)
    pooled = {m: jb.pooled([(("a", k), ("b", k)) for k in seeds], m, alpha, quantile) for m in metrics}
    return {"seeds": seeds, "per_seed": per_seed, "pooled": pooled}


def binary_delong(pa: np.ndarray, pb: np.ndarray, labels: np.ndarray, task: str,
                  alpha: float = 0.05) -> DeLongResult | None:
    """DeLong on the positive-class column (the column ``classification_metrics`` reports as the binary AUC); None
    for multi-class and multi-label tasks (module docstring) and for a single class."""
    pa, pb, y = np.asarray(pa), np.asarray(pb), np.asarray(labels)
    if task != "binary" or pa.shape[1] > 2 or len(np.unique(y)) < 2:
        return None
    col = pa.shape[1] - 1
    return delong_test(pa[:, col], pb[:, col], y, alpha)
