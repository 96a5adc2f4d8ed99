"""Incidents: one open incident per task and policy rule, and the rule ids that name them.

`RuleId` is built by the policy (monitor/policy.py) and parsed back here, when a row becomes an `Incident`, and
nowhere else: the conductor reads `incident.rule.dataset` to tell retraining which challenger set breached, the
exporter and the CLI print `str(incident.rule)`. The incident store is the only code that touches incident rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import select

from tuneloop.errors import StoreError
from tuneloop.store import Store
from tuneloop.tables import IncidentRow
from tuneloop.timewindow import as_utc

log = logging.getLogger(__name__)

RuleKind = Literal["floor", "drop", "drift", "estimate"]
IncidentStatus = Literal["open", "resolved"]
Verdict = Literal["breach", "holds", "no_data"]


class CorruptIncident(StoreError):
    """An incident row whose rule id or status tuneloop did not write."""


@dataclass(frozen=True, order=True)
class RuleId:
    """Which rule an incident is about: `floor:<metric>:<dataset>`, `drop:<metric>:<dataset>`, `drift` or
    `estimate:<metric>:live` (the live-traffic estimate under the floor, monitor/policy.py).

    `dataset` is the short name of the configured set (`other-topics`, not `sentiment/other-topics@2`), so the id
    stays the same across dataset versions and judge splits; its string form is the incidents table's `rule` and
    the `rule` label of `tuneloop_incidents_open`."""

    kind: RuleKind
    metric: str | None = None
    dataset: str | None = None

    @classmethod
    def floor(cls, metric: str, dataset: str) -> RuleId:
        return cls("floor", metric, dataset)

    @classmethod
    def drop(cls, metric: str, dataset: str) -> RuleId:
        return cls("drop", metric, dataset)

    @classmethod
    def drift(cls) -> RuleId:
        return cls("drift")

    @classmethod
    def estimate(cls, metric: str) -> RuleId:
        return cls("estimate", metric, "live")

    @classmethod
    def parse(cls, text: str) -> RuleId:
        kind, *rest = text.split(":")
        if kind == "drift" and not rest:
            return cls.drift()
        if len(rest) == 2 and all(rest):
            if kind == "floor":
                return cls.floor(*rest)
            if kind == "drop":
                return cls.drop(*rest)
            if kind == "estimate" and rest[1] == "live":
                return cls.estimate(rest[0])
        raise ValueError(f"'{text}' is not a rule id (floor:<metric>:<dataset>, drop:<metric>:<dataset>, drift or "
                         "estimate:<metric>:live)")

    def __str__(self) -> str:
        return self.kind if self.kind == "drift" else f"{self.kind}:{self.metric}:{self.dataset}"


@dataclass(frozen=True)
class RuleCheck:
    """One rule's verdict on a task's latest data; `facts` are the numbers behind it (stored with an incident)."""

    rule: RuleId
    verdict: Verdict
    message: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Incident:
    id: int
    task: str
    rule: RuleId
    status: IncidentStatus
    opened_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    breaches: int
    message: str
    facts: dict[str, Any]


@dataclass
class IncidentChanges:
    """What applying a task's rule checks did to its incidents."""

    opened: list[Incident] = field(default_factory=list)
    refreshed: list[int] = field(default_factory=list)
    resolved: list[Incident] = field(default_factory=list)
    suppressed: list[RuleId] = field(default_factory=list)


class IncidentStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def list(self, *, task: str | None = None, status: IncidentStatus | None = "open") -> list[Incident]:
        query = select(IncidentRow).order_by(IncidentRow.id.desc())
        if task:
            query = query.where(IncidentRow.task == task)
        if status:
            query = query.where(IncidentRow.status == status)
        with self.store.session() as session:
            return [_to_incident(r) for r in session.scalars(query)]

    def open_counts(self) -> dict[tuple[str, RuleId], int]:
        """Open incidents per (task, rule), with a zero for every rule that ever had one."""
        counts: dict[tuple[str, RuleId], int] = {}
        with self.store.session() as session:
            for row in session.execute(select(IncidentRow.id, IncidentRow.task, IncidentRow.rule, IncidentRow.status)):
                key = (row.task, _rule(row.id, row.rule))
                counts[key] = counts.get(key, 0) + (row.status == "open")
        return counts

    def apply(self, task: str, checks: Sequence[RuleCheck], *, now: datetime, cooldown: timedelta) -> IncidentChanges:
        """Open an incident per breach (unless one is open: then refresh it; or the rule resolved within
        `cooldown`: then suppress it) and resolve the open incident of every rule that holds again. Rules without
        data are left alone. One transaction."""
        changes = IncidentChanges()
        with self.store.session() as session:
            for check in checks:
                if check.verdict == "no_data":
                    continue
                rule = str(check.rule)
                detail = {"message": check.message, **check.facts}
                open_row = session.scalars(select(IncidentRow).where(
                    IncidentRow.task == task, IncidentRow.rule == rule, IncidentRow.status == "open")).first()
                if check.verdict == "holds":
                    if open_row is not None:
                        open_row.status, open_row.resolved_at = "resolved", now
                        changes.resolved.append(_to_incident(open_row))
                    continue
                if open_row is not None:
                    open_row.last_seen_at, open_row.breaches, open_row.detail = now, open_row.breaches + 1, detail
                    changes.refreshed.append(open_row.id)
                    continue
                last = session.scalars(select(IncidentRow).where(
                    IncidentRow.task == task, IncidentRow.rule == rule, IncidentRow.status == "resolved")
                    .order_by(IncidentRow.resolved_at.desc()).limit(1)).first()
                if last is not None and last.resolved_at and now - as_utc(last.resolved_at) < cooldown:
                    changes.suppressed.append(check.rule)
                    log.info("%s: %s breached again within its cooldown; no new incident", task, rule)
                    continue
                row = IncidentRow(task=task, rule=rule, status="open", opened_at=now, last_seen_at=now, breaches=1,
                                  detail=detail)
                session.add(row)
                session.flush()
                changes.opened.append(_to_incident(row))
        return changes


def _rule(row_id: int, text: str) -> RuleId:
    try:
        return RuleId.parse(text)
    except ValueError as exc:
        raise CorruptIncident(f"incident {row_id}: {exc}") from None


def _to_incident(row: IncidentRow) -> Incident:
    if row.status not in get_args(IncidentStatus):
        raise CorruptIncident(f"incident {row.id}: status '{row.status}' is neither open nor resolved")
    status: IncidentStatus = "open" if row.status == "open" else "resolved"
    detail = dict(row.detail or {})
    message = str(detail.pop("message", ""))
    return Incident(id=row.id, task=row.task, rule=_rule(row.id, row.rule), status=status,
                    opened_at=as_utc(row.opened_at), last_seen_at=as_utc(row.last_seen_at),
                    resolved_at=as_utc(row.resolved_at) if row.resolved_at else None, breaches=row.breaches,
                    message=message, facts=detail)
