"""The capture writer against a real SQLite database, including a database that refuses writes."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, text

from tuneloop.serving.capture import CaptureWriter, TrafficRecord, spilled_records
from tuneloop.store import Store
from tuneloop.tables import TrafficRow


def _record(i: int) -> TrafficRecord:
    return TrafficRecord(request_id=f"r{i}", task="sentiment", adapter_version=1, route="champion",
                         endpoint="chat", prompt_text=f"text {i}", messages=[{"role": "user", "content": f"t{i}"}],
                         completion="positive", latency_ms=1.0, status=200)


def _stored(store: Store) -> list[str]:
    with store.session() as session:
        return sorted(session.scalars(select(TrafficRow.request_id)))


def test_records_are_written_in_batches_off_the_caller(store: Store, tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill", flush_interval_s=0.05)
    writer.start()
    for i in range(50):
        writer.submit(_record(i))
    writer.close()
    assert len(_stored(store)) == 50 and writer.counts["captured"] == 50


def test_a_full_queue_spills_to_disk_and_is_replayed(store: Store, tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill", max_queue=2)
    for i in range(5):
        writer.submit(_record(i))
    assert writer.counts["spilled_queue_full"] == 3
    assert len(spilled_records(writer.spill_path)) == 3
    assert writer.replay_spill() == 3
    writer.close()
    assert _stored(store) == [f"r{i}" for i in range(5)]
    assert not writer.spill_path.exists()


def test_database_failure_spills_then_replays_without_loss_or_duplicates(store: Store, tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill", flush_interval_s=0.05)
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE traffic RENAME TO traffic_offline"))
    writer._flush([_record(1), _record(2)])
    assert writer.counts["spilled_database_error"] == 2 and writer.counts["dropped"] == 0
    assert writer.replay_spill() == 0, "the database is still down: records stay in the spill file"
    assert len(spilled_records(writer.spill_path)) == 2
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE traffic_offline RENAME TO traffic"))
    writer._flush([_record(3)])
    assert writer.replay_spill() == 2
    writer._spill([_record(3)], reason="database_error")
    assert writer.replay_spill() == 0, "already stored records are not inserted twice"
    assert _stored(store) == ["r1", "r2", "r3"]
