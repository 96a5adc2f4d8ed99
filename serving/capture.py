"""Traffic capture off the request path: a bounded queue, batched inserts, a spill file, replay.

The gateway hands each finished request to `CaptureWriter.submit`, which never blocks: the record goes on a
queue bounded in records and in bytes that a background thread drains into the store in batches, redacting each
record there, off the event loop. If the queue is full, or the database refuses a batch, records are appended to a
local JSONL spill file (fsynced) and replayed into the store once it accepts writes again. Nothing is dropped
silently: every spill, replay, quarantined line and (only if even the spill file cannot be written) drop is
counted, and the counters are exported as metrics.

What a crash can cost. A spill line torn by SIGKILL or a full disk is moved to `traffic-spill.corrupt.jsonl`
(counted, never deleted), and the next append starts on a fresh line, so one torn line costs one record, not the
file. Replay works on a renamed copy (`traffic-spill.replaying.<host>-<pid>`) that is only deleted once every
record in it is stored; a replay cut short leaves it for the next one (the same process, or the next gateway on
this host once that process is gone), and records already stored are skipped by request id. Gateways may share
the spill dir (two gateways on one data dir): appends and renames take a file lock, held for the write only, so
no record is appended to a file another process has just renamed away. What
SIGKILL does lose is the in-memory queue: at most `max_queue` records or `max_queue_bytes` of text, the requests of
the last `flush_interval_s` under normal load (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import insert, select

from tuneloop.processes import process_alive
from tuneloop.redact import Redactor
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

log = logging.getLogger(__name__)

LEGACY_REPLAYING = "traffic-spill.replaying"
REPLAYING_PREFIX = LEGACY_REPLAYING + "."
OWNER = f"{socket.gethostname()}-{os.getpid()}"


class TrafficRecord(BaseModel):
    """One captured request. The gateway submits it as sent; the writer redacts its text before it is stored or
    spilled, so no unredacted text reaches the disk."""

    request_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    task: str
    adapter_version: int | None
    route: str = Field(description="champion, candidate (canary), explicit, shadow or base")
    endpoint: str = Field(description="chat or completion")
    prompt_text: str = Field(description="Last user message (or the prompt): the text monitored for drift.")
    messages: list[dict[str, Any]]
    completion: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float
    status: int
    stream: bool = False
    shadow_of: str | None = None
    pii: dict[str, int] = Field(default_factory=dict)
    key_id: str | None = Field(default=None, description="The API key that sent the request (its id, never the key).")
    signal: dict[str, float] | None = Field(default=None, description="A classification answer's label "
                                            "log-probabilities (serving/quality_signal.py); no text.")


class CaptureWriter:
    """Background writer; `counts` holds captured/spilled/replayed/quarantined/dropped totals for the exporter."""

    def __init__(self, store: Store, spill_dir: Path, *, redactor: Redactor | None = None, max_queue: int = 10_000,
                 max_queue_bytes: int = 64 * 2**20, batch_size: int = 200, replay_batch_size: int = 500,
                 flush_interval_s: float = 0.5) -> None:
        self.store = store
        self.spill_dir = spill_dir
        self.redactor = redactor or Redactor(kinds=())
        self.max_queue_bytes = max_queue_bytes
        self.batch_size = batch_size
        self.replay_batch_size = replay_batch_size
        self.flush_interval_s = flush_interval_s
        self.queue: queue.Queue[TrafficRecord] = queue.Queue(maxsize=max_queue)
        self.queued_bytes = 0
        self.counts: Counter[str] = Counter()
        self._bytes_lock = threading.Lock()
        self._spill_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic-capture", daemon=True)
        self.spill_dir.mkdir(parents=True, exist_ok=True)

    @property
    def spill_path(self) -> Path:
        return self.spill_dir / "traffic-spill.jsonl"

    @property
    def replaying_path(self) -> Path:
        """This process's replay in progress (named by host and pid: gateways may share the data dir)."""
        return self.spill_dir / f"{REPLAYING_PREFIX}{OWNER}"

    @property
    def lock_path(self) -> Path:
        return self.spill_dir / "traffic-spill.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads and every other process using the spill dir, one at a time: held only to append
        or to rename, never during a replay's database writes, since `submit` may spill from the event loop."""
        with self._spill_lock, open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @property
    def corrupt_path(self) -> Path:
        return self.spill_dir / "traffic-spill.corrupt.jsonl"

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: TrafficRecord) -> None:
        """Queue a record; never blocks the request. A queue full in records or bytes spills to disk instead, and so
        does a record that arrives after `close` (a request that finished during the gateway's shutdown): no
        thread is left to write it."""
        if self._stop.is_set():
            self._spill([self._redacted(record)], reason="after_close")
            return
        size = record_bytes(record)
        with self._bytes_lock:
            fits = self.queued_bytes + size <= self.max_queue_bytes
            if fits:
                self.queued_bytes += size
        if fits:
            try:
                self.queue.put_nowait(record)
                return
            except queue.Full:
                self._release(size)
        self._spill([self._redacted(record)], reason="queue_full")

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, then stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._flush(self._drain(limit=None))

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self.queued_bytes -= size

    def _redacted(self, record: TrafficRecord) -> TrafficRecord:
        pii: Counter[str] = Counter(record.pii)
        messages, redacted = [], {}
        for message in record.messages:
            content = message.get("content")
            if isinstance(content, str):
                raw = content
                content, found = self.redactor.redact(content)
                redacted[raw] = content
                pii.update(found)
            messages.append({**message, "content": content})
        # The monitored prompt is the last user message: its redaction is the message's, counted once.
        prompt = redacted.get(record.prompt_text)
        if prompt is None:
            prompt, found = self.redactor.redact(record.prompt_text)
            pii.update(found)
        completion = record.completion
        if completion is not None:
            completion, found = self.redactor.redact(completion)
            pii.update(found)
        return record.model_copy(update={"messages": messages, "prompt_text": prompt, "completion": completion,
                                         "pii": dict(+pii)})

    def _run(self) -> None:
        last_replay = 0.0
        while not self._stop.is_set():
            batch = self._drain(limit=self.batch_size, wait=self.flush_interval_s)
            if batch:
                self._flush(batch)
            if time.monotonic() - last_replay > 5.0:
                last_replay = time.monotonic()
                try:
                    self.replay_spill()
                except Exception:  # noqa: BLE001 - the capture thread must outlive any one bad replay
                    log.exception("replay of the traffic spill failed; it stays on disk for the next try")

    def _drain(self, *, limit: int | None, wait: float = 0.0) -> list[TrafficRecord]:
        batch: list[TrafficRecord] = []
        try:
            batch.append(self.queue.get(timeout=wait) if wait else self.queue.get_nowait())
        except queue.Empty:
            return batch
        while limit is None or len(batch) < limit:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        self._release(sum(record_bytes(r) for r in batch))
        return [self._redacted(record) for record in batch]

    def _flush(self, batch: list[TrafficRecord]) -> None:
        if not batch:
            return
        try:
            self._insert(batch)
            self.counts["captured"] += len(batch)
        except Exception as exc:
            log.warning("traffic insert of %d records failed (%s); spilling to %s", len(batch), exc,
                        self.spill_path)
            self._spill(batch, reason="database_error")

    def _insert(self, batch: list[TrafficRecord]) -> None:
        """One Core executemany, not ORM objects: the ORM's unit of work took ≈120 µs of Python per row against
        ≈45 µs (batches of 50, SQLite, measured here), on this thread, holding the GIL the gateway's event loop
        needs (the ORM flush was a quarter of the gateway process's samples in a py-spy profile of
        `bench gateway`)."""
        with self.store.session() as session:
            session.execute(insert(TrafficRow), [record.model_dump() for record in batch])

    def _spill(self, records: list[TrafficRecord], *, reason: str) -> None:
        try:
            with self._locked():
                _append_lines(self.spill_path, [record.model_dump_json().encode() for record in records])
            self.counts[f"spilled_{reason}"] += len(records)
        except PartialAppend as exc:
            # The lines written before the disk filled are whole and will be replayed; the rest are gone.
            log.error("could not spill %d of %d traffic records to %s: %s", len(records) - exc.written,
                      len(records), self.spill_path, exc.__cause__)
            self.counts[f"spilled_{reason}"] += exc.written
            self.counts["dropped"] += len(records) - exc.written
        except OSError as exc:
            log.error("could not spill %d traffic records to %s: %s", len(records), self.spill_path, exc)
            self.counts["dropped"] += len(records)

    def replay_spill(self) -> int:
        """Insert spilled records into the store, in batches; a record already stored (same request_id) is skipped.
        A batch the database refuses stops the replay and leaves the rest on disk for the next one."""
        replayed = 0
        while True:
            with self._locked():
                if not self.replaying_path.exists() and not self._claim_abandoned():
                    if not self.spill_path.exists():
                        return replayed
                    os.replace(self.spill_path, self.replaying_path)
            records, corrupt = self._readable_records(self.replaying_path)
            for start in range(0, len(records), self.replay_batch_size):
                chunk = records[start:start + self.replay_batch_size]
                try:
                    with self.store.session() as session:
                        stored = set(session.scalars(select(TrafficRow.request_id).where(
                            TrafficRow.request_id.in_([r.request_id for r in chunk]))))
                    fresh = [r for r in chunk if r.request_id not in stored]
                    if fresh:
                        self._insert(fresh)
                except Exception as exc:
                    log.warning("replay of %d spilled records failed (%s); keeping %s for the next try",
                                len(records) - start, exc, self.replaying_path)
                    return replayed
                replayed += len(fresh)
                self.counts["replayed"] += len(fresh)
            if corrupt and not self._quarantine(corrupt):
                return replayed
            self.replaying_path.unlink()

    def _claim_abandoned(self) -> bool:
        """Take over a replay left by a gateway that died on this host (or by an older tuneloop, which named it
        without an owner), so what it had spilled is not stranded. Called under the spill lock."""
        for path in sorted(self.spill_dir.glob(f"{LEGACY_REPLAYING}*")):
            if path == self.replaying_path or path.name.endswith(".tidy"):
                continue
            host, _, pid = path.name.removeprefix(REPLAYING_PREFIX).rpartition("-")
            legacy = path.name == LEGACY_REPLAYING
            if legacy or (host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))):
                os.replace(path, self.replaying_path)
                log.info("replaying %s, left by a gateway that is gone", path.name)
                return True
        return False

    def _readable_records(self, path: Path) -> tuple[list[TrafficRecord], list[bytes]]:
        """The records of a spill file, and the lines that do not parse (a torn last line)."""
        records, corrupt = [], []
        for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(TrafficRecord.model_validate_json(line))
            except ValueError as exc:
                corrupt.append(line)
                log.error("%s line %d is not a traffic record (%s); it goes to %s", path, number,
                          str(exc).splitlines()[0], self.corrupt_path)
        return records, corrupt

    def _quarantine(self, corrupt: list[bytes]) -> bool:
        """Move unparseable lines to the corrupt file once the records around them are stored. On a full disk the
        corrupt file cannot grow: the replaying file is then cut down, in place, to those lines alone (shrinking
        needs no free space), so the space the stored records held is freed and the next replay tries again.
        Without this, a full spill disk would keep every spilled record from replaying."""
        try:
            _append_lines(self.corrupt_path, corrupt)
        except OSError as exc:
            log.error("could not quarantine %d spill lines (%s); keeping only them in %s", len(corrupt), exc,
                      self.replaying_path)
            with open(self.replaying_path, "r+b") as handle:
                handle.write(b"".join(line + b"\n" for line in corrupt))
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())
            return False
        self.counts["quarantined"] += len(corrupt)
        return True


def record_bytes(record: TrafficRecord) -> int:
    """What a queued record holds in text, for the queue's byte bound (characters, a close enough proxy)."""
    return (len(record.prompt_text) + len(record.completion or "")
            + sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 0 for m in record.messages))


class PartialAppend(OSError):
    """An append that failed part-way (a full disk): `written` lines went in whole, the rest did not."""

    def __init__(self, written: int) -> None:
        super().__init__(f"{written} lines written before the failure")
        self.written = written


def _append_lines(path: Path, lines: list[bytes]) -> None:
    """Append whole lines, fsynced; a torn last line left by a crash is first closed off, so it stays one bad line
    instead of corrupting the record appended after it. Each line is written with its own system call, so when the
    disk fills part-way, PartialAppend says how many lines are whole on disk (they will be replayed)."""
    written = 0
    with open(path, "a+b", buffering=0) as handle:
        fd = handle.fileno()
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
            for line in lines:
                data = memoryview(prefix + line + b"\n")
                prefix = b""
                while data:
                    data = data[os.write(fd, data):]
                written += 1
            os.fsync(fd)
        except OSError as exc:
            if written == 0:
                raise
            raise PartialAppend(written) from exc


def spilled_records(path: Path) -> list[dict[str, Any]]:
    """The records waiting in a spill file and in an interrupted replay (for `tuneloop status` and tests); lines
    that do not parse are not records and are left to the writer's quarantine."""
    found = []
    replays = [p for p in path.parent.glob(f"{LEGACY_REPLAYING}*") if not p.name.endswith(".tidy")]
    for candidate in (path, *sorted(replays)):
        if not candidate.exists():
            continue
        for line in candidate.read_bytes().split(b"\n"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found
