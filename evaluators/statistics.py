"""Seeded, reproducible statistics: bootstrap confidence intervals for any per-example or corpus metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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
