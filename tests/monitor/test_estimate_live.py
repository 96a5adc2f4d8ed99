"""Live-traffic estimates against the session's real vLLM and gateway: the captured signal is vLLM's own first
answer token's log-probabilities, the calibrator is fitted through the real endpoint, and the three estimates
come out of real answers and real feedback."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from tests.live import ADMIN_TOKEN, LiveGateway
from tuneloop.answer_signal import MISSING_KEY
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.evaluators.targets import EvalTarget
from tuneloop.monitor.estimate import QualityEstimator
from tuneloop.registry import find_alias
from tuneloop.tables import AnswerCalibrationRow, TrafficRow

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_real_answers_carry_their_label_logprobs_and_give_three_estimates(
        live_gateway: LiveGateway, embedded_sets: dict[str, list[Any]]) -> None:
    live = live_gateway
    labels = list(live.config.tasks["sentiment"].labels)
    heldout: list[Example] = next(b.examples for b in embedded_sets["sentiment"] if b.name == "heldout")[:64]
    calibration, traffic = heldout[:40], heldout[40:64]
    add_dataset(live.store, live.config.data_path, calibration, task="sentiment", name="estimate-heldout",
                kind="heldout", source="test", check_leakage=False)
    config = live.config.model_copy(deep=True)
    task = config.tasks["sentiment"]
    task.heldout_dataset = "sentiment/estimate-heldout"
    task.estimate.calibration_examples = 40

    sent = time.time()
    ids = []
    for example in traffic:
        response = httpx.post(f"{live.url}/v1/chat/completions", timeout=120, json={
            "model": "sentiment", "messages": [{"role": "user", "content": f"{example.last_user_text()} #{sent}"}],
            "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        assert "logprobs" not in response.json()["choices"][0], "the signal is ours, not returned unasked"
        ids.append((response.headers["x-request-id"], example.reference))
    for request_id, reference in ids[:8]:
        feedback = httpx.post(f"{live.url}/v1/feedback", json={"request_id": request_id, "reference": reference},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        if feedback.status_code == 404:  # captured within a second
            time.sleep(1.0)
            feedback = httpx.post(f"{live.url}/v1/feedback", json={"request_id": request_id, "reference": reference},
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        assert feedback.status_code == 200, feedback.text

    with live.store.session() as session:
        rows = list(session.scalars(select(TrafficRow).where(TrafficRow.request_id.in_([i for i, _ in ids]))))
    assert len(rows) == len(traffic)
    agree = 0
    for row in rows:
        assert row.signal is not None and set(row.signal) == {*labels, MISSING_KEY}, row.signal
        values = np.array([row.signal[label] for label in labels])
        assert np.all(values <= 0) and np.exp(values).sum() <= 1.0 + 1e-6, "log-probabilities over the vocabulary"
        agree += labels[int(values.argmax())] == row.completion
    # the constrained greedy answer is the label the model ranks first (unless a label prefix token outranks it)
    assert agree >= 0.8 * len(rows), f"only {agree} of {len(rows)} answers are the label with the top logprob"

    champion = find_alias(live.store, "sentiment", "champion")
    assert champion is not None
    target = EvalTarget("sentiment", champion.ref, champion.version, live.url)
    result = QualityEstimator(config, live.store).estimate("sentiment", window=len(traffic), metric="accuracy",
                                                           target=target)
    methods = {e.method: e for e in result.estimates}
    assert methods["labels_only"].n_labelled == 8 and methods["prediction_powered"].n_unlabelled == 16
    for estimate in methods.values():
        assert estimate.value is not None and estimate.ci_lower is not None and estimate.ci_upper is not None
        assert estimate.ci_lower <= estimate.value <= estimate.ci_upper
    assert methods["prediction_powered"].width <= methods["labels_only"].width + 1e-12  # type: ignore[operator]
    with live.store.session() as session:
        stored = session.scalars(select(AnswerCalibrationRow).where(
            AnswerCalibrationRow.adapter_version == champion.version)).one()
    assert stored.n >= 20 and stored.dataset_ref.startswith("sentiment/estimate-heldout@")
