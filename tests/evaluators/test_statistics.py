"""The statistics do what their names promise: nominal coverage, alpha-level false positives, real power."""

from __future__ import annotations

import numpy as np
import pytest

from tuneloop.evaluators.scoring import score_examples
from tuneloop.evaluators.statistics import (
    mcnemar,
    minimum_detectable_effect,
    paired_bootstrap,
    standard_error_floor,
    table_interval,
)


def _accuracy_table(correct):
    labels = ["yes", "no"]
    predictions = ["yes" if c else "no" for c in correct]
    return score_examples(["accuracy"], predictions, ["yes"] * len(correct), labels)["accuracy"]


def test_interval_coverage_is_close_to_nominal_on_data_with_a_known_mean():
    rng = np.random.default_rng(0)
    true_rate, trials, covered = 0.7, 200, 0
    for trial in range(trials):
        table = _accuracy_table(rng.random(150) < true_rate)
        interval, _ = table_interval(table, resamples=400, seed=trial)
        covered += interval.low <= true_rate <= interval.high
    assert 0.90 <= covered / trials <= 0.99


def test_paired_tests_keep_false_positives_near_alpha_on_identical_systems():
    rng = np.random.default_rng(1)
    trials, bootstrap_hits, mcnemar_hits = 300, 0, 0
    for trial in range(trials):
        a, b = rng.random(200) < 0.7, rng.random(200) < 0.7  # same quality, independent mistakes
        result = paired_bootstrap(_accuracy_table(a), _accuracy_table(b), resamples=400, seed=trial)
        bootstrap_hits += result.p_value < 0.05
        mcnemar_hits += mcnemar(a, b)[0] < 0.05
    assert bootstrap_hits / trials <= 0.09
    assert mcnemar_hits / trials <= 0.08


def test_paired_tests_detect_a_real_difference():
    rng = np.random.default_rng(2)
    a, b = rng.random(300) < 0.6, rng.random(300) < 0.8
    result = paired_bootstrap(_accuracy_table(a), _accuracy_table(b), resamples=1000)
    assert result.delta == pytest.approx(b.mean() - a.mean())
    assert result.low > 0 and result.p_value < 0.01
    assert mcnemar(a, b)[0] < 0.01


def test_identical_predictions_give_p_one_and_a_zero_interval():
    table = _accuracy_table(np.arange(50) % 3 == 0)
    result = paired_bootstrap(table, table, resamples=200)
    assert (result.delta, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert result.mde > 0
    assert mcnemar([1, 0, 1], [1, 0, 1]) == (1.0, 0, 0)


def test_results_are_reproducible_with_a_seed_and_differ_without():
    table = _accuracy_table(np.arange(80) % 4 != 0)
    first, _ = table_interval(table, resamples=300, seed=5)
    again, _ = table_interval(table, resamples=300, seed=5)
    other, _ = table_interval(table, resamples=300, seed=6)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)


def test_corpus_metric_intervals_bracket_the_corpus_value():
    predictions = [f"the answer is {i % 7}" for i in range(60)]
    references = [f"the answer is {i % 5}" for i in range(60)]
    interval, se = table_interval(score_examples(["bleu"], predictions, references)["bleu"], resamples=300)
    assert interval.low <= interval.value <= interval.high and se > 0


def test_mde_formula_and_interval_width_shrinking_with_n():
    assert minimum_detectable_effect(0.02) == pytest.approx(2.8016 * 0.02, rel=1e-3)
    small, _ = table_interval(_accuracy_table(np.arange(100) % 2 == 0), resamples=400)
    large, _ = table_interval(_accuracy_table(np.arange(400) % 2 == 0), resamples=400)
    assert large.high - large.low < 0.6 * (small.high - small.low)


@pytest.mark.parametrize("correct", [np.zeros(40, bool), np.ones(40, bool)], ids=["all-wrong", "all-right"])
def test_an_mde_is_never_zero_even_when_every_example_scores_the_same(correct):
    table = _accuracy_table(correct)
    interval, se = table_interval(table, resamples=200)
    assert interval.low == interval.high == interval.value, "the bootstrap itself sees no spread"
    assert se == pytest.approx(standard_error_floor(interval.value, 40)) and se > 0.02
    paired = paired_bootstrap(table, table, resamples=200)
    assert paired.delta == 0 and paired.mde == pytest.approx(minimum_detectable_effect(np.sqrt(2) * se))
    assert 0.05 < paired.mde < 0.2, "40 identical outcomes cannot detect a few points' difference"


def test_the_floor_shrinks_with_n_and_never_binds_a_spread_sample():
    assert standard_error_floor(0.0, 10) > standard_error_floor(0.0, 100) > standard_error_floor(0.0, 1000) > 0
    assert standard_error_floor(0.5, 100) == pytest.approx(0.05, rel=0.01)
    spread = _accuracy_table(np.arange(400) % 2 == 0)
    _, se = table_interval(spread, resamples=500)
    assert se > standard_error_floor(0.5, 400) * 0.8, "on a spread sample the bootstrap SE is the real one"
