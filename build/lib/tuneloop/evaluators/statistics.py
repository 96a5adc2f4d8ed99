"""Seeded, reproducible statistics: bootstrap intervals, paired comparisons, McNemar, minimum detectable effect.

Intervals are percentile bootstraps over examples. Metrics come as MetricTables (evaluators/scoring.py), so each
resample is a matrix product of resample counts with per-example statistics: corpus metrics (BLEU, chrF,
macro-F1) are recomputed at the corpus level on every resample, at the cost of one reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from tuneloop.evaluators.scoring import MetricTable

DEFAULT_SEED = 12345
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval; `level` says how confident, `n` over what."""

    value: float
    low: float
    high: float
    level: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.level:.0%} CI, n={self.n})"


def bootstrap_interval(items: Sequence[object], statistic: Callable[[list[int]], float], *, level: float = 0.95,
                       resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Interval:
    """Percentile bootstrap: `statistic` gets a list of row indices (with repeats) and returns the metric.

    Resampling indices rather than scores lets corpus-level metrics (BLEU, macro-F1) be recomputed on each
    resample instead of averaging per-example values that do not add up to the corpus score.
    """
    n = len(items)
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    value = statistic(list(range(n)))
    draws = np.array([statistic(list(rng.integers(0, n, n))) for _ in range(resamples)])
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(value=float(value), low=float(low), high=float(high), level=level, n=n)


# Vectorised bootstrap over MetricTables ------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedResult:
    """B minus A on the same examples: the difference, its interval, and a two-sided p-value."""

    metric: str
    a: float
    b: float
    delta: float
    low: float
    high: float
    p_value: float
    method: str
    level: float
    n: int
    mde: float
    paired_mde: float = float("nan")


def paired_standard_error_floor(n: int) -> float:
    """The smallest standard error a paired difference over n examples is given: that of one disagreement in
    n + 2 (add-one smoothed). Two systems that agree on every example of a small set still leave the difference
    uncertain by about this much, so a tiny set cannot claim a tiny detectable effect."""
    return math.sqrt(1.0 / ((n + 2) * n)) if n > 0 else 0.0


def resample_weights(n: int, resamples: int, seed: int, *, chunk_cells: int = 4_000_000) -> Iterator[np.ndarray]:
    """(chunk, n) arrays of how often each example is drawn; the same seed gives the same resamples, so every
    metric (and both systems of a paired comparison) sees identical resamples."""
    rng = np.random.default_rng(seed)
    chunk = max(1, chunk_cells // max(n, 1))
    probabilities = np.full(n, 1.0 / n)
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        yield rng.multinomial(n, probabilities, size=size).astype(float)
        done += size


def bootstrap_draws(table: MetricTable, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    if table.n == 0:
        raise ValueError(f"cannot bootstrap {table.name} over zero examples")
    return np.concatenate([table.from_weights(w) for w in resample_weights(table.n, resamples, seed)])


def standard_error_floor(value: float, n: int) -> float:
    """The smallest standard error a score in [0, 1] over n examples is given: the binomial SE at the add-one
    smoothed rate (k + 1) / (n + 2).

    A bootstrap SE is 0 when every example scores the same (all right, all wrong), which would claim that any
    difference is detectable; n examples that all agree still leave the rate uncertain by about this much.
    """
    if n <= 0:
        return 0.0
    rate = (min(max(value, 0.0), 1.0) * n + 1) / (n + 2)
    return math.sqrt(rate * (1 - rate) / n)


def table_interval(table: MetricTable, *, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED) -> tuple[Interval, float]:
    """The metric with its percentile-bootstrap interval, and its standard error (bootstrap, floored by
    `standard_error_floor`)."""
    draws = bootstrap_draws(table, resamples=resamples, seed=seed)
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    value = table.value()
    se = max(float(draws.std(ddof=1)), standard_error_floor(value, table.n))
    return Interval(value, float(low), float(high), level, table.n), se


def minimum_detectable_effect(standard_error: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided test at `alpha` detects with probability `power`, given the
    standard error of the difference: (z_{1-alpha/2} + z_power) * SE."""
    from scipy.stats import norm

    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * standard_error)


def paired_bootstrap(a: MetricTable, b: MetricTable, *, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED) -> PairedResult:
    """Paired bootstrap of B - A: both systems resampled with the same example weights.

    The p-value is the null-centred bootstrap one, (1 + #{|d* - d| >= |d|}) / (R + 1): how often a resample
    strays from the observed difference by as much as the difference strays from zero. The MDE uses the
    unpaired standard error sqrt(SE_a^2 + SE_b^2), an upper bound for the paired design that stays meaningful
    when both systems answer identically, each SE floored by `standard_error_floor`.
    """
    if a.n != b.n:
        raise ValueError(f"paired comparison needs the same examples: {a.n} vs {b.n}")
    if a.n == 0:
        raise ValueError("cannot compare over zero examples")
    deltas, draws_a, draws_b = [], [], []
    for weights in resample_weights(a.n, resamples, seed):
        score_a, score_b = a.from_weights(weights), b.from_weights(weights)
        deltas.append(score_b - score_a)
        draws_a.append(score_a)
        draws_b.append(score_b)
    delta_draws = np.concatenate(deltas)
    value_a, value_b = a.value(), b.value()
    delta = value_b - value_a
    alpha = (1 - level) / 2
    low, high = np.quantile(delta_draws, [alpha, 1 - alpha])
    p_value = (1 + np.sum(np.abs(delta_draws - delta) >= abs(delta) - 1e-12)) / (len(delta_draws) + 1)
    se_a = max(float(np.concatenate(draws_a).std(ddof=1)), standard_error_floor(value_a, a.n))
    se_b = max(float(np.concatenate(draws_b).std(ddof=1)), standard_error_floor(value_b, b.n))
    se = float(np.hypot(se_a, se_b))
    se_paired = max(float(delta_draws.std(ddof=1)), paired_standard_error_floor(a.n))
    return PairedResult(a.name, value_a, value_b, delta, float(low), float(high), float(min(1.0, p_value)),
                        "paired bootstrap", level, a.n, minimum_detectable_effect(se, alpha=1 - level),
                        minimum_detectable_effect(se_paired, alpha=1 - level))


def mcnemar(correct_a: Sequence[float] | np.ndarray, correct_b: Sequence[float] | np.ndarray) -> tuple[float, int, int]:
    """Exact McNemar test on paired right/wrong outcomes: (two-sided p, A-only right, B-only right)."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a) > 0.5
    b = np.asarray(correct_b) > 0.5
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs paired outcomes: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 1.0, 0, 0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue), only_a, only_b
