"""The single-scheduler lock: a lease row in the database, taken and renewed with one conditional UPDATE.

Two APScheduler instances on one job store both run every job, so only the holder of this lease starts its
scheduler. The UPDATE `... WHERE holder = me OR expires_at < now` is atomic on SQLite (one writer at a time) and on
Postgres (row lock), so two processes can never both hold it; a holder that dies stops renewing, its lease lapses
after `ttl_s`, and a standby `tuneloop run` takes over.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, update
from sqlalchemy.exc import IntegrityError

from tuneloop.store import Store
from tuneloop.tables import LeaseRow

SCHEDULER_LEASE = "scheduler"


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, store: Store, *, name: str = SCHEDULER_LEASE, holder: str | None = None,
                 ttl_s: float = 30.0) -> None:
        self.store, self.name, self.ttl_s = store, name, ttl_s
        self.holder = holder or default_holder()

    def try_acquire(self) -> bool:
        """Take or renew the lease; False while another holder's lease is live."""
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.ttl_s)
        with self.store.engine.begin() as connection:
            taken = connection.execute(
                update(LeaseRow).where(LeaseRow.name == self.name,
                                       (LeaseRow.holder == self.holder) | (LeaseRow.expires_at < now))
                .values(holder=self.holder, expires_at=expires)).rowcount
        if taken:
            return True
        try:
            with self.store.engine.begin() as connection:
                connection.execute(insert(LeaseRow).values(name=self.name, holder=self.holder, expires_at=expires))
            return True
        except IntegrityError:
            return False

    def release(self) -> None:
        with self.store.engine.begin() as connection:
            connection.execute(delete(LeaseRow).where(LeaseRow.name == self.name, LeaseRow.holder == self.holder))
