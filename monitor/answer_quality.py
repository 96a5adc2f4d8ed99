"""A free-text answer's chrF predicted from signals that need no label: the generation tasks' per-answer quality
signal, the counterpart of the calibrated label probabilities of monitor/answer_calibration.py.

Features, all available when the answer is served:

- the mean and the lowest log-probability of the answer's sampled tokens (captured by the gateway,
  serving/quality_signal.py);
- the answer's length in tokens and the prompt's length in characters (log scale);
- the prompt's novelty: its cosine distance to the 5 nearest training prompts, the drift view `embedding_novelty`
  per text (monitor/views.py).

The model is a ridge regression on standardised features, fitted on the held-out set, with predictions clipped to
[0, 1]. Why linear: a few hundred held-out answers do not support more, and the coefficients can be read. How well
it ranks answers is measured, not assumed: the Spearman correlation between predicted and true chrF is cross-fitted
(fit on one half of the held-out set, ranked on the other, and the other way round), and so is the residual spread
the label-free interval uses. On the embedded chat task the more confident answers score *lower* chrF (generic,
repetitive replies are the model's most likely ones), so the sign is learnt, not assumed.

chrF here is sentence chrF (sacrebleu's `sentence_chrf`, on a 0-1 scale) averaged over answers, not the corpus chrF
of a scheduled eval: an estimate is a mean of per-answer quantities. The two differ by a roughly constant amount
on the same answers (bench/results/estimate.md reports both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tuneloop.errors import EstimationError

FEATURES = ("mean_logprob", "min_logprob", "log_tokens", "log_prompt_chars", "novelty")
GENERATION_METRICS = ("chrf",)
RIDGE = 1.0
MIN_EXAMPLES = 20


class QualityModelError(EstimationError):
    """The held-out answers cannot fit a predictor (too few, or features without spread)."""


def answer_features(token_signals: np.ndarray, prompts: Sequence[str], novelty: np.ndarray) -> np.ndarray:
    """(n, 5) in FEATURES order from (n, 3) captured token signals (mean log-prob, lowest log-prob, tokens),
    the prompts and their novelty scores."""
    if token_signals.ndim != 2 or token_signals.shape[1] != 3 or len(prompts) != token_signals.shape[0] \
            or novelty.shape != (token_signals.shape[0],):
        raise QualityModelError(f"feature inputs disagree: signals {token_signals.shape}, {len(prompts)} prompts, "
                                f"novelty {novelty.shape}")
    return np.column_stack([token_signals[:, 0], token_signals[:, 1], np.log1p(token_signals[:, 2]),
                            np.log1p([len(p) for p in prompts]), novelty]).astype(float)


def sentence_scores(metric: str, answers: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Each answer's own score against its reference, 0-1."""
    if metric != "chrf":
        raise QualityModelError(f"metric '{metric}' has no per-answer predictor; choose from {GENERATION_METRICS}")
    import sacrebleu

    chrf = sacrebleu.CHRF()
    return np.array([chrf.sentence_score(answer, [reference]).score / 100
                     for answer, reference in zip(answers, references, strict=True)], dtype=float)


@dataclass(frozen=True)
class AnswerQualityModel:
    metric: str
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    residual_sd: float  # cross-fitted: the spread of true minus predicted on answers the fit did not see
    spearman: float  # cross-fitted rank correlation between predicted and true per-answer scores
    n: int
    method: str = "ridge"

    def predict(self, features: np.ndarray) -> np.ndarray:
        scaled = (features - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.asarray(np.clip(self.intercept + scaled @ np.asarray(self.coef), 0.0, 1.0))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnswerQualityModel:
        try:
            return cls(**data)
        except TypeError as exc:
            raise QualityModelError(f"stored answer-quality model is not one this version reads: {exc}") from None


def _ridge(features: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature gets coefficient 0 below
    x = (features - mean) / scale
    intercept = float(scores.mean())
    coef = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ (scores - intercept))
    return mean, scale, coef, intercept


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def fit_quality_model(features: np.ndarray, scores: np.ndarray, *, metric: str = "chrf",
                      seed: int = 0) -> AnswerQualityModel:
    """Fit on all held-out answers; rank correlation and residual spread cross-fitted over two halves."""
    n = features.shape[0]
    if n < MIN_EXAMPLES:
        raise QualityModelError(f"{n} held-out answers with a signal; the predictor needs at least {MIN_EXAMPLES}")
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2:])
    predicted = np.empty(n)
    for fit_rows, test_rows in (halves, halves[::-1]):
        mean, scale, coef, intercept = _ridge(features[fit_rows], scores[fit_rows])
        predicted[test_rows] = np.clip(intercept + ((features[test_rows] - mean) / scale) @ coef, 0.0, 1.0)
    residual_sd = float(np.std(scores - predicted, ddof=1))
    mean, scale, coef, intercept = _ridge(features, scores)
    return AnswerQualityModel(metric=metric, mean=mean.tolist(), scale=scale.tolist(), coef=coef.tolist(),
                              intercept=intercept, residual_sd=residual_sd, spearman=spearman(predicted, scores),
                              n=n)
