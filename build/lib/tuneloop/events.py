"""Append-only event log: what happened, to which task, with the facts as a JSON payload."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from tuneloop.store import Store
from tuneloop.tables import EventRow


class Event(BaseModel):
    """One event as shown to users and exporters."""

    id: int
    created_at: datetime
    kind: str
    task: str | None
    message: str
    payload: dict[str, Any]


def record_event(store: Store, kind: str, message: str, *, task: str | None = None,
                 payload: dict[str, Any] | None = None) -> None:
    with store.session() as session:
        session.add(EventRow(kind=kind, task=task, message=message, payload=payload or {}))


def list_events(store: Store, *, kind: str | None = None, task: str | None = None, limit: int = 100) -> list[Event]:
    query = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
    if kind:
        query = query.where(EventRow.kind == kind)
    if task:
        query = query.where(EventRow.task == task)
    with store.session() as session:
        return [Event.model_validate(row, from_attributes=True) for row in session.scalars(query)]
