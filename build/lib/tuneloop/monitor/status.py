"""The scheduler side of `tuneloop status`: jobs and their next runs, last runs, lease holder, open incidents,
latest drift verdicts. Read from the database, so it works whether or not `tuneloop run` is up; changes nothing."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

from pydantic import BaseModel
from sqlalchemy import func, inspect, select, text

from tuneloop.monitor.incidents import Incident, IncidentStore
from tuneloop.monitor.scheduler import JOBS_TABLE
from tuneloop.store import Store
from tuneloop.tables import DriftRunRow, JobRunRow, LeaseRow
from tuneloop.timewindow import as_utc


class JobStatus(BaseModel):
    id: str
    schedule: str | None
    next_run: datetime | None
    last_status: str | None = None
    last_started: datetime | None = None
    last_error: str | None = None


class DriftStatus(BaseModel):
    run_id: int
    drifted: bool
    at: datetime | None
    window: int


class OpenIncident(BaseModel):
    id: int
    task: str
    rule: str
    opened_at: datetime
    breaches: int
    message: str

    @classmethod
    def of(cls, incident: Incident) -> OpenIncident:
        return cls(id=incident.id, task=incident.task, rule=str(incident.rule), opened_at=incident.opened_at,
                   breaches=incident.breaches, message=incident.message)


class MonitorStatus(BaseModel):
    scheduler_holder: str | None
    lease_expires: datetime | None
    jobs: list[JobStatus]
    open_incidents: list[OpenIncident]
    drift: dict[str, DriftStatus]


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def monitor_status(store: Store) -> MonitorStatus:
    jobs: dict[str, JobStatus] = {}
    if inspect(store.engine).has_table(JOBS_TABLE):
        with store.engine.connect() as connection:
            for job_id, next_run, state in connection.execute(
                    text(f"SELECT id, next_run_time, job_state FROM {JOBS_TABLE} ORDER BY id")):
                name = pickle.loads(state).get("name", job_id)  # our own rows, written by APScheduler
                schedule = name.split("[", 1)[1].rstrip("]") if "[" in name else None
                when = datetime.fromtimestamp(next_run, UTC) if next_run is not None else None
                jobs[job_id] = JobStatus(id=job_id, schedule=schedule, next_run=when)
    with store.session() as session:
        latest = select(func.max(JobRunRow.id)).group_by(JobRunRow.job, JobRunRow.task)
        for row in session.scalars(select(JobRunRow).where(JobRunRow.id.in_(latest))):
            job = jobs.setdefault(f"{row.job}:{row.task}", JobStatus(id=f"{row.job}:{row.task}", schedule=None,
                                                                    next_run=None))
            job.last_status, job.last_started, job.last_error = row.status, _aware(row.started_at), row.error
        lease = session.get(LeaseRow, "scheduler")
        latest_drift = select(func.max(DriftRunRow.id)).group_by(DriftRunRow.task)
        drift = {r.task: DriftStatus(run_id=r.id, drifted=r.drifted, at=_aware(r.created_at), window=r.n_current)
                 for r in session.scalars(select(DriftRunRow).where(DriftRunRow.id.in_(latest_drift)))}
    live = lease is not None and _aware(lease.expires_at) > datetime.now(UTC)  # type: ignore[operator]
    incidents = [OpenIncident.of(i) for i in IncidentStore(store).list()]
    return MonitorStatus(scheduler_holder=lease.holder if live and lease else None,
                         lease_expires=_aware(lease.expires_at) if live and lease else None,
                         jobs=sorted(jobs.values(), key=lambda j: j.id), open_incidents=incidents, drift=drift)
