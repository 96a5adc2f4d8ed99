"""Three estimates of a task's metric on one window of served traffic, side by side (classification metrics from
calibrated label distributions; a free-text answer's mean score from a per-answer predictor, `estimate_scores`).

- *label-free* (confidence-based performance estimation, CBPE, as NannyML does for tabular classifiers): each
  answer's calibrated label distribution gives the expected confusion counts of the window; the metric of those
  counts is the estimate. Its interval is the sampling interval *given that the calibration holds*: true labels
  drawn from the calibrated distributions. When the inputs move and the model's confidence stops meaning what it
  meant on the held-out set, this estimate is biased and its interval does not know it.
- *prediction-powered* (Angelopoulos et al. 2023; PPI++ power tuning, Angelopoulos, Duchi and Zrnic 2024): the
  label-free per-answer quantities, corrected by the labels that have arrived for the same window. Its interval is
  valid whatever the signal's quality, because the correction is measured on labelled answers of the window itself.
  It assumes the labelled answers are a random sample of the window (feedback given only on complaints breaks it).
- *labels only*: the metric on the labelled answers, with the same kind of interval.

Every metric here is a smooth function of per-answer means (accuracy: the mean of "answer correct"; macro-F1: of
the per-class true-positive, false-positive and false-negative indicators), so one linearised (delta-method)
machinery serves all three. The power-tuning weight λ minimises the plug-in variance the interval itself uses,
so the prediction-powered interval is never wider than the labels-only one (λ = 0 is labels only). ppi-python's
`ppi_mean_ci` uses a pooled-variance approximation of the same λ; at equal λ the two agree to rounding
(tests/monitor/test_estimators.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from tuneloop.errors import EstimationError

Method = Literal["label_free", "prediction_powered", "labels_only"]
METHODS: tuple[Method, ...] = ("label_free", "prediction_powered", "labels_only")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
MEAN_METRICS = ("accuracy", "chrf")  # a plain mean of a per-answer score in [0, 1]
LABEL_FREE_DRAWS = 2000


class EstimateError(EstimationError):
    """The inputs cannot give an estimate (shapes that disagree, probabilities that are not distributions)."""


@dataclass(frozen=True)
class Estimate:
    """One method's estimate of a metric on a window; value and bounds are None when it has nothing to go on
    (labels only, or prediction-powered, without a single label)."""

    method: Method
    value: float | None
    ci_lower: float | None
    ci_upper: float | None
    n_labelled: int
    n_unlabelled: int
    detail: dict[str, float]

    @property
    def width(self) -> float | None:
        return None if self.ci_lower is None or self.ci_upper is None else self.ci_upper - self.ci_lower


@dataclass(frozen=True)
class WindowData:
    """A window's answers: each one's predicted label index and calibrated label distribution, and the true label
    index of those that have one (-1 where none has arrived)."""

    predicted: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, k) rows sum to 1
    truth: np.ndarray  # (n,) int, -1 = unlabelled

    def __post_init__(self) -> None:
        n = self.predicted.shape[0]
        if self.probs.ndim != 2 or self.probs.shape[0] != n or self.truth.shape != (n,):
            raise EstimateError(f"window arrays disagree: predicted {self.predicted.shape}, probs "
                                f"{self.probs.shape}, truth {self.truth.shape}")
        k = self.probs.shape[1]
        if n and (np.any(self.predicted < 0) or np.any(self.predicted >= k) or np.any(self.truth >= k)):
            raise EstimateError(f"a label index is outside 0..{k - 1}")
        if n and not np.allclose(self.probs.sum(axis=1), 1.0, atol=1e-6):
            raise EstimateError("each answer's label probabilities must sum to 1")

    @property
    def labelled(self) -> np.ndarray:
        return self.truth >= 0


def z_value(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


# --- per-answer indicator vectors and the metrics as functions of their means -------------------------------


def indicators(metric: str, predicted: np.ndarray, truth_dist: np.ndarray) -> np.ndarray:
    """Per-answer quantities whose mean determines the metric, under a (possibly one-hot) true-label distribution.

    accuracy: [P(correct)]; macro_f1: for each class k, [P(true=k, pred=k), P(true!=k, pred=k), P(true=k, pred!=k)].
    """
    n, k = truth_dist.shape
    on_predicted = truth_dist[np.arange(n), predicted]
    if metric == "accuracy":
        return np.asarray(on_predicted[:, None])
    if metric == "macro_f1":
        is_pred = np.zeros((n, k))
        is_pred[np.arange(n), predicted] = 1.0
        tp = truth_dist * is_pred
        fp = (1.0 - truth_dist) * is_pred
        fn = truth_dist * (1.0 - is_pred)
        return np.stack([tp, fp, fn], axis=2).reshape(n, 3 * k)
    raise EstimateError(f"metric '{metric}' has no estimator; choose from {CLASSIFICATION_METRICS}")


def metric_of_means(metric: str, means: np.ndarray) -> float:
    if metric in MEAN_METRICS:
        return float(np.clip(means[0], 0.0, 1.0))
    tp, fp, fn = (np.clip(means.reshape(-1, 3)[:, i], 0.0, None) for i in range(3))
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1.mean())


def metric_of_draws(metric: str, predicted: np.ndarray, truth_draws: np.ndarray, k: int) -> np.ndarray:
    """The metric for each row of drawn true labels (draws, n), vectorised: the label-free interval's draws."""
    if metric == "accuracy":
        return np.asarray((truth_draws == predicted[None]).mean(axis=1))
    if metric != "macro_f1":
        raise EstimateError(f"metric '{metric}' has no estimator; choose from {CLASSIFICATION_METRICS}")
    draws = truth_draws.shape[0]
    # every draw's confusion counts in one bincount: cell (draw, true, predicted)
    cells = (np.arange(draws)[:, None] * k + truth_draws) * k + predicted[None]
    confusion = np.bincount(cells.ravel(), minlength=draws * k * k).reshape(draws, k, k)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    wrong = confusion.sum(axis=1) + confusion.sum(axis=2) - 2 * tp  # false positives + false negatives
    denominator = 2 * tp + wrong
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return np.asarray(f1.mean(axis=1))


def metric_gradient(metric: str, means: np.ndarray) -> np.ndarray:
    """d metric / d means, for the delta method."""
    if metric in MEAN_METRICS:
        return np.ones(1)
    m = means.reshape(-1, 3)
    tp, fp, fn = m[:, 0], m[:, 1], m[:, 2]
    denominator = 2 * tp + fp + fn
    safe = np.where(denominator > 0, denominator, 1.0)
    k = m.shape[0]
    grad = np.zeros((k, 3))
    grad[:, 0] = np.where(denominator > 0, 2 * (fp + fn) / safe**2, 0.0)
    grad[:, 1] = np.where(denominator > 0, -2 * tp / safe**2, 0.0)
    grad[:, 2] = grad[:, 1]
    return grad.reshape(-1) / k


# --- the three estimates ----------------------------------------------------------------------------------------


def one_hot(index: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((index.shape[0], k))
    out[np.arange(index.shape[0]), index] = 1.0
    return out


def label_free(metric: str, data: WindowData, level: float = 0.95, *, seed: int = 0) -> Estimate:
    """CBPE: the metric of the expected confusion counts; interval from true labels drawn from the calibrated
    distributions (the sampling error if the calibration holds on these inputs)."""
    n = data.predicted.shape[0]
    n_labelled = int(data.labelled.sum())
    if n == 0:
        return Estimate("label_free", None, None, None, n_labelled, 0, {})
    value = metric_of_means(metric, indicators(metric, data.predicted, data.probs).mean(axis=0))
    rng = np.random.default_rng(seed)
    k = data.probs.shape[1]
    if metric == "accuracy":  # each answer is right with its own probability: Bernoulli draws suffice
        right = data.probs[np.arange(n), data.predicted]
        draws = (rng.random((LABEL_FREE_DRAWS, n)) < right[None]).mean(axis=1)
    else:
        cumulative = np.cumsum(data.probs, axis=1)
        uniform = rng.random((LABEL_FREE_DRAWS, n))
        truth_draws = np.zeros((LABEL_FREE_DRAWS, n), dtype=np.int64)  # inverse CDF, one column at a time
        for column in range(k - 1):
            truth_draws += uniform > cumulative[None, :, column]
        draws = metric_of_draws(metric, data.predicted, truth_draws, k)
    tail = (1 - level) / 2
    low, high = (float(v) for v in np.quantile(draws, [tail, 1 - tail]))
    return Estimate("label_free", value, min(low, value), max(high, value), n_labelled, n - n_labelled,
                    {"draws": float(LABEL_FREE_DRAWS)})


def power_tuned_lambda(gradient: np.ndarray, y: np.ndarray, yhat: np.ndarray, yhat_unlabelled: np.ndarray) -> float:
    """The λ in [0, 1] that minimises the linearised variance the interval uses:
    V(λ) = g'[λ² Cov(Ŷu)/N + Cov(Y − λŶ)/n]g. Population (ddof 0) covariances, as ppi-python uses."""
    n, big_n = y.shape[0], yhat_unlabelled.shape[0]
    y_g, yhat_g, unl_g = y @ gradient, yhat @ gradient, yhat_unlabelled @ gradient
    cross = float(np.mean((y_g - y_g.mean()) * (yhat_g - yhat_g.mean())))
    curvature = float(unl_g.var()) / big_n + float(yhat_g.var()) / n
    if curvature <= 0:
        return 0.0
    return float(np.clip((cross / n) / curvature, 0.0, 1.0))


def ppi_estimate(metric: str, y: np.ndarray, yhat: np.ndarray, yhat_unlabelled: np.ndarray, *, level: float,
                 lam: float | None = None) -> tuple[float, float, float, float]:
    """Prediction-powered (PPI++) estimate of a smooth metric of means: (value, low, high, λ).

    y: the labelled answers' true indicator vectors; yhat: the same answers' predicted indicators; yhat_unlabelled:
    the unlabelled answers' predicted indicators. λ = 0 gives labels only, λ = 1 plain PPI, None power-tunes."""
    n, big_n = y.shape[0], yhat_unlabelled.shape[0]
    if n == 0:
        raise EstimateError("a prediction-powered estimate needs at least one labelled answer")
    if big_n == 0:
        lam = 0.0
    plug_in = (yhat_unlabelled.mean(axis=0) if big_n else 0.0) + (y - yhat).mean(axis=0)
    gradient = metric_gradient(metric, y.mean(axis=0) if big_n == 0 else plug_in)
    if lam is None:
        lam = power_tuned_lambda(gradient, y, yhat, yhat_unlabelled)
    means = (lam * yhat_unlabelled.mean(axis=0) if big_n else 0.0) + (y - lam * yhat).mean(axis=0)
    gradient = metric_gradient(metric, means)
    variance = float(((y - lam * yhat) @ gradient).var()) / n
    if big_n:
        variance += float(((lam * yhat_unlabelled) @ gradient).var()) / big_n
    value = metric_of_means(metric, means)
    half = z_value(level) * variance**0.5
    return value, value - half, value + half, lam


def _labelled_indicators(metric: str, data: WindowData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true indicators of the labelled answers, their predicted indicators, the unlabelled answers' predicted)."""
    labelled = data.labelled
    k = data.probs.shape[1]
    return (indicators(metric, data.predicted[labelled], one_hot(data.truth[labelled], k)),
            indicators(metric, data.predicted[labelled], data.probs[labelled]),
            indicators(metric, data.predicted[~labelled], data.probs[~labelled]))


def prediction_powered(metric: str, data: WindowData, level: float = 0.95) -> Estimate:
    n, big_n = int(data.labelled.sum()), int((~data.labelled).sum())
    if n == 0:
        return Estimate("prediction_powered", None, None, None, 0, big_n, {})
    y, yhat, yhat_unlabelled = _labelled_indicators(metric, data)
    value, low, high, lam = ppi_estimate(metric, y, yhat, yhat_unlabelled, level=level)
    return Estimate("prediction_powered", value, low, high, n, big_n, {"lambda": lam})


def labels_only(metric: str, data: WindowData, level: float = 0.95) -> Estimate:
    """lam = 0: the labelled answers alone, through the same interval machinery."""
    n, big_n = int(data.labelled.sum()), int((~data.labelled).sum())
    if n == 0:
        return Estimate("labels_only", None, None, None, 0, big_n, {})
    y, yhat, _ = _labelled_indicators(metric, data)
    value, low, high, _ = ppi_estimate(metric, y, yhat, np.zeros((0, y.shape[1])), level=level, lam=0.0)
    return Estimate("labels_only", value, low, high, n, big_n, {})


def estimate_all(metric: str, data: WindowData, level: float = 0.95) -> list[Estimate]:
    return [label_free(metric, data, level), prediction_powered(metric, data, level), labels_only(metric, data, level)]


# --- free-text answers: the mean of a predicted per-answer score ---------------------------------------------------


@dataclass(frozen=True)
class ScoreWindow:
    """A window of free-text answers: each one's predicted score (0-1), its true score where a reference has
    arrived (NaN where none has), and the predictor's cross-fitted residual spread."""

    predicted: np.ndarray  # (n,)
    truth: np.ndarray  # (n,) NaN = unlabelled
    residual_sd: float

    def __post_init__(self) -> None:
        if self.predicted.ndim != 1 or self.truth.shape != self.predicted.shape:
            raise EstimateError(f"window arrays disagree: predicted {self.predicted.shape}, truth {self.truth.shape}")
        if not np.all(np.isfinite(self.predicted)) or not self.residual_sd >= 0:
            raise EstimateError("predicted scores must be finite and the residual spread non-negative")

    @property
    def labelled(self) -> np.ndarray:
        return np.asarray(~np.isnan(self.truth))


def estimate_scores(metric: str, data: ScoreWindow, level: float = 0.95) -> list[Estimate]:
    """The three estimates of a mean per-answer score. Label-free: the mean prediction, with the interval the
    predictor's residual spread gives if it holds on these inputs (coefficient uncertainty left out). The other
    two: the same PPI++ and labels-only machinery as for accuracy, with the scores as the per-answer quantity."""
    if metric not in MEAN_METRICS:
        raise EstimateError(f"metric '{metric}' is not a mean of per-answer scores; choose from {MEAN_METRICS}")
    labelled = data.labelled
    n, n_labelled = data.predicted.shape[0], int(labelled.sum())
    estimates = []
    if n:
        value = float(data.predicted.mean())
        half = z_value(level) * data.residual_sd / n**0.5
        estimates.append(Estimate("label_free", value, max(value - half, 0.0), min(value + half, 1.0), n_labelled,
                                  n - n_labelled, {"residual_sd": data.residual_sd}))
    else:
        estimates.append(Estimate("label_free", None, None, None, 0, 0, {}))
    if n_labelled == 0:
        return estimates + [Estimate(m, None, None, None, 0, n, {}) for m in ("prediction_powered", "labels_only")]
    y, yhat = data.truth[labelled][:, None], data.predicted[labelled][:, None]
    unlabelled = data.predicted[~labelled][:, None]
    value, low, high, lam = ppi_estimate(metric, y, yhat, unlabelled, level=level)
    estimates.append(Estimate("prediction_powered", value, low, high, n_labelled, n - n_labelled, {"lambda": lam}))
    value, low, high, _ = ppi_estimate(metric, y, yhat, np.zeros((0, 1)), level=level, lam=0.0)
    estimates.append(Estimate("labels_only", value, low, high, n_labelled, n - n_labelled, {}))
    return estimates


# --- helpers for callers holding labels as strings ----------------------------------------------------------------


def window_from_labels(labels: Sequence[str], predicted: Sequence[str], probs: np.ndarray,
                       truth: Sequence[str | None]) -> WindowData:
    """Label strings to indices; a predicted or true label outside `labels` is an error, never dropped."""
    index = {label: i for i, label in enumerate(labels)}

    def lookup(value: str, what: str) -> int:
        if value not in index:
            raise EstimateError(f"{what} '{value}' is not one of the task's labels {list(labels)}")
        return index[value]

    return WindowData(predicted=np.array([lookup(p, "predicted label") for p in predicted], dtype=int),
                      probs=np.asarray(probs, dtype=float).reshape(len(predicted), len(labels)),
                      truth=np.array([-1 if t is None else lookup(t, "reference") for t in truth], dtype=int))

