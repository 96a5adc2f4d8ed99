"""The three window estimates: agreement with ppi-python, interval coverage on simulated windows, the
prediction-powered interval never wider than labels alone, and calibration that measurably helps."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tuneloop.monitor.answer_calibration import (
    CalibrationError,
    Calibrator,
    answer_ece,
    choose_calibrator,
    expected_calibration_error,
)
from tuneloop.monitor.estimators import (
    EstimateError,
    ScoreWindow,
    WindowData,
    estimate_all,
    estimate_scores,
    indicators,
    label_free,
    labels_only,
    metric_of_means,
    one_hot,
    ppi_estimate,
    prediction_powered,
    window_from_labels,
)


def _binary(seed: int, n: int = 40, big_n: int = 160, *, spread: float = 4.0,
            noise: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled outcomes, their signal and unlabelled signals; a small `spread` makes each answer's chance of being
    right close to 0 or 1, so the signal explains most of the outcome."""
    rng = np.random.default_rng(seed)
    truth_p = rng.beta(spread, spread / 2, size=n + big_n)
    signal = np.clip(truth_p + rng.normal(0, noise, size=n + big_n), 0, 1)
    y = (rng.random(n) < truth_p[:n]).astype(float)
    return y[:, None], signal[:n, None], signal[n:, None]


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_prediction_powered_equals_ppi_python_at_equal_lambda(lam: float) -> None:
    ppi_py = pytest.importorskip("ppi_py")
    y, yhat, unlabelled = _binary(3)
    value, low, high, used = ppi_estimate("accuracy", y, yhat, unlabelled, level=0.95, lam=lam)
    ref_low, ref_high = ppi_py.ppi_mean_ci(y[:, 0], yhat[:, 0], unlabelled[:, 0], alpha=0.05, lam=lam)
    ref_value = ppi_py.ppi_mean_pointestimate(y[:, 0], yhat[:, 0], unlabelled[:, 0], lam=lam)
    assert used == lam
    assert value == pytest.approx(float(np.squeeze(ref_value)), abs=1e-12)
    assert low == pytest.approx(float(np.squeeze(ref_low)), abs=1e-9)
    assert high == pytest.approx(float(np.squeeze(ref_high)), abs=1e-9)


def test_power_tuning_is_never_wider_than_labels_only_or_ppi_pythons_lambda() -> None:
    ppi_py = pytest.importorskip("ppi_py")
    for seed in range(60):
        y, yhat, unlabelled = _binary(seed, n=25)
        _, low, high, lam = ppi_estimate("accuracy", y, yhat, unlabelled, level=0.95)
        _, classic_low, classic_high, _ = ppi_estimate("accuracy", y, yhat, unlabelled, level=0.95, lam=0.0)
        ref_low, ref_high = ppi_py.ppi_mean_ci(y[:, 0], yhat[:, 0], unlabelled[:, 0], alpha=0.05)
        assert 0.0 <= lam <= 1.0
        assert high - low <= classic_high - classic_low + 1e-12
        assert high - low <= float(np.squeeze(ref_high - ref_low)) + 1e-12
    # And the tuning matters: a signal that explains most outcomes makes the interval clearly narrower.
    y, yhat, unlabelled = _binary(1, n=40, spread=0.3, noise=0.05)
    _, low, high, _ = ppi_estimate("accuracy", y, yhat, unlabelled, level=0.95)
    _, classic_low, classic_high, _ = ppi_estimate("accuracy", y, yhat, unlabelled, level=0.95, lam=0.0)
    assert high - low < 0.9 * (classic_high - classic_low)


def _draw(rng: np.random.Generator, dist: np.ndarray) -> np.ndarray:
    """One label per row of a (n, k) distribution."""
    return np.minimum((rng.random((dist.shape[0], 1)) > np.cumsum(dist, axis=1)).sum(axis=1), dist.shape[1] - 1)


def _simulated_window(rng: np.random.Generator, *, n: int, labelled: int, k: int = 3,
                      overconfidence: float = 1.0) -> tuple[WindowData, np.ndarray]:
    """Answers whose true label distribution is known; the signal is that distribution sharpened by
    `overconfidence` (1 = perfectly calibrated). Returns the window and every answer's true label."""
    logits = rng.normal(0, 1.5, size=(n, k))
    true_dist = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = _draw(rng, true_dist)
    signal = np.exp(overconfidence * logits)
    signal /= signal.sum(axis=1, keepdims=True)
    predicted = signal.argmax(axis=1)
    seen = np.full(n, -1)
    chosen = rng.choice(n, size=labelled, replace=False)
    seen[chosen] = truth[chosen]
    return WindowData(predicted=predicted, probs=signal, truth=seen), truth


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_prediction_powered_interval_covers_the_window_truth_at_the_nominal_rate(metric: str) -> None:
    """Miscalibrated signal (overconfident), 50 labels in a window of 200: the prediction-powered interval still
    covers the window's true metric about 95 % of the time; the label-free one, trusting the miscalibrated
    signal, does not."""
    rng = np.random.default_rng(7)
    windows = 400
    covered = {"prediction_powered": 0, "label_free": 0}
    for _ in range(windows):
        data, truth = _simulated_window(rng, n=200, labelled=50, overconfidence=3.0)
        true_value = metric_of_means(metric, indicators(metric, data.predicted, one_hot(truth, 3)).mean(axis=0))
        for estimate in (prediction_powered(metric, data), label_free(metric, data)):
            assert estimate.ci_lower is not None and estimate.ci_upper is not None
            covered[estimate.method] += estimate.ci_lower <= true_value <= estimate.ci_upper
    assert covered["prediction_powered"] / windows >= 0.92
    assert covered["label_free"] / windows < 0.5


def test_label_free_is_right_when_the_signal_is_calibrated() -> None:
    rng = np.random.default_rng(11)
    errors, covered = [], 0
    for _ in range(150):
        data, truth = _simulated_window(rng, n=200, labelled=0)
        true_value = float((data.predicted == truth).mean())
        estimate = label_free("accuracy", data)
        assert estimate.value is not None and estimate.ci_lower is not None and estimate.ci_upper is not None
        errors.append(abs(estimate.value - true_value))
        covered += estimate.ci_lower <= true_value <= estimate.ci_upper
    assert np.mean(errors) < 0.04
    assert covered / 150 >= 0.9


def test_macro_f1_of_one_hot_indicators_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    truth, predicted = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    ours = metric_of_means("macro_f1", indicators("macro_f1", predicted, one_hot(truth, 3)).mean(axis=0))
    assert ours == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_without_labels_only_the_label_free_estimate_has_a_value() -> None:
    data, _ = _simulated_window(np.random.default_rng(0), n=50, labelled=0)
    by_method = {e.method: e for e in estimate_all("accuracy", data)}
    assert by_method["label_free"].value is not None
    assert by_method["prediction_powered"].value is None and by_method["labels_only"].value is None
    assert by_method["labels_only"].n_labelled == 0 and by_method["labels_only"].n_unlabelled == 50


def test_labels_only_is_the_plain_mean_with_a_wald_interval() -> None:
    data = window_from_labels(["a", "b"], ["a", "a", "b", "b"], np.full((4, 2), 0.5), ["a", "b", "b", None])
    estimate = labels_only("accuracy", data)
    assert estimate.value == pytest.approx(2 / 3)
    half = 1.959964 * (2 / 9) ** 0.5 / 3**0.5
    assert estimate.ci_lower == pytest.approx(2 / 3 - half, abs=1e-5)
    assert (estimate.n_labelled, estimate.n_unlabelled) == (3, 1)


def test_bad_windows_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(EstimateError, match="not one of the task's labels"):
        window_from_labels(["a", "b"], ["a", "c"], np.full((2, 2), 0.5), [None, None])
    with pytest.raises(EstimateError, match="sum to 1"):
        WindowData(predicted=np.array([0]), probs=np.array([[0.7, 0.7]]), truth=np.array([-1]))
    with pytest.raises(EstimateError, match="disagree"):
        WindowData(predicted=np.array([0, 1]), probs=np.array([[0.5, 0.5]]), truth=np.array([-1, -1]))
    with pytest.raises(EstimateError, match="no estimator"):
        indicators("bleu", np.array([0]), np.array([[1.0, 0.0]]))


def _overconfident(rng: np.random.Generator, n: int, sharpen: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = rng.normal(0, 1.0, size=(n, 3))
    true_dist = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = _draw(rng, true_dist)
    raw = sharpen * logits
    raw_logprobs = raw - np.log(np.exp(raw).sum(axis=1, keepdims=True))
    return raw_logprobs, raw_logprobs.argmax(axis=1), truth


def test_calibration_reduces_the_calibration_error_of_an_overconfident_model_on_unseen_answers() -> None:
    rng = np.random.default_rng(5)
    logprobs, predicted, truth = _overconfident(rng, 600, sharpen=3.0)
    calibrator = choose_calibrator(logprobs, predicted, truth)
    assert calibrator.method in ("temperature", "isotonic")
    assert calibrator.ece[calibrator.method] < 0.5 * calibrator.ece["identity"]
    test_logprobs, test_predicted, test_truth = _overconfident(rng, 2000, sharpen=3.0)
    before = answer_ece(Calibrator("identity"), test_logprobs, test_predicted, test_truth)
    after = answer_ece(calibrator, test_logprobs, test_predicted, test_truth)
    assert after < 0.5 * before
    if calibrator.method == "temperature":
        assert calibrator.temperature == pytest.approx(3.0, rel=0.25)
    restored = Calibrator.from_json(calibrator.to_json())
    assert np.allclose(restored.apply(test_logprobs, test_predicted), calibrator.apply(test_logprobs, test_predicted))


def test_isotonic_keeps_distributions_and_too_few_answers_are_refused() -> None:
    rng = np.random.default_rng(9)
    logprobs, predicted, truth = _overconfident(rng, 300, sharpen=2.0)
    iso = Calibrator("isotonic", knots_x=(0.0, 1.0), knots_y=(0.2, 0.6))
    probs = iso.apply(logprobs, predicted)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.all(probs >= 0)
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 0])) == pytest.approx(0.4)
    with pytest.raises(CalibrationError, match="at least"):
        choose_calibrator(logprobs[:5], predicted[:5], truth[:5])


def _scores(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-answer predicted and true scores in [0, 1]; `shift` moves the truth away from what was predicted (the
    predictor stopped holding), which the prediction-powered interval must survive."""
    predicted = np.clip(rng.beta(2, 8, n) + 0.05, 0, 1)
    truth = np.clip(predicted - shift + rng.normal(0, 0.08, n), 0, 1)
    return predicted, truth


def test_mean_score_estimates_cover_at_the_nominal_rate_and_match_ppi_python() -> None:
    """Free-text answers (chrF): prediction-powered covers the window's true mean score at about 95 % even when
    the predictor is off by 0.05; label-free covers only while the predictor holds."""
    ppi_py = pytest.importorskip("ppi_py")
    rng = np.random.default_rng(4)
    covered = {("prediction_powered", 0.0): 0, ("prediction_powered", 0.05): 0, ("label_free", 0.0): 0,
               ("label_free", 0.05): 0}
    runs = 400
    for run in range(runs):
        for shift in (0.0, 0.05):
            predicted, truth = _scores(rng, 200, shift)
            seen = np.full(200, np.nan)
            chosen = rng.choice(200, 40, replace=False)
            seen[chosen] = truth[chosen]
            estimates = {e.method: e for e in estimate_scores("chrf", ScoreWindow(predicted, seen, 0.08))}
            for method in ("prediction_powered", "label_free"):
                e = estimates[method]
                covered[(method, shift)] += e.ci_lower <= truth.mean() <= e.ci_upper
            if run == 0:
                ppi = estimates["prediction_powered"]
                lam = ppi.detail["lambda"]
                unlabelled = np.delete(predicted, chosen)
                ref_low, ref_high = ppi_py.ppi_mean_ci(truth[chosen], predicted[chosen], unlabelled, alpha=0.05,
                                                       lam=lam)
                assert ppi.ci_lower == pytest.approx(float(np.squeeze(ref_low)), abs=1e-9)
                assert ppi.ci_upper == pytest.approx(float(np.squeeze(ref_high)), abs=1e-9)
                assert ppi.width <= estimates["labels_only"].width + 1e-12  # type: ignore[operator]
    assert covered[("prediction_powered", 0.0)] / runs >= 0.92
    assert covered[("prediction_powered", 0.05)] / runs >= 0.92, "valid whatever the predictor's quality"
    assert covered[("label_free", 0.0)] / runs >= 0.92
    assert covered[("label_free", 0.05)] / runs < 0.5, "label-free trusts the predictor: a shifted truth escapes it"


def test_mean_score_windows_without_labels_or_with_bad_shapes() -> None:
    only = {e.method: e for e in estimate_scores("chrf", ScoreWindow(np.array([0.2, 0.4]), np.full(2, np.nan), 0.1))}
    assert only["label_free"].value == pytest.approx(0.3) and only["prediction_powered"].value is None
    with pytest.raises(EstimateError, match="disagree"):
        ScoreWindow(np.zeros(3), np.zeros(2), 0.1)
    with pytest.raises(EstimateError, match="not a mean of per-answer scores"):
        estimate_scores("macro_f1", ScoreWindow(np.zeros(2), np.zeros(2), 0.1))


def test_the_chrf_predictor_learns_the_signals_sign_and_says_how_well_it_ranks() -> None:
    """The predictor is fitted, not assumed: here the confident answers are the *bad* ones (as measured on the
    embedded chat task), and the cross-fitted rank correlation reports how well unseen answers are ranked."""
    from tuneloop.monitor.answer_quality import QualityModelError, answer_features, fit_quality_model

    rng = np.random.default_rng(0)
    n = 200
    mean_logprob = rng.uniform(-2.5, -0.2, n)
    truth = np.clip(0.3 - 0.08 * (mean_logprob + 1.3) + rng.normal(0, 0.03, n), 0, 1)
    signals = np.column_stack([mean_logprob, mean_logprob - 1.0, rng.integers(5, 48, n)])
    features = answer_features(signals, ["a prompt"] * n, rng.uniform(0.3, 0.5, n))
    model = fit_quality_model(features, truth)
    assert model.coef[0] < 0 and model.spearman > 0.8 and 0.02 < model.residual_sd < 0.05
    noise = fit_quality_model(features, rng.permutation(truth))
    assert abs(noise.spearman) < 0.25, "without a relation the reported rank correlation is about zero"
    assert type(model).from_json(model.to_json()) == model
    with pytest.raises(QualityModelError, match="at least 20"):
        fit_quality_model(features[:10], truth[:10])
    with pytest.raises(QualityModelError, match="disagree"):
        answer_features(signals, ["a prompt"] * 3, np.zeros(n))
