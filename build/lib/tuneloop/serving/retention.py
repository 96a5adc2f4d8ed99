"""Retention for captured traffic: unlabelled rows past an age or beyond a row count are deleted, oldest first.

Without it the traffic table grows with every request forever (a 2 MB prompt is a 2 MB row). Each pass deletes in
batches of `batch_rows` ids, each its own transaction, so SQLite's single write lock is never held for long and
capture keeps writing between batches. Two gateways on one database may both run passes: a delete by id of rows
that are already gone deletes nothing, so the passes need no coordination.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, delete, func, select, true

from tuneloop.config import RetentionConfig
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    by_age: int
    by_size: int
    kept_unlabelled: int
    kept_labelled: int


class TrafficRetention:
    """Runs a retention pass every `settings.every_s` on a thread; `prune` is one pass (tests call it directly)."""

    def __init__(self, store: Store, settings: RetentionConfig) -> None:
        self.store, self.settings = store, settings
        self.pruned = {"age": 0, "size": 0}
        self.last: PruneResult | None = None
        self.last_run_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="traffic-retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.prune()
            except Exception as exc:  # noqa: BLE001 - the database may be away; the next pass retries
                log.warning("traffic retention: %s", exc)
            self._stop.wait(self.settings.every_s)

    def prune(self, *, now: datetime | None = None) -> PruneResult:
        now = now or datetime.now(UTC)
        prunable = self._prunable()
        by_age = 0
        if self.settings.max_age_days is not None:
            cutoff = now - timedelta(days=self.settings.max_age_days)
            by_age = self._delete_oldest(prunable & (TrafficRow.created_at < cutoff), limit=None)
        by_size = 0
        if self.settings.max_rows is not None:
            excess = self._count(prunable) - self.settings.max_rows
            if excess > 0:
                by_size = self._delete_oldest(prunable, limit=excess)
        self.pruned["age"] += by_age
        self.pruned["size"] += by_size
        labelled = TrafficRow.reference.is_not(None)
        self.last = PruneResult(by_age=by_age, by_size=by_size, kept_unlabelled=self._count(~labelled),
                                kept_labelled=self._count(labelled))
        self.last_run_at = now
        if by_age or by_size:
            log.info("traffic retention deleted %d rows past %s days and %d beyond %s rows", by_age,
                     self.settings.max_age_days, by_size, self.settings.max_rows)
        return self.last

    def _prunable(self) -> ColumnElement[bool]:
        return TrafficRow.reference.is_(None) if self.settings.keep_labelled else true()

    def _count(self, where: ColumnElement[bool]) -> int:
        with self.store.session() as session:
            return int(session.scalar(select(func.count()).select_from(TrafficRow).where(where)) or 0)

    def _delete_oldest(self, where: ColumnElement[bool], *, limit: int | None) -> int:
        """Delete up to `limit` (None: all) matching rows, oldest id first, one batch per transaction."""
        deleted = 0
        while not self._stop.is_set() and (limit is None or deleted < limit):
            size = self.settings.batch_rows if limit is None else min(self.settings.batch_rows, limit - deleted)
            with self.store.session() as session:
                ids = list(session.scalars(select(TrafficRow.id).where(where).order_by(TrafficRow.id).limit(size)))
                if not ids:
                    break
                session.execute(delete(TrafficRow).where(TrafficRow.id.in_(ids)))
            deleted += len(ids)
        return deleted
