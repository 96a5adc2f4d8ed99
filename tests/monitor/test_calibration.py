"""Calibration arithmetic and storage, without models: thresholds from null scores, the window grid, and which
stored calibrations may be reused."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.monitor.calibration import (
    Calibration,
    calibration_size,
    load_calibrations,
    save_calibrations,
    spread_factor,
    threshold_from_null,
)
from tuneloop.store import Store


def test_skewed_nulls_get_a_higher_threshold_than_a_normal_fit() -> None:
    rng = np.random.default_rng(0)
    symmetric = rng.normal(0.5, 0.01, 5000)
    skewed = 0.5 + rng.gamma(2.0, 0.007, 5000)  # right-skewed, like the AUC of a small window
    skewed = skewed - skewed.mean() + 0.5
    t_sym, _, _ = threshold_from_null(symmetric, 0.0125)
    t_skew, mean, sd = threshold_from_null(skewed, 0.0125)
    assert t_sym == pytest.approx(0.5 + 2.24 * 0.01, abs=0.002)
    assert t_skew > mean + 2.24 * sd  # Cornish-Fisher moved it out
    assert np.mean(skewed > t_skew) <= 0.0125 + 0.005  # and it holds the tail rate the plain fit would exceed
    assert np.mean(skewed > mean + 2.24 * sd) > 0.0125


def test_window_grid_and_spread() -> None:
    assert calibration_size(347, 3000) == 340 and calibration_size(1234, 100_000) == 1200
    assert calibration_size(5000, 3000) == 750  # at most a quarter of the pool: conservative for larger windows
    assert calibration_size(80, 3000) == 80
    assert spread_factor(100, 1500) == pytest.approx(np.sqrt((1 + 1 / 15) / (1 - 1 / 15)))


def test_stored_calibrations_are_reused_only_for_the_same_method_and_windows(store: Store) -> None:
    calibration = Calibration("descriptors", 200, 0.0125, 0.12, 0.08, 0.01, 0.005, 200)
    save_calibrations(store, "sentiment", "ref", 0.0125, [calibration])
    assert load_calibrations(store, "sentiment", "ref", 200, 0.0125, 200) == {"descriptors": calibration}
    assert load_calibrations(store, "sentiment", "ref", 200, 0.0125, 100) == {}  # other number of windows
    assert load_calibrations(store, "sentiment", "other-ref", 200, 0.0125, 200) == {}
    assert load_calibrations(store, "sentiment", "ref", 300, 0.0125, 200) == {}
    newer = Calibration("descriptors", 200, 0.0125, 0.13, 0.08, 0.01, 0.0, 100)
    save_calibrations(store, "sentiment", "ref", 0.0125, [newer])  # replaces, no unique-constraint error
    assert load_calibrations(store, "sentiment", "ref", 200, 0.0125, 100) == {"descriptors": newer}
