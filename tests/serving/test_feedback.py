"""Feedback on captured requests, and challenger sets built from it, on a real SQLite store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.from_traffic import build_from_traffic
from tuneloop.challenger_sets.records import Example
from tuneloop.errors import DatasetError, FeedbackConflict, FeedbackError, UnknownRequest
from tuneloop.serving.feedback import attach_reference, import_feedback
from tuneloop.tables import TrafficRow
from tuneloop.timewindow import parse_instant

NOW = datetime.now(UTC)


def _capture(store, request_id: str, text: str, *, task: str = "sentiment", status: int = 200,
             shadow_of: str | None = None, minutes_ago: int = 1) -> None:
    with store.session() as session:
        session.add(TrafficRow(request_id=request_id, created_at=NOW - timedelta(minutes=minutes_ago), task=task,
                               adapter_version=1, route="champion", endpoint="chat", prompt_text=text,
                               messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": text}],
                               completion="negative", latency_ms=5.0, status=status, stream=False,
                               shadow_of=shadow_of, pii={}))


def _reference(store, request_id: str) -> str | None:
    with store.session() as session:
        return session.scalar(select(TrafficRow.reference).where(TrafficRow.request_id == request_id))


def test_references_are_validated_and_not_silently_replaced(config, store):
    _capture(store, "r1", "my bag is lost")
    assert attach_reference(store, config, "r1", " Negative ").reference == "negative"
    assert attach_reference(store, config, "r1", "negative").changed is False
    with pytest.raises(FeedbackConflict, match="already has"):
        attach_reference(store, config, "r1", "positive")
    with pytest.raises(FeedbackError, match="not a label"):
        attach_reference(store, config, "r1", "furious")
    with pytest.raises(UnknownRequest):
        attach_reference(store, config, "nope", "negative")
    assert _reference(store, "r1") == "negative"
    assert attach_reference(store, config, "r1", "positive", overwrite=True).changed
    assert _reference(store, "r1") == "positive"


def test_a_bad_import_file_names_every_bad_line_and_imports_nothing(config, store, tmp_path):
    _capture(store, "a", "first tweet")
    _capture(store, "b", "second tweet")
    bad = tmp_path / "feedback.jsonl"
    bad.write_text('{"request_id": "a", "reference": "positive"}\n'
                   "not json\n"
                   '{"request_id": "zzz", "reference": "positive"}\n'
                   '{"request_id": "b", "reference": "angry"}\n'
                   '{"request_id": "a", "reference": "negative"}\n'
                   '{"request_id": "b"}\n')
    with pytest.raises(DatasetError) as caught:
        import_feedback(store, config, bad)
    message = str(caught.value)
    for line in (2, 3, 4, 5, 6):
        assert f"feedback.jsonl:{line}:" in message
    assert "nothing was imported" in message
    assert _reference(store, "a") is None and _reference(store, "b") is None
    (tmp_path / "latin1.jsonl").write_bytes(b'{"request_id": "a", "reference": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        import_feedback(store, config, tmp_path / "latin1.jsonl")
    good = tmp_path / "good.jsonl"
    good.write_text('{"request_id": "a", "reference": "positive"}\n\n{"request_id": "b", "reference": "neutral"}\n')
    assert len(import_feedback(store, config, good)) == 2
    assert (_reference(store, "a"), _reference(store, "b")) == ("positive", "neutral")


def test_labelled_traffic_becomes_a_deduplicated_challenger_set_without_training_inputs(config, store):
    add_dataset(store, config.data_path, [Example(id="t1", input="Seen In Training", reference="neutral")],
                task="sentiment", name="train-small", kind="train", source="test")
    for request_id, text, minutes_ago in [("x1", "fresh complaint", 30), ("x2", "Fresh   complaint", 20),
                                          ("x3", "seen in training", 10), ("x4", "old news", 60 * 48),
                                          ("x5", "unlabelled", 5)]:
        _capture(store, request_id, text, minutes_ago=minutes_ago)
    _capture(store, "x6", "a failed request", status=503)
    _capture(store, "x7", "shadow answer", shadow_of="x1")
    for request_id, label in [("x1", "negative"), ("x2", "neutral"), ("x3", "neutral"), ("x4", "positive")]:
        attach_reference(store, config, request_id, label)
    with store.session() as session:  # feedback on a failed request counts nowhere
        session.get(TrafficRow, 6).reference = "negative"
    result = build_from_traffic(config, store, "sentiment", name="prod", since=parse_instant("1d"))
    examples = result.dataset.load()
    assert [(e.input, e.reference) for e in examples] == [("Fresh   complaint", "neutral")]
    assert (result.labelled, result.duplicates, result.leaked) == (3, 1, 1)
    assert result.dataset.manifest.kind == "challenger" and result.dataset.manifest.build["leaked_into_training"] == 1
    with pytest.raises(DatasetError, match="no labelled"):
        build_from_traffic(config, store, "sentiment", name="prod", since=parse_instant("1m"))


def test_time_windows_parse_ages_and_iso_dates():
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    assert parse_instant("7d", now=now) == now - timedelta(days=7)
    assert parse_instant("90m", now=now) == now - timedelta(minutes=90)
    assert parse_instant("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(Exception, match="neither an ISO"):
        parse_instant("last tuesday")
