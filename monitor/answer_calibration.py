"""Calibrating a served classifier's label probabilities, so "0.9 sure" means right nine times in ten.

The raw signal is the model's probability of each label for an answer (serving/quality_signal.py). A small LM's
raw probabilities are rarely calibrated, and the label-free estimate is only as good as its calibration, so each
(task, adapter version) gets a calibrator fitted on the held-out set, chosen between:

- temperature scaling (one parameter, keeps the ranking, calibrates the whole distribution), and
- isotonic regression of the served answer's probability against "answer correct" (monotone, more flexible; the
  other labels share what is left in their old proportions),

by expected calibration error (ECE, 10 equal-width bins) on the half of the held-out set each was not fitted on
(two folds). The identity (no calibration) competes too and wins when neither helps: temperature scaling
minimises the log-likelihood, which a model that never answers one label can only improve by flattening every
answer, and isotonic regression overfits a few hundred answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar

from tuneloop.errors import EstimationError

CalibrationMethod = Literal["identity", "temperature", "isotonic"]
ECE_BINS = 10
MIN_CALIBRATION_EXAMPLES = 20


class CalibrationError(EstimationError):
    """Too few or unusable examples to fit a calibrator."""


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins (share of answers in the bin) × |mean confidence − accuracy| over equal-width confidence bins."""
    if confidence.shape[0] == 0:
        raise CalibrationError("no answers to measure calibration on")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(float(confidence[members].mean()) - float(correct[members].mean()))
    return total


def _normalise(logprobs: np.ndarray) -> np.ndarray:
    shifted = logprobs - logprobs.max(axis=1, keepdims=True)
    weights = np.exp(shifted)
    return np.asarray(weights / weights.sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Calibrator:
    """Maps an answer's raw label log-probabilities to calibrated label probabilities."""

    method: CalibrationMethod
    temperature: float = 1.0
    knots_x: tuple[float, ...] = ()
    knots_y: tuple[float, ...] = ()
    ece: dict[str, float] = field(default_factory=dict)  # cross-fitted ECE of each candidate, identity included
    n: int = 0

    def apply(self, logprobs: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        if self.method == "temperature":
            return _normalise(logprobs / self.temperature)
        probs = _normalise(logprobs)
        if self.method == "identity":
            return probs
        rows = np.arange(probs.shape[0])
        old = probs[rows, predicted]
        new = np.interp(old, np.asarray(self.knots_x), np.asarray(self.knots_y))
        rest = 1.0 - old
        k = probs.shape[1]
        scale = np.divide(1.0 - new, rest, out=np.zeros_like(rest), where=rest > 1e-12)
        out = probs * scale[:, None]
        spread = rest <= 1e-12  # the answer had all the mass: share what isotonic takes away evenly
        out[spread] = ((1.0 - new[spread]) / max(k - 1, 1))[:, None]
        out[rows, predicted] = new
        return np.asarray(out)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "temperature": self.temperature, "knots_x": list(self.knots_x),
                "knots_y": list(self.knots_y), "ece": dict(self.ece), "n": self.n}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibrator:
        return cls(method=data["method"], temperature=float(data["temperature"]),
                   knots_x=tuple(float(x) for x in data["knots_x"]), knots_y=tuple(float(y) for y in data["knots_y"]),
                   ece={str(k): float(v) for k, v in data["ece"].items()}, n=int(data["n"]))


def fit_temperature(logprobs: np.ndarray, truth: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of the true labels."""
    rows = np.arange(truth.shape[0])

    def nll(log_t: float) -> float:
        scaled = logprobs / np.exp(log_t)
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        return float(-(shifted[rows, truth] - log_norm).mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(50.0)), method="bounded")
    return float(np.exp(result.x))


def fit_isotonic(confidence: np.ndarray, correct: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(confidence, correct.astype(float))
    return tuple(float(x) for x in model.X_thresholds_), tuple(float(y) for y in model.y_thresholds_)


def _fit(method: CalibrationMethod, logprobs: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> Calibrator:
    if method == "temperature":
        return Calibrator("temperature", temperature=fit_temperature(logprobs, truth))
    if method == "isotonic":
        confidence = _normalise(logprobs)[np.arange(truth.shape[0]), predicted]
        xs, ys = fit_isotonic(confidence, predicted == truth)
        return Calibrator("isotonic", knots_x=xs, knots_y=ys)
    return Calibrator("identity")


def answer_ece(calibrator: Calibrator, logprobs: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> float:
    probs = calibrator.apply(logprobs, predicted)
    return expected_calibration_error(probs[np.arange(truth.shape[0]), predicted], predicted == truth)


def choose_calibrator(logprobs: np.ndarray, predicted: np.ndarray, truth: np.ndarray, *, seed: int = 0) -> Calibrator:
    """Fit temperature and isotonic calibrators on two folds each and keep whichever of them and the identity has
    the lowest held-out ECE, refitted on everything. The identity can win: the embedded base model's raw label
    probabilities were better calibrated on unseen airline tweets than either fitted calibrator (bench estimate)."""
    n = truth.shape[0]
    if n < MIN_CALIBRATION_EXAMPLES:
        raise CalibrationError(f"{n} labelled answers; calibration needs at least {MIN_CALIBRATION_EXAMPLES}")
    order = np.random.default_rng(seed).permutation(n)
    folds = (order[: n // 2], order[n // 2:])
    ece: dict[str, float] = {}
    candidates: tuple[CalibrationMethod, ...] = ("identity", "temperature", "isotonic")
    for method in candidates:
        errors = []
        for fit_on, test_on in (folds, folds[::-1]):
            calibrator = _fit(method, logprobs[fit_on], predicted[fit_on], truth[fit_on])
            errors.append(answer_ece(calibrator, logprobs[test_on], predicted[test_on], truth[test_on]))
        ece[method] = float(np.mean(errors))
    best = min(candidates, key=lambda method: ece[method])  # identity too: a calibrator that does not help is not used
    chosen = _fit(best, logprobs, predicted, truth)
    return Calibrator(chosen.method, chosen.temperature, chosen.knots_x, chosen.knots_y, ece=ece, n=n)
