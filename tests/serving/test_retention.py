"""Retention of captured traffic on a real SQLite store: age and size limits delete the oldest unlabelled rows
in batches, labelled rows stay, and the metrics report what each pass did."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import select

from tuneloop.config import RetentionConfig
from tuneloop.serving.metrics import ServingStateCollector
from tuneloop.serving.retention import TrafficRetention
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def _rows(store: Store, n: int, *, age_days: float, label: str | None = None, prefix: str = "p") -> None:
    with store.session() as session:
        for i in range(n):
            session.add(TrafficRow(request_id=uuid.uuid4().hex, created_at=NOW - timedelta(days=age_days, seconds=i),
                                   task="sentiment", route="champion", endpoint="chat", prompt_text=f"{prefix} {i}",
                                   messages=[], latency_ms=1.0, status=200, reference=label))


def _prompts(store: Store) -> list[str]:
    with store.session() as session:
        return list(session.scalars(select(TrafficRow.prompt_text).order_by(TrafficRow.id)))


def test_rows_past_the_age_go_in_batches_and_labelled_rows_stay(store: Store) -> None:
    _rows(store, 7, age_days=40, prefix="old")
    _rows(store, 2, age_days=40, label="positive", prefix="old labelled")
    _rows(store, 3, age_days=1, prefix="new")
    retention = TrafficRetention(store, RetentionConfig(max_age_days=30, max_rows=None, batch_rows=3))
    result = retention.prune(now=NOW)
    assert (result.by_age, result.by_size) == (7, 0)
    assert (result.kept_unlabelled, result.kept_labelled) == (3, 2)
    assert _prompts(store) == ["old labelled 0", "old labelled 1", "new 0", "new 1", "new 2"]
    assert retention.prune(now=NOW).by_age == 0, "a second pass finds nothing"


def test_beyond_the_row_limit_the_oldest_unlabelled_rows_go(store: Store) -> None:
    _rows(store, 4, age_days=3, prefix="older")
    _rows(store, 1, age_days=3, label="negative", prefix="labelled")
    _rows(store, 4, age_days=1, prefix="newer")
    retention = TrafficRetention(store, RetentionConfig(max_age_days=None, max_rows=5, batch_rows=2))
    result = retention.prune(now=NOW)
    assert result.by_size == 3 and result.kept_unlabelled == 5
    assert _prompts(store) == ["older 3", "labelled 0", "newer 0", "newer 1", "newer 2", "newer 3"]


def test_keep_labelled_off_applies_the_limits_to_labelled_rows(store: Store) -> None:
    _rows(store, 2, age_days=40, label="positive")
    retention = TrafficRetention(store, RetentionConfig(max_age_days=30, max_rows=None, keep_labelled=False))
    assert retention.prune(now=NOW).by_age == 2 and _prompts(store) == []


def test_the_retention_metrics(store: Store) -> None:
    class Idle:
        state, restarts = "ready", 0
        client = type("Client", (), {"loaded": {}})()
        counts: dict[str, int] = {}
        queue = type("Queue", (), {"qsize": staticmethod(lambda: 0)})()

    _rows(store, 5, age_days=40)
    _rows(store, 1, age_days=40, label="neutral")
    retention = TrafficRetention(store, RetentionConfig(max_age_days=30))
    registry = CollectorRegistry()
    registry.register(ServingStateCollector(Idle(), Idle(), Idle(), retention))
    before = generate_latest(registry).decode()
    assert 'tuneloop_traffic_pruned_rows_total{reason="age"} 0.0' in before
    assert "tuneloop_traffic_rows" not in before, "no count before the first pass"
    retention.prune(now=NOW)
    after = generate_latest(registry).decode()
    assert 'tuneloop_traffic_pruned_rows_total{reason="age"} 5.0' in after
    assert 'tuneloop_traffic_rows{labelled="false"} 0.0' in after
    assert 'tuneloop_traffic_rows{labelled="true"} 1.0' in after
    assert "tuneloop_traffic_retention_last_run_timestamp_seconds 1.7961264e+09" in after  # NOW
