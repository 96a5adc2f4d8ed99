"""Live-traffic estimates against the session's real vLLM and gateway: the captured signal is vLLM's own first
answer token's log-probabilities, the calibrator is fitted through the real endpoint, and the three estimates
come out of real answers and real feedback."""

from __future__ import annotations

import time
from pathlib import Path
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
        live_gateway: LiveGateway, embedded_sets: dict[str, list[Any]], base_model_dir: Path) -> None:
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
    texts: dict[str, str] = {}  # request id -> the text sent (captured text is redacted)
    for example in traffic:
        text = f"{example.last_user_text()} #{sent}"
        response = httpx.post(f"{live.url}/v1/chat/completions", timeout=120, json={
            "model": "sentiment", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "temperature": 0})
        assert response.status_code == 200, response.text
        assert "logprobs" not in response.json()["choices"][0], "the signal is ours, not returned unasked"
        ids.append((response.headers["x-request-id"], example.reference))
        texts[response.headers["x-request-id"]] = text
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
    champion = find_alias(live.store, "sentiment", "champion")
    assert champion is not None and {r.adapter_version for r in rows} == {champion.version}
    # the captured signal is the served model's own scores: the labels' shares among themselves are what PEFT
    # computes for the same chat (vLLM's values are normalised under the label mask, PEFT's over the vocabulary)
    expected_logprobs = _peft_label_logprobs(champion.path, base_model_dir, [texts[r.request_id] for r in rows],
                                             live.config.tasks["sentiment"].system_prompt, labels)
    # bf16 logits come in steps of 1/8 at this model's logit sizes: shares agree to a few hundredths, not better
    tolerance = 0.1 if live.engine.spec.resolved_dtype == "bfloat16" else 0.03
    compared = 0
    for row, expected in zip(rows, expected_logprobs, strict=True):
        assert row.signal is not None and set(row.signal) == {*labels, MISSING_KEY}, row.signal
        served = np.array([row.signal[label] for label in labels])
        assert np.all(served <= 0), "log-probabilities"
        if row.signal[MISSING_KEY] == 0:  # every label among the top 20
            compared += 1
            shares = np.exp(served) / np.exp(served).sum()
            assert np.allclose(shares, np.exp(expected) / np.exp(expected).sum(), atol=tolerance), \
                (row.signal, expected)
    assert compared >= len(rows) // 2, "too few answers had every label among the top candidates to compare"

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


def _peft_label_logprobs(adapter: Path, base: Path, texts: list[str], system_prompt: str,
                         labels: list[str]) -> list[np.ndarray]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.evaluators.label_likelihood import score_labels

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    scores = score_labels(model, AutoTokenizer.from_pretrained(base),
                          [Example(id=str(i), input=t, reference=labels[0]) for i, t in enumerate(texts)],
                          system_prompt=system_prompt, labels=labels)
    return [row.numpy() for row in scores.log_probs]


def test_real_free_text_answers_carry_their_token_logprob_summary(live_gateway: LiveGateway) -> None:
    """A generation task's signal from the real engine: the summary capture keeps is the mean, minimum and count
    of the log-probabilities vLLM returns for the answer's tokens (checked against the ones a client asking for
    them gets), and an answer nobody asked log-probabilities for comes back without them."""
    live = live_gateway
    sent = time.time()
    asked, plain = (httpx.post(f"{live.url}/v1/chat/completions", timeout=120, json={
        "model": "chat", "messages": [{"role": "user", "content": f"{text} #{sent}"}], "max_tokens": 12,
        "temperature": 0, **extra}) for text, extra in (("How was your weekend?", {"logprobs": True}),
                                                        ("Any plans for tonight?", {})))
    assert asked.status_code == 200 and plain.status_code == 200, (asked.text, plain.text)
    assert "logprobs" not in plain.json()["choices"][0]
    returned = [t["logprob"] for t in asked.json()["choices"][0]["logprobs"]["content"]]
    ids = {asked.headers["x-request-id"]: returned, plain.headers["x-request-id"]: None}
    rows: dict[str, Any] = {}
    for _ in range(60):
        with live.store.session() as session:
            rows = {r.request_id: r.signal for r in session.scalars(
                select(TrafficRow).where(TrafficRow.request_id.in_(list(ids))))}
        if len(rows) == 2:
            break
        time.sleep(0.5)
    assert len(rows) == 2, "both answers are captured"
    signal = rows[asked.headers["x-request-id"]]
    assert signal["tokens"] == len(returned) > 0
    assert signal["mean_logprob"] == pytest.approx(float(np.mean(returned)), abs=1e-6)
    assert signal["min_logprob"] == pytest.approx(min(returned), abs=1e-6)
    assert signal["min_logprob"] <= signal["mean_logprob"] <= 0
    other = rows[plain.headers["x-request-id"]]
    assert set(other) == {"mean_logprob", "min_logprob", "tokens"} and other["tokens"] >= 1
