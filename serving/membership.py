"""Which gateways share this database now: each announces itself every serving.alias_poll_s and counts the others
seen within three polls.

What the count is for: a key's rate limit is enforced in memory by each gateway (serving/ratelimit.py), so each
takes an equal share of it: N gateways behind a balancer then admit the key's limit in total, not N times it,
without a database round trip per request. A gateway that stops removes its row; one that dies ages out after three
polls. While the database is away the last count stands.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select

from tuneloop.store import Store
from tuneloop.tables import GatewayRow

log = logging.getLogger(__name__)
STALE_POLLS = 3
FORGET_AFTER = timedelta(days=1)


class GatewayMembership:
    def __init__(self, store: Store, url: str, *, poll_s: float) -> None:
        self.store, self.url, self.poll_s = store, url, poll_s
        self.gateway_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._live = 1
        self._lock = threading.Lock()
        self._started_at = datetime.now(UTC)

    @property
    def live(self) -> int:
        """Gateways on this database, this one included (at least 1)."""
        with self._lock:
            return self._live

    def beat(self) -> int:
        """Announce this gateway and count the live ones; returns the count."""
        now = datetime.now(UTC)
        with self.store.session() as session:
            row = session.get(GatewayRow, self.gateway_id)
            if row is None:
                session.add(GatewayRow(id=self.gateway_id, url=self.url, started_at=self._started_at, seen_at=now))
            else:
                row.seen_at = now
            session.execute(delete(GatewayRow).where(GatewayRow.seen_at < now - FORGET_AFTER))
        with self.store.session() as session:
            since = now - timedelta(seconds=self.poll_s * STALE_POLLS)
            count = int(session.scalar(select(func.count()).select_from(GatewayRow)
                                       .where(GatewayRow.seen_at >= since)) or 0)
        with self._lock:
            self._live = max(1, count)
            return self._live

    def leave(self) -> None:
        """Remove this gateway's row (an orderly stop): the others take its share at their next poll."""
        try:
            with self.store.session() as session:
                session.execute(delete(GatewayRow).where(GatewayRow.id == self.gateway_id))
        except Exception as exc:  # noqa: BLE001 - it ages out anyway
            log.warning("could not remove gateway %s from the database: %s", self.gateway_id, exc)
