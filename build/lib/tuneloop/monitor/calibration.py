"""Thresholds from no-drift windows, not library defaults.

A view's threshold for a window size W is set on windows of W distinct training inputs drawn from one half (M
texts) of the calibration pool, which is disjoint from the reference; its false-alarm rate is then *measured* on
as many windows from the other half, so the number reported is out of sample. Windows are drawn without
replacement: a window with repeated texts fools the domain classifier (a repeat lands on both sides of its
train/test split), which inflated its null AUC and thresholds when we sampled with replacement.

Two corrections make the threshold fit live traffic rather than the half it was fit on: windows drawn from M
texts vary less than live windows (finite-population factor 1 - W/M), and the half's own mean is only an estimate
of the population's (variance sigma^2/M). The normal-fit sd is scaled by sqrt((1 + W/M) / (1 - W/M)), and
threshold = max(mean + z * sd, empirical (1 - alpha) quantile), where z = z(1 - alpha) is raised by the
Cornish-Fisher term of the null's skewness. Windows larger than a quarter of the pool are calibrated at that size,
whose threshold is conservative for larger windows (their statistic varies less).

The task's verdict flags when any view crosses its threshold; with alpha = false_alarm_rate / number of views
(Bonferroni) the task's false-alarm rate stays within budget, and the measured rate of "any view flagged" is
stored too (view `any`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, skew
from sqlalchemy import select
from tqdm import tqdm

from tuneloop.monitor.views import InputView, TextFeatures
from tuneloop.store import Store
from tuneloop.tables import DriftCalibrationRow

ANY_VIEW = "any"
# Bumped whenever the way thresholds are computed changes, so stored calibrations of an older method are not reused.
CALIBRATION_VERSION = 3


@dataclass(frozen=True)
class Calibration:
    view: str
    window: int
    alpha: float
    threshold: float
    null_mean: float
    null_sd: float
    false_alarm_rate: float
    n_windows: int


def calibration_size(n: int, pool_size: int) -> int:
    """Window sizes are calibrated on a grid (n rounded down to two significant digits) and at most at a quarter of
    the pool (half of one half): a smaller window has a wider null distribution, so its threshold is conservative
    for n, and a time-window check whose n varies reuses stored calibrations."""
    if n >= 100:
        scale = 10 ** (len(str(n)) - 2)
        n = (n // scale) * scale
    return max(2, min(n, pool_size // 4))


def spread_factor(window: int, half: int) -> float:
    """How much wider live windows vary than windows drawn from `half` texts, see the module docstring."""
    ratio = window / half
    return math.sqrt((1 + ratio) / (1 - ratio))


def threshold_from_null(scores: np.ndarray, alpha: float, *, spread: float = 1.0) -> tuple[float, float, float]:
    """(threshold, null mean, null sd): the (1 - alpha) quantile of a normal fit, moved by the Cornish-Fisher term
    for the null's skewness, and never below the empirical quantile.

    The domain classifier's AUC and the descriptors' KS maximum are right-skewed on small windows (skewness ~0.7
    at W = 100 here); a plain normal fit put their false-alarm rates at about twice alpha on held-back windows.
    """
    mean, sd = float(np.mean(scores)), float(np.std(scores, ddof=1))
    z = float(norm.ppf(1 - alpha))
    skewness = float(skew(scores)) if sd > 0 else 0.0
    z_skewed = z + (z * z - 1) * skewness / 6
    fitted = mean + max(z, z_skewed) * sd * spread
    return max(fitted, float(np.quantile(scores, 1 - alpha))), mean, sd


def calibrate_views(views: Sequence[InputView], pool: TextFeatures, window: int, alpha: float, n_windows: int,
                    seed: int, *, progress: bool = False) -> list[Calibration]:
    """Per-view calibrations at this window size, plus the measured rate of any view flagging (view `any`)."""
    if window * 2 > len(pool):
        raise ValueError(f"a calibration window of {window} needs a pool of at least {2 * window} texts")
    rng = np.random.default_rng(seed + window)
    order = rng.permutation(len(pool))
    fit_half, check_half = order[: len(order) // 2], order[len(order) // 2:]
    fit_scores = np.zeros((len(views), n_windows))
    check_scores = np.zeros((len(views), n_windows))
    bar = tqdm(total=2 * n_windows, desc=f"calibrate W={window}", unit="window", disable=not progress)
    for half, out in ((fit_half, fit_scores), (check_half, check_scores)):
        for j in range(n_windows):
            sample = pool.take(rng.choice(half, size=window, replace=False))
            for i, view in enumerate(views):
                out[i, j] = view.score(sample)[0]
            bar.update(1)
    bar.close()
    calibrations = []
    flagged = np.zeros(n_windows, dtype=bool)
    for i, view in enumerate(views):
        threshold, mean, sd = threshold_from_null(fit_scores[i], alpha,
                                                  spread=spread_factor(window, len(fit_half)))
        over = check_scores[i] > threshold
        flagged |= over
        calibrations.append(Calibration(view.name, window, alpha, threshold, mean, sd, float(over.mean()), n_windows))
    calibrations.append(Calibration(ANY_VIEW, window, alpha, float("nan"), float("nan"), float("nan"),
                                    float(flagged.mean()), n_windows))
    return calibrations


def calibration_key(reference_key: str) -> str:
    """What a stored calibration is valid for: this reference sample and this calibration method."""
    return f"{reference_key}:v{CALIBRATION_VERSION}"


def load_calibrations(store: Store, task: str, reference_key: str, window: int, alpha: float,
                      n_windows: int) -> dict[str, Calibration]:
    """Stored calibrations for this reference, method, window size, alpha and number of windows."""
    with store.session() as session:
        rows = session.scalars(select(DriftCalibrationRow).where(
            DriftCalibrationRow.task == task, DriftCalibrationRow.reference_key == calibration_key(reference_key),
            DriftCalibrationRow.window == window, DriftCalibrationRow.alpha == alpha,
            DriftCalibrationRow.n_windows == n_windows)).all()
        return {r.view: Calibration(r.view, r.window, r.alpha, r.threshold, r.null_mean, r.null_sd,
                                    r.false_alarm_rate, r.n_windows) for r in rows}


def save_calibrations(store: Store, task: str, reference_key: str, alpha: float,
                      calibrations: Sequence[Calibration]) -> None:
    """Insert, replacing an older calibration of the same view (a rerun after a config change)."""
    with store.session() as session:
        for c in calibrations:
            old = session.scalars(select(DriftCalibrationRow).where(
                DriftCalibrationRow.task == task, DriftCalibrationRow.reference_key == calibration_key(reference_key),
                DriftCalibrationRow.view == c.view, DriftCalibrationRow.window == c.window,
                DriftCalibrationRow.alpha == alpha)).first()
            if old is not None:
                session.delete(old)
                session.flush()
            session.add(DriftCalibrationRow(task=task, reference_key=calibration_key(reference_key), view=c.view,
                                            window=c.window,
                                            alpha=alpha, threshold=_finite(c.threshold), null_mean=_finite(c.null_mean),
                                            null_sd=_finite(c.null_sd), false_alarm_rate=c.false_alarm_rate,
                                            n_windows=c.n_windows))


def _finite(value: float) -> float:
    return value if np.isfinite(value) else -1.0
