"""Operating point and calibration of a classifier: the decision threshold, sensitivity and specificity with
confidence intervals, expected calibration error, the reliability diagram and temperature scaling.

Everything that is *chosen* (the binary threshold, the temperature) is chosen on the validation split and applied
unchanged to the evaluated split; a report on the validation split itself says so (its numbers are optimistic).

**Binary threshold.** Scores are the log-odds of the positive class (for a softmax pair ``x1 - x0``; they rank as
the probabilities do, without the float saturation at 1.0 of confident predictions); an image is called positive iff
``score >= t`` (the convention of ``sklearn.metrics.roc_curve``), and the candidates ``t`` are the distinct scores of
the validation images, so every achievable (sensitivity, specificity) pair is considered. Counts are integers, so
ties are decided exactly, never by rounding.

- ``youden``: maximise Youden's J (Youden 1950, "Index for rating diagnostic tests", Cancer 3:32-35)

      J(t) = sensitivity(t) + specificity(t) - 1,   evaluated as  TP(t) * N - FP(t) * P  (= J * P * N)

  Ties (several t with the same maximal J) go to the **smallest** such t: the highest sensitivity among equally
  good points, since in screening a missed case usually costs more than a false alarm.
- ``sensitivity:<s>``: the **largest** candidate t whose validation sensitivity is ``>= s`` (``0 < s <= 1``).
  Sensitivity can only fall as t grows, so this is the point of highest specificity that still meets the target;
  the smallest positive score always meets it, so a threshold exists. Equal scores are one candidate (all of them
  switch together).
- a fixed probability ``p`` in (0, 1), e.g. ``0.5``: ``t = log(p / (1 - p))``, nothing is chosen.

The reported ``threshold`` is the probability ``sigmoid(t)`` of the positive class as in ``predictions.csv``
(``threshold_log_odds`` is t itself, which the decisions use).

**Sensitivity and specificity** carry Wilson score 95% intervals (Wilson 1927, JASA 22:209-212; Newcombe 1998,
Stat Med 17:857-872, method 3), with ``p = k / n`` and ``z = 1.95996``:

    centre = (p + z^2 / 2n) / (1 + z^2 / n),   half-width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

Wilson rather than the project's bootstrap: a proportion has this closed form with good coverage at small n, and
at p = 0 or 1 (a class always caught) the percentile bootstrap collapses to the point [1, 1] while Wilson stays
honest. The interval treats the threshold as fixed, which it is on a split it was not chosen on. The other metrics
at the threshold (accuracy, F1, precision, recall) use the project's percentile bootstrap, as the headline table.

**Multi-class**: one-vs-rest at the predicted class (argmax): for class c, sensitivity = TP_c / (TP_c + FN_c) and
specificity = TN_c / (TN_c + FP_c), read off the confusion matrix. **Multi-label**: the same per label at 0.5,
entries labelled -1 (ignored) left out.

**Calibration**: expected calibration error (Naeini, Cooper, Hauskrecht 2015, AAAI; Guo, Pleiss, Sun, Weinberger
2017, "On Calibration of Modern Neural Networks", ICML, Eq. 3)

    ECE = sum_m |B_m| / n * | acc(B_m) - conf(B_m) |

over M equal-width bins ``B_m = ((m - 1) / M, m / M]`` (right-closed; the first bin also holds 0), M = 15 by
default as in Guo et al. Binary: ``conf`` = P(positive), ``acc`` = fraction of positives in the bin (the reliability
diagram of the positive probability). Multi-class: top-label, ``conf = max_c p_c`` and ``acc`` = fraction whose
argmax is the label. Multi-label: every (image, label) entry that is not ignored, pooled, as binary. The reliability
data are these bins (edges, count, mean confidence, accuracy; ``None`` for an empty bin).

**Temperature scaling** (Guo et al. 2017, Sec. 4.2): one scalar T > 0 divides the logits, ``softmax(x / T)``
(binary with one log-odds per image, and multi-label: ``sigmoid(x / T)``, i.e. BCE; a binary softmax pair gives the
same T, since ``softmax(x / T)_1 = sigmoid((x1 - x0) / T)``), T minimising the validation negative log-likelihood.
The NLL is convex in 1 / T (a log-sum-exp of linear functions), hence unimodal in ``u = log T``; it is minimised
over u by bounded Brent search (``scipy.optimize.minimize_scalar``) on ``[log 0.01, log 100]``, which keeps T > 0
without constraints and finds the single minimum to ``|du| < 1e-8``. Losses are float64 log-sum-exp
(``F.cross_entropy``, ``F.binary_cross_entropy_with_logits``), finite even for logits of 1e4. Separable validation
data have no finite optimum (the NLL keeps falling as T -> 0): the search stops at the bound and says so. T rescales
the log-odds monotonically, so decisions at a threshold are the same before and after scaling; only probabilities
(and the ECE) change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ffcl_monai.errors import UserInputError

logger = logging.getLogger(__name__)

#: Phi^{-1}(0.975): the two-sided 95% normal quantile of the Wilson interval.
Z95 = 1.959963984540054
#: Search interval of the temperature (Brent search on log T).
T_BOUNDS = (1e-2, 1e2)
#: The split that thresholds and temperatures are chosen on.
REFERENCE_SPLIT = "validation"

_RULE_HELP = ("`threshold` (evaluate.yaml) must be `youden`, a probability in (0, 1) such as 0.5, or "
              "`sensitivity:<target>` with 0 < target <= 1 (e.g. sensitivity:0.9)")


# --------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class ThresholdRule:
    """How the binary threshold is set: ``kind`` is ``youden``, ``sensitivity`` (``value`` = target) or ``fixed``
    (``value`` = probability of the positive class)."""

    kind: str
    value: float | None = None

    @property
    def needs_fit(self) -> bool:
        """Whether the threshold is chosen from predictions (everything but a fixed probability)."""
        return self.kind != "fixed"

    def describe(self) -> str:
        if self.kind == "youden":
            return "youden"
        return f"{self.value:g}" if self.kind == "fixed" else f"sensitivity:{self.value:g}"


def _probability(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def parse_threshold_rule(value: Any) -> ThresholdRule:
    """``youden`` | a probability in (0, 1) | ``sensitivity:<target>`` -> :class:`ThresholdRule`.

    Raises:
        UserInputError: (a ValueError) naming the ``threshold`` key and the accepted forms.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "youden":
            return ThresholdRule("youden")
        if text.startswith("sensitivity:"):
            target = _probability(text.split(":", 1)[1])
            if target is None or not 0 < target <= 1:
                raise UserInputError(f"{_RULE_HELP}; got {value!r}.")
            return ThresholdRule("sensitivity", target)
    p = _probability(value)
    if p is not None and 0 < p < 1:
        return ThresholdRule("fixed", p)
    raise UserInputError(f"{_RULE_HELP}; got {value!r}.")


def needs_validation_pass(task: str, eval_split: str, threshold: Any, temperature_scaling: bool) -> bool:
    """Whether evaluate.yaml must score the validation split before ``eval_split``: something is fitted (a binary
    threshold other than a fixed probability, or a temperature) and the evaluated split is not validation itself."""
    rule = parse_threshold_rule(threshold)
    fits = bool(temperature_scaling) or (task == "binary" and rule.needs_fit)
    return fits and eval_split != REFERENCE_SPLIT


def validation_datalist(datalist: str, num_classes: int, task: str,
                        fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The validation split that the threshold and temperature are fitted on, with a message naming the keys that
    avoid it when the datalist has none."""
    from ffcl_monai.data.datalist import DatalistError, load_datalist

    try:
        return load_datalist(datalist, REFERENCE_SPLIT, num_classes, task, fields=fields)
    except DatalistError as e:
        raise DatalistError(
            f"{e} evaluate.yaml chooses the decision threshold (`threshold`) and the temperature "
            "(`temperature_scaling`) on the validation split; without one, run it with `--threshold 0.5 "
            "--temperature_scaling False`."
        ) from e


# --------------------------------------------------------------------------- binary thresholds


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold on the score scale and the counts it gives on the split it was computed on."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    @property
    def youden_j(self) -> float:
        return self.sensitivity + self.specificity - 1


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} labels.")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite to choose a threshold (a NaN/Inf prediction reached the report).")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1.")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ValueError("choosing a threshold needs both classes in the split it is chosen on (validation).")
    return s, y


def _candidates(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Distinct scores in decreasing order and TP, FP at each (positive iff score >= t); P, N."""
    s, y = _binary_inputs(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each run of equal scores
    p = int(y.sum())
    return s[last], tp[last], fp[last], p, len(y) - p


def _choice(t: float, tp: int, fp: int, p: int, n: int) -> ThresholdChoice:
    return ThresholdChoice(float(t), int(tp), int(fp), int(n - fp), int(p - tp))


def youden_threshold(scores: Any, labels: Any) -> ThresholdChoice:
    """The threshold of maximal Youden's J among the distinct scores (positive iff ``score >= t``); ties go to the
    smallest threshold (highest sensitivity)."""
    thr, tp, fp, p, n = _candidates(scores, labels)
    j = tp * n - fp * p  # J * P * N, exact in integers
    i = int(np.flatnonzero(j == j.max())[-1])  # thresholds decrease: the last tie is the smallest threshold
    return _choice(thr[i], tp[i], fp[i], p, n)


def sensitivity_threshold(scores: Any, labels: Any, target: float) -> ThresholdChoice:
    """The largest distinct score t with sensitivity(t) >= ``target`` (positive iff ``score >= t``): the highest
    specificity that meets the target."""
    if not 0 < target <= 1:
        raise ValueError(f"the target sensitivity must be in (0, 1], got {target!r}.")
    thr, tp, fp, p, n = _candidates(scores, labels)
    # tp / p >= target, with a tolerance for targets such as 0.95 that are not exact binary fractions
    i = int(np.flatnonzero(tp >= target * p - 1e-9 * p)[0])  # TP grows as t falls: the first hit is the largest t
    return _choice(thr[i], tp[i], fp[i], p, n)


def counts_at(scores: Any, labels: Any, threshold: float) -> ThresholdChoice:
    """TP, FP, TN, FN of ``score >= threshold`` (a single class is allowed here: it is the evaluated split)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    pos = s >= threshold
    tp, fp = int((pos & (y == 1)).sum()), int((pos & (y == 0)).sum())
    return _choice(threshold, tp, fp, int((y == 1).sum()), int((y == 0).sum()))


def choose_threshold(scores: Any, labels: Any, rule: ThresholdRule) -> ThresholdChoice:
    """Apply ``rule`` to log-odds ``scores``; a fixed probability p becomes ``log(p / (1 - p))``."""
    if rule.kind == "youden":
        return youden_threshold(scores, labels)
    if rule.kind == "sensitivity":
        return sensitivity_threshold(scores, labels, float(rule.value))
    p = float(rule.value)
    return counts_at(scores, labels, math.log(p) - math.log1p(-p))


def binary_log_odds(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Log-odds of the positive class: ``x1 - x0`` for a (N, 2) softmax pair, the logit itself for (N,) / (N, 1)."""
    x = torch.as_tensor(logits).double()
    if x.ndim == 2 and x.shape[1] == 2:
        return (x[:, 1] - x[:, 0]).numpy()
    if x.ndim == 1 or (x.ndim == 2 and x.shape[1] == 1):
        return x.reshape(-1).numpy()
    raise ValueError(f"binary logits must be (N, 2) or (N,), got shape {tuple(x.shape)}.")


def _sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))


# --------------------------------------------------------------------------- intervals and per-class rates


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (two-sided, ``z`` = 1.96 for 95%); NaNs for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(k: int, n: int) -> dict[str, Any]:
    """``{"value", "ci_low", "ci_high", "k", "n"}`` with a Wilson 95% interval (value NaN for n = 0)."""
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi, "k": int(k), "n": int(n)}


def sens_spec(pred_positive: np.ndarray, positive: np.ndarray) -> dict[str, dict[str, Any]]:
    """Sensitivity and specificity with Wilson intervals from boolean decisions and truths."""
    pred_positive, positive = np.asarray(pred_positive, bool), np.asarray(positive, bool)
    return {
        "sensitivity": proportion(int((pred_positive & positive).sum()), int(positive.sum())),
        "specificity": proportion(int((~pred_positive & ~positive).sum()), int((~positive).sum())),
    }


def one_vs_rest(pred: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per class c: sensitivity and specificity of "predicted c" against "is c" (single-label, e.g. argmax)."""
    pred, labels = np.asarray(pred).astype(int), np.asarray(labels).astype(int)
    return {name: sens_spec(pred == c, labels == c) for c, name in enumerate(class_names)}


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(
    confidence: np.ndarray, outcome: np.ndarray, n_bins: int = 15
) -> tuple[float, list[dict[str, Any]]]:
    """ECE and reliability bins of confidences in [0, 1] against 0/1 outcomes (equal-width, right-closed bins).

    Returns:
        ``(ece, bins)``; each bin ``{"lower", "upper", "count", "confidence", "accuracy"}`` (mean confidence and
        observed frequency, ``None`` when the bin is empty).
    """
    if int(n_bins) < 1:
        raise UserInputError(f"`ece_bins` (evaluate.yaml) must be >= 1, got {n_bins!r}.")
    n_bins = int(n_bins)
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hit = np.asarray(outcome, dtype=np.float64).reshape(-1)
    if conf.shape != hit.shape:
        raise ValueError(f"{len(conf)} confidences for {len(hit)} outcomes.")
    edges = np.arange(n_bins + 1) / n_bins  # i / M, each correctly rounded
    # bin m holds (edges[m], edges[m+1]]: searchsorted(left) - 1; 0 goes to the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(idx, weights=hit, minlength=n_bins)
    bins, ece, n = [], 0.0, max(len(conf), 1)
    for m in range(n_bins):
        c = int(count[m])
        mean_conf = conf_sum[m] / c if c else None
        acc = hit_sum[m] / c if c else None
        if c:
            ece += c / n * abs(acc - mean_conf)
        bins.append({"lower": float(edges[m]), "upper": float(edges[m + 1]), "count": c,
                     "confidence": None if mean_conf is None else float(mean_conf),
                     "accuracy": None if acc is None else float(acc)})
    return float(ece), bins


def calibration_kind(task: str) -> str:
    """What the ECE of ``task`` measures: ``positive-class``, ``top-label`` or ``per-label pooled``."""
    return {"binary": "positive-class", "multilabel": "per-label pooled"}.get(task, "top-label")


def calibration_error(
    probs: np.ndarray, labels: np.ndarray, task: str, n_bins: int = 15
) -> tuple[float, list[dict[str, Any]]]:
    """ECE and reliability bins of a task's probabilities (see the module docstring for what is binned)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if task == "binary":
        conf = probs[:, 1] if probs.ndim == 2 and probs.shape[1] == 2 else probs.reshape(-1)
        return expected_calibration_error(conf, labels.reshape(-1) == 1, n_bins)
    if task == "multilabel":
        keep = labels >= 0
        return expected_calibration_error(probs[keep], labels[keep] == 1, n_bins)
    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == labels.astype(int), n_bins)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature with the NLL (mean per image, or per entry for multi-label) before and after it."""

    temperature: float
    nll_before: float
    nll_after: float
    at_bound: bool


def _nll(logits: torch.Tensor, labels: torch.Tensor, task: str, temperature: float) -> float:
    x = logits / temperature
    if task == "multilabel" or x.ndim == 1:
        y = labels.reshape(x.shape).double()
        mask = y >= 0
        return float(F.binary_cross_entropy_with_logits(x[mask], y[mask]))
    return float(F.cross_entropy(x, labels.reshape(-1).long()))


def _as_logits(logits: Any, task: str) -> torch.Tensor:
    x = torch.as_tensor(logits).detach().double().cpu()
    if task == "binary" and (x.ndim == 1 or x.shape[-1] == 1):
        return x.reshape(-1)  # one log-odds per image: sigmoid / BCE
    return x


def fit_temperature(logits: Any, labels: Any, task: str, bounds: tuple[float, float] = T_BOUNDS) -> TemperatureFit:
    """The T > 0 minimising the NLL of ``logits / T`` (bounded Brent search on log T; see the module docstring).

    Args:
        logits: (N, C) logits (softmax; sigmoid for multi-label), or (N,) binary log-odds (sigmoid).
        labels: (N,) class indices / 0-1, or (N, C) 0/1/-1 for multi-label (-1 entries ignored).
        task: ``binary``, ``multiclass`` or ``multilabel``.
    """
    from scipy.optimize import minimize_scalar

    x = _as_logits(logits, task)
    y = torch.as_tensor(labels).detach().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("temperature scaling needs finite logits (a NaN/Inf prediction reached the report).")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])

    def nll_u(u: float) -> float:
        return _nll(x, y, task, math.exp(u))

    res = minimize_scalar(nll_u, bounds=(lo, hi), method="bounded", options={"xatol": 1e-8})
    before = _nll(x, y, task, 1.0)
    u, after, d = float(res.x), float(res.fun), 1e-2
    if lo + d <= u <= hi - d and nll_u(u - d) > after and nll_u(u + d) > after:  # a strict interior minimum
        t, at_bound = math.exp(u), False
    else:
        # no interior minimum: the NLL falls all the way to a bound (separable data: T -> 0) or is flat (constant
        # logits, or every term already 0 in float64); take the best of T = 1 and the bounds, T = 1 on ties
        after, t = min([(before, 1.0), (nll_u(lo), bounds[0]), (nll_u(hi), bounds[1])], key=lambda o: o[0])
        at_bound = t != 1.0
    if not after <= before:  # never report a temperature that is worse than none
        t, after, at_bound = 1.0, before, False
    if at_bound:
        logger.warning("temperature scaling stopped at its bound T=%.3g: the validation predictions are separable "
                       "(or the NLL has no minimum inside [%g, %g]); the calibrated probabilities are extreme.",
                       t, *bounds)
    return TemperatureFit(t, before, after, at_bound)


def scaled_probabilities(logits: Any, task: str, temperature: float = 1.0) -> np.ndarray:
    """Probabilities of ``logits / temperature``: softmax, or sigmoid for multi-label and binary log-odds; binary
    log-odds give an (N, 2) [negative, positive] array like a softmax pair."""
    x = _as_logits(logits, task) / temperature
    if task == "multilabel":
        return torch.sigmoid(x).numpy()
    if x.ndim == 1:
        p = torch.sigmoid(x)
        return torch.stack([1 - p, p], 1).numpy()
    return torch.softmax(x, dim=-1).numpy()


# --------------------------------------------------------------------------- the report sections


@dataclass
class Assessment:
    """What :func:`assess` found: the ``operating_point`` and ``calibration`` sections of metrics.json, the decisions
    at the chosen threshold (binary; None otherwise) and both reliability diagrams' bins."""

    operating_point: dict[str, Any]
    calibration: dict[str, Any]
    decisions: np.ndarray | None = None

    def flat_metrics(self, prefix: str = "test_") -> dict[str, float]:
        """Numbers for MLflow: ``<prefix>ece``, ``ece_calibrated``, ``temperature``, ``threshold``, sensitivity and
        specificity (+ ``_ci_low``/``_ci_high``; ``_at_threshold`` at the chosen point, per class for multi-class)
        and the headline metrics ``<name>_at_threshold``."""
        out: dict[str, float] = {f"{prefix}ece": self.calibration["ece"]}
        ts = self.calibration.get("temperature_scaling", {})
        if ts.get("enabled"):
            out[f"{prefix}ece_calibrated"] = ts["ece"]
            out[f"{prefix}temperature"] = ts["temperature"]

        def add(name: str, m: dict[str, Any]) -> None:
            out[f"{prefix}{name}"] = m["value"]
            out[f"{prefix}{name}_ci_low"] = m["ci_low"]
            out[f"{prefix}{name}_ci_high"] = m["ci_high"]

        opp = self.operating_point
        if "at_0.5" in opp:
            for k in ("sensitivity", "specificity"):
                add(k, opp["at_0.5"][k])
        if "at_threshold" in opp:
            at = opp["at_threshold"]
            out[f"{prefix}threshold"] = at["threshold"]
            for k in ("sensitivity", "specificity"):
                add(f"{k}_at_threshold", at[k])
            for k, m in at.get("metrics", {}).items():
                add(f"{k}_at_threshold", m)
        for name, rates in opp.get("per_class", {}).items():
            for k in ("sensitivity", "specificity"):
                add(f"{k}_{name}", rates[k])
        return out


def _reference_info(reference_name: str, n: int, same_split: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"chosen_on": reference_name, "n_chosen_on": int(n), "same_split": bool(same_split)}
    if same_split:
        info["note"] = (f"chosen on the evaluated split ({reference_name}) itself: the numbers at the chosen "
                        "threshold / after temperature scaling are optimistic; the test split's report is the "
                        "honest one.")
    return info


def assess(
    logits: Any,
    labels: Any,
    task: str,
    class_names: Sequence[str],
    threshold: Any = None,
    temperature_scaling: bool = False,
    ece_bins: int = 15,
    reference: tuple[Any, Any] | None = None,
    reference_name: str = REFERENCE_SPLIT,
    same_split: bool = False,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Assessment:
    """Operating point and calibration of the evaluated split's ``logits`` / ``labels``.

    Args:
        threshold: the binary rule (:func:`parse_threshold_rule`); None: only the 0.5 point is reported.
        temperature_scaling: fit T on ``reference`` and report the ECE after it too.
        ece_bins: number of equal-width bins.
        reference: (logits, labels) of the split that the threshold and temperature are chosen on; required when
            something is fitted.
        reference_name, same_split: where ``reference`` comes from, and whether it is the evaluated split itself
            (recorded, with a note that the numbers are optimistic).
        n_bootstrap, seed: bootstrap of the headline metrics at the chosen threshold (paired with the 0.5 ones).
    """
    from ffcl_monai.handlers.metrics import bootstrap_ci, log_odds, probabilities

    x = torch.as_tensor(logits).detach().double().cpu()
    y = np.asarray(torch.as_tensor(labels).detach().cpu())
    names = list(class_names)
    rule = parse_threshold_rule(threshold) if threshold is not None else None
    fits = bool(temperature_scaling) or (task == "binary" and rule is not None and rule.needs_fit)
    if fits and reference is None:
        raise ValueError(
            f"the threshold rule {threshold!r} / temperature_scaling={temperature_scaling} are fitted on the "
            f"{reference_name} split's predictions, and none were given; evaluate.yaml scores the {reference_name} "
            "split first (or set `threshold: 0.5` and `temperature_scaling: false`)."
        )
    ref_x = torch.as_tensor(reference[0]).detach().double().cpu() if reference is not None else None
    ref_y = np.asarray(torch.as_tensor(reference[1]).detach().cpu()) if reference is not None else None
    probs = probabilities(x, task).numpy()
    decisions = None

    # ---- operating point
    opp: dict[str, Any] = {"task": task, "ci_method": "Wilson score 95% (sensitivity, specificity); percentile "
                                                      "bootstrap 95% (other metrics, as in `metrics`)"}
    if task == "binary":
        z = binary_log_odds(x)
        positive = y.reshape(-1) == 1
        opp["positive_class"] = names[1] if len(names) > 1 else names[0]
        opp["decision"] = "positive iff P(positive) >= threshold (log-odds >= threshold_log_odds)"
        # 0.5 = argmax of the pair, the headline metrics' decisions (an exact 0.5 goes to the negative class)
        opp["at_0.5"] = {"threshold": 0.5, **sens_spec(z > 0, positive)}
        if rule is not None:
            opp["rule"] = rule.describe()
            if rule.needs_fit:
                choice = choose_threshold(binary_log_odds(ref_x), ref_y, rule)
                opp.update(_reference_info(reference_name, len(ref_y), same_split))
                chosen_on = {"sensitivity": choice.sensitivity, "specificity": choice.specificity,
                             "youden_j": choice.youden_j, "tp": choice.tp, "fp": choice.fp, "tn": choice.tn,
                             "fn": choice.fn}
            else:
                choice = choose_threshold(z, y, rule)
                opp["chosen_on"] = "fixed"
                chosen_on = None
            t = choice.threshold
            decisions = (z >= t).astype(int)
            at: dict[str, Any] = {"threshold": _sigmoid(t), "threshold_log_odds": t, **sens_spec(z >= t, positive)}
            scores = log_odds(x, task).numpy()
            # paired with the headline bootstrap (same seed, same resamples); the AUC does not depend on a threshold
            at["metrics"] = bootstrap_ci(probs, y, task, names, n_bootstrap, seed, scores=scores, pred=decisions,
                                         with_auc=False)
            if chosen_on is not None:
                at[reference_name] = chosen_on
            opp["at_threshold"] = at
    elif task == "multilabel":
        opp["rule"] = "0.5 per label"
        keep = y >= 0
        opp["per_class"] = {name: sens_spec(probs[keep[:, j], j] >= 0.5, y[keep[:, j], j] == 1)
                            for j, name in enumerate(names)}
    else:
        opp["rule"] = "argmax" + (" (`threshold` applies to binary tasks only)" if rule is not None else "")
        opp["per_class"] = one_vs_rest(probs.argmax(axis=1), y, names)

    # ---- calibration
    ece, bins = calibration_error(probs, y, task, ece_bins)
    cal: dict[str, Any] = {
        "kind": calibration_kind(task), "n_bins": int(ece_bins), "binning": "equal-width, ((m-1)/M, m/M]",
        "ece": ece, "reliability": bins,
        "temperature_scaling": {"enabled": bool(temperature_scaling)},
    }
    if temperature_scaling:
        fit = fit_temperature(ref_x, ref_y, task)
        ece_after, bins_after = calibration_error(scaled_probabilities(x, task, fit.temperature), y, task, ece_bins)
        ts = {"enabled": True, "temperature": fit.temperature, "ece": ece_after, "reliability": bins_after,
              **_reference_info(reference_name, len(ref_y), same_split),
              f"{reference_name}_nll_before": fit.nll_before, f"{reference_name}_nll_after": fit.nll_after,
              "at_bound": fit.at_bound}
        ts["fitted_on"] = ts.pop("chosen_on")
        ts["n_fitted_on"] = ts.pop("n_chosen_on")
        cal["temperature_scaling"] = ts
        if "at_threshold" in opp:  # same decisions, expressed on the calibrated probability
            at = opp["at_threshold"]
            at["threshold_calibrated"] = _sigmoid(at["threshold_log_odds"] / fit.temperature)
    return Assessment(opp, cal, decisions)
