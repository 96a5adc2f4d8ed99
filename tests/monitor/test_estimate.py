"""Live-traffic estimates end to end on a real store: calibration fitted once per version through the (stubbed)
endpoint, three methods on a window of captured answers with feedback, the exported series and the policy rule."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.monitor.helpers import LABELS, make_dataset, register_champion
from tuneloop.answer_signal import label_signal
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config, FloorRule
from tuneloop.errors import EstimationError
from tuneloop.evaluators.targets import EvalTarget
from tuneloop.monitor.answer_quality import sentence_scores
from tuneloop.monitor.estimate import QualityEstimator
from tuneloop.monitor.exporter import MonitorCollector
from tuneloop.monitor.incidents import IncidentStore, RuleId
from tuneloop.monitor.policy import Policy
from tuneloop.store import Store
from tuneloop.tables import AnswerCalibrationRow, DriftRunRow, QualityEstimateRow, TrafficRow

TARGET = EvalTarget("sentiment", "sentiment@1", 1, "http://endpoint.test")


def _model(text: str) -> tuple[str, str, list[dict[str, Any]]]:
    """(truth, answer, top log-probabilities) of an overconfident model: right 70 % of the time, always ~95 %
    sure. The truth is the label make_dataset gives the text's index."""
    index = int(text.rsplit(" ", 1)[1])
    truth = LABELS[index % 3]
    right = zlib.crc32(text.encode()) % 10 < 7
    answer = truth if right else LABELS[(index + 1) % 3]
    others = [label for label in LABELS if label != answer]
    top = [{"token": answer, "logprob": -0.05}, {"token": others[0], "logprob": -3.5},
           {"token": others[1], "logprob": -4.0}]
    return truth, answer, top


class Endpoint:
    """A stub engine answering each held-out request with `reply(body)`: (answer, logprobs content), counted."""

    def __init__(self, reply: Callable[[dict[str, Any]], tuple[str, list[dict[str, Any]]]]) -> None:
        self.reply, self.requests = reply, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        answer, content = self.reply(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": answer},
                                                      "logprobs": {"content": content}}],
                                         "usage": {"completion_tokens": len(content)}})


def _label_reply(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    assert body["logprobs"] is True and body["structured_outputs"] == {"choice": LABELS}
    _, answer, top = _model(body["messages"][-1]["content"])
    return answer, [{"token": answer, "logprob": -0.05, "top_logprobs": top}]


def _live_traffic(store: Store, n: int, labelled: int, *, version: int = 1) -> float:
    """n captured answers of the version with their signals, the first `labelled` with feedback; returns the
    window's true accuracy."""
    right = 0
    with store.session() as session:
        for i in range(n):
            text = f"live tweet {i}"
            truth, answer, top = _model(text)
            right += truth == answer
            session.add(TrafficRow(
                request_id=uuid.uuid4().hex, created_at=datetime.now(UTC), task="sentiment",
                adapter_version=version, route="champion", endpoint="chat", prompt_text=text,
                messages=[{"role": "user", "content": text}], completion=answer, latency_ms=1.0, status=200,
                signal=label_signal({t["token"]: t["logprob"] for t in top}, LABELS),
                reference=truth if i < labelled else None))
    return right / n


@pytest.fixture
def estimator(config: Config, store: Store) -> tuple[QualityEstimator, Endpoint]:
    make_dataset(store, config, "heldout", 240, kind="heldout")
    register_champion(store, "sentiment", 1)
    endpoint = Endpoint(_label_reply)
    return QualityEstimator(config, store, transport=httpx.MockTransport(endpoint)), endpoint


def test_three_estimates_on_a_window_with_some_labels(estimator: tuple[QualityEstimator, Endpoint],
                                                      store: Store) -> None:
    quality, endpoint = estimator
    truth = _live_traffic(store, 180, labelled=40)
    result = quality.estimate("sentiment", window=150, metric="accuracy", target=TARGET)
    assert endpoint.requests == 240, "the calibrator is fitted on the held-out set through the endpoint"
    assert result.n_answers == 150 and result.metric == "accuracy"
    methods = {e.method: e for e in result.estimates}
    assert set(methods) == {"label_free", "prediction_powered", "labels_only"}
    for e in methods.values():
        assert e.value is not None and e.ci_lower is not None and e.ci_upper is not None
        assert e.ci_lower <= e.value <= e.ci_upper
    # the window is the newest 150 answers: ids 30..179, of which 30..39 carry labels
    assert methods["labels_only"].n_labelled == 10 and methods["prediction_powered"].n_unlabelled == 140
    assert methods["prediction_powered"].width <= methods["labels_only"].width + 1e-12  # type: ignore[operator]
    # the raw signal says ~95 %; calibrated on the held-out set it says about what the model really gets
    assert result.calibration["method"] in ("temperature", "isotonic")
    assert result.calibration["ece"][result.calibration["method"]] < 0.5 * result.calibration["ece"]["identity"]
    assert methods["label_free"].value == pytest.approx(truth, abs=0.08)

    again = quality.estimate("sentiment", window=150, metric="macro_f1", target=TARGET)
    assert endpoint.requests == 240, "the stored calibrator is reused"
    assert again.metric == "macro_f1"
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(AnswerCalibrationRow)) == 1
        assert session.scalar(select(func.count()).select_from(QualityEstimateRow)) == 6
    assert json.loads(json.dumps(result.to_json()))["estimates"][1]["method"] == "prediction_powered"


def test_the_latest_estimates_are_exported(estimator: tuple[QualityEstimator, Endpoint], config: Config,
                                           store: Store) -> None:
    quality, _ = estimator
    _live_traffic(store, 120, labelled=0)
    quality.estimate("sentiment", window=120, metric="accuracy", target=TARGET)
    families = {f.name: f for f in MonitorCollector(config, store).collect()}
    values = {s.labels["method"]: s.value for s in families["tuneloop_quality_estimate"].samples}
    assert set(values) == {"label_free"}, "methods without labels export no made-up value"
    counts = {s.labels["method"]: s.value for s in families["tuneloop_quality_estimate_unlabelled_answers"].samples}
    assert counts == {"label_free": 120.0, "prediction_powered": 120.0, "labels_only": 120.0}
    [sample] = families["tuneloop_quality_estimate_ci_lower"].samples
    assert sample.labels == {"task": "sentiment", "adapter": "sentiment@1", "metric": "accuracy",
                             "method": "label_free"} and sample.value < values["label_free"]


def test_what_cannot_be_estimated_says_why(estimator: tuple[QualityEstimator, Endpoint], store: Store) -> None:
    quality, _ = estimator
    with pytest.raises(EstimationError, match="metric 'bleu' of generation task 'chat' has no estimator"):
        quality.estimate("chat", metric="bleu", target=TARGET)
    with pytest.raises(EstimationError, match="has no estimator"):
        quality.estimate("sentiment", metric="bleu", target=TARGET)
    with pytest.raises(EstimationError, match="no captured answers with a quality signal for sentiment@1"):
        quality.estimate("sentiment", target=TARGET)
    _live_traffic(store, 30, labelled=0, version=2)  # another version's answers do not count for version 1
    with pytest.raises(EstimationError, match="no captured answers"):
        quality.estimate("sentiment", target=TARGET)


def test_the_estimate_rule_opens_one_incident_under_the_floor_and_none_above(
        estimator: tuple[QualityEstimator, Endpoint], config: Config, store: Store) -> None:
    quality, _ = estimator
    task = config.tasks["sentiment"]
    task.policy.drop, task.policy.drift_windows = None, 0
    _live_traffic(store, 200, labelled=60)
    quality.estimate("sentiment", window=200, metric="accuracy", target=TARGET)  # ~0.7, 60 labels

    task.policy.floors = [FloorRule(metric="accuracy", dataset="sentiment/heldout", min=0.5)]
    above = Policy(config, store).evaluate("sentiment")
    rule = next(c for c in above.checks if c.rule == RuleId.estimate("accuracy"))
    assert rule.verdict == "holds" and above.changes.opened == []

    task.policy.floors = [FloorRule(metric="accuracy", dataset="sentiment/heldout", min=0.9)]
    under = Policy(config, store).evaluate("sentiment")
    rule = next(c for c in under.checks if c.rule == RuleId.estimate("accuracy"))
    assert rule.verdict == "breach" and "prediction-powered" in rule.message
    assert len(under.changes.opened) == 1
    assert Policy(config, store).evaluate("sentiment").changes.opened == [], "one incident, refreshed"
    [incident] = [i for i in IncidentStore(store).list(task="sentiment") if i.rule.kind == "estimate"]
    assert str(incident.rule) == "estimate:accuracy:live" and RuleId.parse("estimate:accuracy:live") == incident.rule


def test_without_labels_the_label_free_estimate_breaches_only_while_drift_is_flagged(
        estimator: tuple[QualityEstimator, Endpoint], config: Config, store: Store) -> None:
    quality, _ = estimator
    task = config.tasks["sentiment"]
    task.policy.drop, task.policy.drift_windows = None, 0
    task.policy.floors = [FloorRule(metric="accuracy", dataset="sentiment/heldout", min=0.9)]
    _live_traffic(store, 200, labelled=0)
    quality.estimate("sentiment", window=200, metric="accuracy", target=TARGET)
    quiet = Policy(config, store).check_rules("sentiment")
    assert next(c for c in quiet if c.rule.kind == "estimate").verdict == "holds"
    with store.session() as session:
        session.add(DriftRunRow(task="sentiment", window=200, n_current=200, n_reference=1000, drifted=True,
                                false_alarm_rate=0.05))
    drifted = Policy(config, store).check_rules("sentiment")
    check = next(c for c in drifted if c.rule.kind == "estimate")
    assert check.verdict == "breach" and "while drift is flagged" in check.message


# --- generation: a per-answer chrF predictor -----------------------------------------------------------------------

CHAT_TARGET = EvalTarget("chat", "chat@1", 1, "http://endpoint.test")


def _chat_reply(text: str) -> tuple[str, str, list[float]]:
    """(reference, answer, token log-probabilities) of a model whose confident answers are the right ones: two in
    five answers repeat the reference (log-probabilities around -0.3), the rest are off (around -2.5)."""
    index = int(text.rsplit(" ", 1)[1])
    reference = f"I would love to talk about topic number {index} with you"
    good = zlib.crc32(text.encode()) % 5 < 2
    answer = reference if good else "banana keyboard seventeen"
    centre = -0.3 if good else -2.5
    return reference, answer, [centre - 0.2, centre, centre + 0.2, centre - 0.1]


def _chat_endpoint_reply(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    assert body["logprobs"] is True and "top_logprobs" not in body and "structured_outputs" not in body
    _, answer, logprobs = _chat_reply(body["messages"][-1]["content"])
    return answer, [{"token": f"t{i}", "logprob": lp, "top_logprobs": []} for i, lp in enumerate(logprobs)]


def test_a_generation_tasks_chrf_is_estimated_from_its_answers_token_logprobs(config: Config, store: Store) -> None:
    chat = [Example(id=f"c{i}", input=f"tell me about topic {i}", reference=_chat_reply(f"x {i}")[0])
            for i in range(80)]
    add_dataset(store, config.data_path, chat[:40], task="chat", name="train", kind="train", source="test")
    add_dataset(store, config.data_path, chat[40:], task="chat", name="heldout", kind="heldout", source="test")
    register_champion(store, "chat", 1)
    endpoint = Endpoint(_chat_endpoint_reply)
    quality = QualityEstimator(config, store, transport=httpx.MockTransport(endpoint))
    answers, references = [], []
    with store.session() as session:
        for i in range(120):
            text = f"live chat {i}"
            reference, answer, logprobs = _chat_reply(text)
            answers.append(answer)
            references.append(reference)
            session.add(TrafficRow(
                request_id=uuid.uuid4().hex, created_at=datetime.now(UTC), task="chat", adapter_version=1,
                route="champion", endpoint="chat", prompt_text=text, messages=[{"role": "user", "content": text}],
                completion=answer, latency_ms=1.0, status=200,
                signal={"mean_logprob": sum(logprobs) / 4, "min_logprob": min(logprobs), "tokens": 4.0},
                reference=reference if i < 30 else None))
    truth = float(sentence_scores("chrf", answers, references).mean())
    result = quality.estimate("chat", target=CHAT_TARGET)
    assert endpoint.requests == 40, "the predictor is fitted on the held-out set through the endpoint"
    assert result.metric == "chrf" and result.n_answers == 120
    assert result.calibration["spearman"] > 0.8, "confident answers are the good ones here: the predictor ranks them"
    methods = {e.method: e for e in result.estimates}
    assert methods["label_free"].value == pytest.approx(truth, abs=0.05)
    assert methods["labels_only"].n_labelled == 30 and methods["prediction_powered"].n_unlabelled == 90
    assert methods["prediction_powered"].width <= methods["labels_only"].width + 1e-12  # type: ignore[operator]
    assert methods["prediction_powered"].detail["lambda"] > 0.5, "a good predictor is trusted"
    quality.estimate("chat", target=CHAT_TARGET)
    assert endpoint.requests == 40, "the stored predictor is reused"
    with store.session() as session:
        [stored] = session.scalars(select(AnswerCalibrationRow).where(AnswerCalibrationRow.task == "chat"))
        assert stored.method == "ridge" and stored.n == 40
