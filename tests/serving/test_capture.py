"""The capture writer against a real SQLite database, including a database that refuses writes."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError

from tuneloop.redact import Redactor
from tuneloop.serving.capture import CaptureWriter, TrafficRecord, record_bytes, spilled_records
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


def test_a_torn_spill_line_is_quarantined_and_the_records_around_it_replay(store: Store, tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill")
    writer._spill([_record(1)], reason="database_error")
    with open(writer.spill_path, "ab") as handle:  # what SIGKILL or a full disk leaves: half a line, no newline
        handle.write(_record(2).model_dump_json().encode()[:40])
    writer._spill([_record(3)], reason="database_error")
    assert [r["request_id"] for r in spilled_records(writer.spill_path)] == ["r1", "r3"], \
        "the record appended after the torn line starts on a line of its own"
    assert writer.replay_spill() == 2
    assert _stored(store) == ["r1", "r3"] and writer.counts["quarantined"] == 1
    assert writer.corrupt_path.read_bytes() == _record(2).model_dump_json().encode()[:40] + b"\n"
    assert not writer.spill_path.exists() and not writer.replaying_path.exists()


def test_a_torn_line_on_a_full_disk_does_not_keep_the_records_around_it_from_replaying(store: Store,
                                                                                      tmp_path: Path) -> None:
    # Found by `bench recovery`: with the spill disk full, the torn line could not be written to the corrupt file,
    # the replay gave up each time, and the records it had already read stayed on the full disk forever.
    writer = CaptureWriter(store, tmp_path / "spill")
    writer._spill([_record(1)], reason="database_error")
    with open(writer.spill_path, "ab") as handle:
        handle.write(_record(2).model_dump_json().encode()[:40])
    writer.corrupt_path.mkdir()  # the corrupt file cannot be written, as on a full disk
    assert writer.replay_spill() == 1 and _stored(store) == ["r1"], "the readable record is stored"
    assert writer.replaying_path.read_bytes() == _record(2).model_dump_json().encode()[:40] + b"\n", \
        "only the torn line is left on disk, waiting for room"
    writer.corrupt_path.rmdir()
    assert writer.replay_spill() == 0 and writer.counts["quarantined"] == 1
    assert not writer.replaying_path.exists() and writer.corrupt_path.exists()


def test_an_interrupted_replay_is_finished_first_and_never_overwritten(store: Store, tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill")
    writer._spill([_record(1), _record(2)], reason="database_error")
    writer.spill_path.rename(writer.replaying_path)  # a replay that was killed before it finished
    writer._spill([_record(3)], reason="database_error")
    assert sorted(r["request_id"] for r in spilled_records(writer.spill_path)) == ["r1", "r2", "r3"]
    assert writer.replay_spill() == 3
    assert _stored(store) == ["r1", "r2", "r3"]


def test_replay_goes_in_bounded_batches_and_a_refused_batch_keeps_the_rest(store: Store, tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill", replay_batch_size=40)
    writer._spill([_record(i) for i in range(100)], reason="database_error")
    largest: list[int] = []

    def count(_conn, _cursor, _statement, parameters, _context, executemany) -> None:
        largest.append(len(parameters) if not executemany and isinstance(parameters, (tuple, list)) else 0)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        inserted = []
        original = writer._insert

        def fail_on_the_second_batch(batch: list[TrafficRecord]) -> None:
            inserted.append(len(batch))
            if len(inserted) == 2:
                raise OperationalError("INSERT", {}, Exception("database is locked"))
            original(batch)

        writer._insert = fail_on_the_second_batch  # type: ignore[method-assign]
        assert writer.replay_spill() == 40 and writer.replaying_path.exists()
        writer._insert = original  # type: ignore[method-assign]
        assert writer.replay_spill() == 60, "the first batch is skipped as stored, the rest goes in"
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(_stored(store)) == 100 and max(largest) <= 40
    assert not writer.replaying_path.exists()


def test_the_writer_redacts_before_anything_reaches_the_disk_and_bounds_queued_bytes(store: Store,
                                                                                    tmp_path: Path) -> None:
    writer = CaptureWriter(store, tmp_path / "spill", redactor=Redactor(), max_queue_bytes=100)
    secret = _record(1).model_copy(update={"prompt_text": "mail jane@example.com",
                                           "messages": [{"role": "user", "content": "mail jane@example.com"}],
                                           "completion": "call +44 20 7946 0958"})
    big = _record(2).model_copy(update={"prompt_text": "y" * 200, "messages": [{"role": "user", "content": "y" * 200}]})
    writer.submit(secret)
    writer.submit(big)
    assert writer.counts["spilled_queue_full"] == 1 and writer.queued_bytes == record_bytes(secret)
    writer.close()
    with store.session() as session:
        row = session.scalars(select(TrafficRow).where(TrafficRow.request_id == "r1")).one()
    assert (row.prompt_text, row.messages[0]["content"], row.completion) == (
        "mail [EMAIL]", "mail [EMAIL]", "call [PHONE]")
    assert row.pii == {"email": 1, "phone": 1} and writer.redactor.counts == {"email": 1, "phone": 1}
    writer._spill([writer._redacted(secret)], reason="database_error")
    assert "jane@example.com" not in writer.spill_path.read_text()


SPILLER = """
import sys
from pathlib import Path
from tests.serving.test_capture import _record
from tuneloop.serving.capture import CaptureWriter
from tuneloop.store import Store

writer = CaptureWriter(Store(sys.argv[1]), Path(sys.argv[2]))
for i in range(int(sys.argv[3]), int(sys.argv[4])):
    writer._spill([_record(i)], reason="database_error")
"""


def test_two_gateways_sharing_a_spill_dir_lose_nothing_while_one_replays(store: Store, tmp_path: Path) -> None:
    """Another process (a second gateway on the same data dir) spills record after record while this one replays
    over and over: every append lands in a file that will still be replayed, never in one just renamed away."""
    import subprocess
    import sys

    spill = tmp_path / "spill"
    writer = CaptureWriter(store, spill)
    other = subprocess.Popen([sys.executable, "-c", SPILLER, store.url, str(spill), "0", "1000"],
                             cwd=Path(__file__).parents[2])
    while other.poll() is None:
        writer.replay_spill()
    assert other.returncode == 0
    writer.replay_spill()
    assert _stored(store) == sorted(f"r{i}" for i in range(1000))
    assert list(spill.glob("traffic-spill.replaying*")) == []


def test_a_replay_left_by_a_dead_gateway_on_this_host_is_taken_over_and_a_live_ones_is_not(store: Store,
                                                                                          tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    spill = tmp_path / "spill"
    writer = CaptureWriter(store, spill)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for owner, ids in ((f"{host}-{dead.stdout.strip()}", (1, 2)), (f"{host}-{os.getppid()}", (3,)), ("", (4,))):
        name = f"traffic-spill.replaying.{owner}" if owner else "traffic-spill.replaying"  # "": an older tuneloop's
        (spill / name).write_bytes(b"".join(_record(i).model_dump_json().encode() + b"\n" for i in ids))
    assert sorted(r["request_id"] for r in spilled_records(writer.spill_path)) == ["r1", "r2", "r3", "r4"]
    assert writer.replay_spill() == 3
    assert _stored(store) == ["r1", "r2", "r4"], "the live gateway's replay is its own to finish"
    left = [p.name for p in spill.glob("traffic-spill.replaying*")]
    assert left == [f"traffic-spill.replaying.{host}-{os.getppid()}"]


FULL_DISK_SPILLER = """
import json, resource, signal, sys
from pathlib import Path
from tests.serving.test_capture import _record
from tuneloop.serving.capture import CaptureWriter
from tuneloop.store import Store

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
writer = CaptureWriter(Store(sys.argv[1], migrate=False), Path(sys.argv[2]))
for i in range(0, 40, 4):  # the database refuses every insert: each batch of 4 goes to the spill file
    writer._flush([_record(j) for j in range(i, i + 4)])
print(json.dumps(dict(writer.counts)))
"""


def test_a_full_spill_disk_drops_records_counted_and_what_was_written_replays(store: Store, tmp_path: Path) -> None:
    """A gateway whose database is away and whose spill disk fills up (the process's file-size limit stands in for
    the disk: past it every write fails with EFBIG, the last one half-written): every record is either spilled or
    counted as dropped, exactly: the records of a batch that went in whole before the disk filled count as spilled,
    and a later replay stores every spilled one and quarantines the torn line."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nothing listens on: the database refuses connections
        sock.bind(("127.0.0.1", 0))
        away = f"postgresql+psycopg://tuneloop@127.0.0.1:{sock.getsockname()[1]}/gone"
    spill = tmp_path / "spill"
    done = subprocess.run([sys.executable, "-c", FULL_DISK_SPILLER, away, str(spill), "4000"],
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    spilled, dropped = counts.get("spilled_database_error", 0), counts.get("dropped", 0)
    assert spilled > 0 and dropped > 0 and spilled + dropped == 40, counts
    assert (spill / "traffic-spill.jsonl").stat().st_size == 4000, "the disk filled up"
    writer = CaptureWriter(store, spill)
    assert writer.replay_spill() == spilled
    assert _stored(store) == sorted(f"r{i}" for i in range(spilled))
    assert writer.counts["quarantined"] == 1, "the half-written record is quarantined, not replayed"


def test_a_record_that_arrives_after_close_is_spilled_not_lost(store: Store, tmp_path: Path) -> None:
    # A request that finishes during the gateway's shutdown, after the writer's thread has stopped.
    writer = CaptureWriter(store, tmp_path / "spill")
    writer.start()
    writer.submit(_record(1))
    writer.close()
    writer.submit(_record(2))
    assert _stored(store) == ["r1"] and writer.counts["spilled_after_close"] == 1
    assert [r["request_id"] for r in spilled_records(writer.spill_path)] == ["r2"]
    assert CaptureWriter(store, tmp_path / "spill").replay_spill() == 1, "the next gateway replays it"
    assert _stored(store) == ["r1", "r2"]
