"""The scheduler side of `tuneloop status`: jobs and their next runs, last runs, lease holder, open incidents,
latest drift verdicts. Read from the database, so it works whether or not `tuneloop run` is up."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, inspect, select, text

from tuneloop.monitor.policy import list_incidents
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


class MonitorStatus(BaseModel):
    scheduler_holder: str | None
    lease_expires: datetime | None
    jobs: list[JobStatus]
    open_incidents: list[dict[str, Any]]
    drift: dict[str, dict[str, Any]]
    retrain: dict[str, dict[str, Any]] = {}


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
        drift = {r.task: {"run_id": r.id, "drifted": r.drifted, "at": _aware(r.created_at), "window": r.n_current}
                 for r in session.scalars(select(DriftRunRow).where(DriftRunRow.id.in_(latest_drift)))}
    live = lease is not None and _aware(lease.expires_at) > datetime.now(UTC)  # type: ignore[operator]
    incidents = [{"id": i.id, "task": i.task, "rule": i.rule, "opened_at": i.opened_at, "breaches": i.breaches,
                  "message": i.detail.get("message")} for i in list_incidents(store)]
    from tuneloop.retrain.jobs import JobStore

    retrain: dict[str, dict[str, Any]] = {}
    for retrain_job in JobStore(store).recent(limit=200):
        retrain.setdefault(retrain_job.task, {
            "job": retrain_job.id, "state": retrain_job.state, "updated_at": retrain_job.updated_at,
            "candidate": f"{retrain_job.task}@{retrain_job.candidate_version}" if retrain_job.candidate_version
            else None, "watch": retrain_job.watch.get("status")})
    return MonitorStatus(scheduler_holder=lease.holder if live and lease else None,
                         lease_expires=_aware(lease.expires_at) if live and lease else None,
                         jobs=sorted(jobs.values(), key=lambda j: j.id), open_incidents=incidents, drift=drift,
                         retrain=retrain)
