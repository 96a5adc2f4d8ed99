"""Traffic capture off the request path: a bounded queue, batched inserts, a spill file, replay.

The gateway hands each finished request to `CaptureWriter.submit`, which never blocks: the record goes on a
bounded queue that a background thread drains into the store in batches. If the queue is full, or the database
refuses a batch, records are appended to a local JSONL spill file (fsynced) and replayed into the store once it
accepts writes again. Nothing is dropped silently: every spill, replay and (only if even the spill file cannot be
written) drop is counted, and the counters are exported as metrics.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tuneloop.store import Store
from tuneloop.tables import TrafficRow

log = logging.getLogger(__name__)


class TrafficRecord(BaseModel):
    """One captured request; text fields are already redacted."""

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


class CaptureWriter:
    """Background writer; `counts` holds captured/spilled/replayed/dropped totals for the exporter."""

    def __init__(self, store: Store, spill_dir: Path, *, max_queue: int = 10_000, batch_size: int = 200,
                 flush_interval_s: float = 0.5) -> None:
        self.store = store
        self.spill_dir = spill_dir
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue: queue.Queue[TrafficRecord] = queue.Queue(maxsize=max_queue)
        self.counts: Counter[str] = Counter()
        self._spill_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic-capture", daemon=True)
        self.spill_dir.mkdir(parents=True, exist_ok=True)

    @property
    def spill_path(self) -> Path:
        return self.spill_dir / "traffic-spill.jsonl"

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: TrafficRecord) -> None:
        """Queue a record; never blocks the request. A full queue spills to disk instead."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._spill([record], reason="queue_full")

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued, then stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._flush(self._drain(limit=None))

    def _run(self) -> None:
        last_replay = 0.0
        while not self._stop.is_set():
            batch = self._drain(limit=self.batch_size, wait=self.flush_interval_s)
            if batch:
                self._flush(batch)
            if time.monotonic() - last_replay > 5.0:
                last_replay = time.monotonic()
                self.replay_spill()

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
        return batch

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
        with self.store.session() as session:
            session.add_all(TrafficRow(**record.model_dump()) for record in batch)

    def _spill(self, records: list[TrafficRecord], *, reason: str) -> None:
        try:
            with self._spill_lock, open(self.spill_path, "a", encoding="utf-8") as handle:
                for record in records:
                    handle.write(record.model_dump_json() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.counts[f"spilled_{reason}"] += len(records)
        except OSError as exc:
            log.error("could not spill %d traffic records to %s: %s", len(records), self.spill_path, exc)
            self.counts["dropped"] += len(records)

    def replay_spill(self) -> int:
        """Insert spilled records into the store; a record already stored (same request_id) is skipped."""
        with self._spill_lock:
            if not self.spill_path.exists():
                return 0
            replaying = self.spill_path.with_suffix(".replaying")
            os.replace(self.spill_path, replaying)
        records = [TrafficRecord.model_validate_json(line) for line in
                   replaying.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            with self.store.session() as session:
                stored = {r for (r,) in session.query(TrafficRow.request_id).filter(
                    TrafficRow.request_id.in_([rec.request_id for rec in records]))}
            fresh = [r for r in records if r.request_id not in stored]
            if fresh:
                self._insert(fresh)
        except Exception as exc:
            log.warning("replay of %d spilled records failed (%s); keeping them", len(records), exc)
            with self._spill_lock, open(self.spill_path, "a", encoding="utf-8") as handle:
                handle.write(replaying.read_text(encoding="utf-8"))
            replaying.unlink()
            return 0
        replaying.unlink()
        self.counts["replayed"] += len(fresh)
        return len(fresh)


def spilled_records(path: Path) -> list[dict[str, Any]]:
    """The records waiting in a spill file (for `tuneloop status` and tests)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
