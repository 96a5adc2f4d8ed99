"""Retraining job records: one active job per task, its triggers, states, stage timings and outcome.

States: queued -> training -> evaluating -> promoted | rejected | failed; a promoted job becomes rolled_back when
its watch undoes the promotion. A trigger that arrives while the task has an unfinished job is attached to that
job instead of queueing a duplicate, and a trigger whose key was seen before (a replayed Alertmanager
notification, an incident already handled) changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tuneloop.errors import StoreError, TuneloopError
from tuneloop.events import record_event
from tuneloop.store import Store
from tuneloop.tables import RetrainJobRow, RetrainTriggerRow
from tuneloop.timewindow import as_utc

log = logging.getLogger(__name__)

JobState = Literal["queued", "training", "evaluating", "promoted", "rejected", "failed", "rolled_back"]
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "training", "evaluating")
FINAL_STATES: tuple[JobState, ...] = ("promoted", "rejected", "failed", "rolled_back")
TriggerSource = Literal["incident", "alertmanager", "manual"]


class JobNotFound(TuneloopError):
    """No retraining job has this id."""

    exit_code = 4


@dataclass(frozen=True)
class Trigger:
    """Why retraining is asked for. `key` identifies the request: the same key twice is one request."""

    source: TriggerSource
    key: str
    reason: str
    detail: dict[str, Any]


class TriggerRecord(BaseModel):
    source: str
    key: str
    reason: str
    detail: dict[str, Any]
    created_at: datetime


class Job(BaseModel):
    id: int
    task: str
    state: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    runner: str
    pid: int | None
    host: str | None
    heartbeat_at: datetime | None
    log_path: str | None
    champion_version: int | None
    candidate_version: int | None
    dataset_ref: str | None
    stages: dict[str, Any]
    decision: dict[str, Any]
    watch: dict[str, Any]
    settings: dict[str, Any]
    error: str | None
    triggers: list[TriggerRecord]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True)
class SubmitOutcome:
    job: Job
    created: bool  # a new job was queued
    duplicate: bool  # the trigger's key was seen before: nothing changed


class JobStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # Submission ---------------------------------------------------------------------------------------------

    def submit(self, task: str, trigger: Trigger, *, runner: str, champion_version: int | None,
               settings: dict[str, Any]) -> SubmitOutcome:
        """Queue a job for `task`, or attach the trigger to its unfinished one; atomic under concurrency."""
        for _attempt in range(5):
            seen = self._trigger_job(trigger.key)
            if seen is not None:
                return SubmitOutcome(self.get(seen), created=False, duplicate=True)
            try:
                with self.store.session() as session:
                    now = datetime.now(UTC)
                    row = RetrainJobRow(task=task, state="queued", active_task=task, created_at=now, updated_at=now,
                                        runner=runner, champion_version=champion_version, stages={}, decision={},
                                        watch={}, settings=settings)
                    session.add(row)
                    session.flush()
                    session.add(self._trigger_row(row.id, task, trigger))
                    job_id = row.id
            except StoreError as exc:
                if not _conflict(exc):
                    raise
                attached = self._attach(task, trigger)
                if attached is None:
                    continue  # the active job finished in between, or the key raced in: look again
                return attached
            record_event(self.store, "retrain_started", f"{task}: retraining job {job_id} queued ({trigger.reason})",
                         task=task, payload={"job": job_id, "source": trigger.source, "key": trigger.key})
            return SubmitOutcome(self.get(job_id), created=True, duplicate=False)
        raise TuneloopError(f"could not queue or join a retraining job for '{task}' (concurrent updates)")

    def _attach(self, task: str, trigger: Trigger) -> SubmitOutcome | None:
        try:
            with self.store.session() as session:
                active = session.scalars(select(RetrainJobRow).where(RetrainJobRow.active_task == task)).first()
                if active is None:
                    return None
                session.add(self._trigger_row(active.id, task, trigger))
                active.updated_at = datetime.now(UTC)
                job_id = active.id
        except StoreError as exc:
            if not _conflict(exc):
                raise
            seen = self._trigger_job(trigger.key)
            return SubmitOutcome(self.get(seen), created=False, duplicate=True) if seen is not None else None
        record_event(self.store, "retrain_trigger_attached", f"{task}: {trigger.source} trigger joined running job "
                     f"{job_id} ({trigger.reason})", task=task, payload={"job": job_id, "key": trigger.key})
        return SubmitOutcome(self.get(job_id), created=False, duplicate=False)

    @staticmethod
    def _trigger_row(job_id: int, task: str, trigger: Trigger) -> RetrainTriggerRow:
        return RetrainTriggerRow(job_id=job_id, task=task, source=trigger.source, key=trigger.key[:300],
                                 reason=trigger.reason, detail=trigger.detail, created_at=datetime.now(UTC))

    def _trigger_job(self, key: str) -> int | None:
        with self.store.session() as session:
            return session.scalar(select(RetrainTriggerRow.job_id).where(RetrainTriggerRow.key == key[:300]))

    # Reading ------------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        with self.store.session() as session:
            row = session.get(RetrainJobRow, job_id)
            if row is None:
                raise JobNotFound(f"no retraining job {job_id}; see `tuneloop jobs list`")
            return _to_job(row, self._triggers(session, [job_id]).get(job_id, []))

    def recent(self, *, task: str | None = None, limit: int = 50) -> list[Job]:
        query = select(RetrainJobRow).order_by(RetrainJobRow.id.desc()).limit(limit)
        if task:
            query = query.where(RetrainJobRow.task == task)
        with self.store.session() as session:
            rows = list(session.scalars(query))
            triggers = self._triggers(session, [r.id for r in rows])
            return [_to_job(r, triggers.get(r.id, [])) for r in rows]

    def latest(self, task: str, state: str) -> Job | None:
        with self.store.session() as session:
            row = session.scalars(select(RetrainJobRow).where(RetrainJobRow.task == task, RetrainJobRow.state == state)
                                  .order_by(RetrainJobRow.id.desc()).limit(1)).first()
            return _to_job(row, self._triggers(session, [row.id]).get(row.id, [])) if row else None

    @staticmethod
    def _triggers(session: Any, ids: list[int]) -> dict[int, list[TriggerRecord]]:
        out: dict[int, list[TriggerRecord]] = {}
        if not ids:
            return out
        for t in session.scalars(select(RetrainTriggerRow).where(RetrainTriggerRow.job_id.in_(ids))
                                 .order_by(RetrainTriggerRow.id)):
            out.setdefault(t.job_id, []).append(TriggerRecord(source=t.source, key=t.key, reason=t.reason,
                                                              detail=t.detail, created_at=as_utc(t.created_at)))
        return out

    # Progress -----------------------------------------------------------------------------------------------

    def update(self, job_id: int, **values: Any) -> None:
        with self.store.session() as session:
            row = session.get(RetrainJobRow, job_id)
            if row is None:
                raise JobNotFound(f"no retraining job {job_id}")
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = datetime.now(UTC)

    def claim(self, job_id: int, *, log_path: str | None) -> None:
        """The worker process announces itself: pid and host (for the reaper), first heartbeat."""
        self.update(job_id, pid=os.getpid(), host=socket.gethostname(), heartbeat_at=datetime.now(UTC),
                    log_path=log_path)

    def transition(self, job_id: int, state: JobState) -> None:
        self.update(job_id, state=state)
        log.info("job %s: %s", job_id, state)

    @contextlib.contextmanager
    def stage(self, job_id: int, name: str) -> Iterator[None]:
        """Record the stage's start, end and seconds in the job (also when it fails)."""
        started, wall = time.perf_counter(), datetime.now(UTC)
        self._set_stage(job_id, name, {"started_at": wall.isoformat(), "status": "running"})
        log.info("job %s: stage %s started", job_id, name)
        status = "failed"
        try:
            yield
            status = "done"
        finally:
            seconds = round(time.perf_counter() - started, 2)
            self._set_stage(job_id, name, {"started_at": wall.isoformat(), "seconds": seconds, "status": status,
                                           "finished_at": datetime.now(UTC).isoformat()})
            log.info("job %s: stage %s %s in %.1f s", job_id, name, status, seconds)

    def _set_stage(self, job_id: int, name: str, value: dict[str, Any]) -> None:
        with self.store.session() as session:
            row = session.get(RetrainJobRow, job_id)
            if row is not None:
                row.stages = {**(row.stages or {}), name: value}
                row.updated_at = datetime.now(UTC)

    def heartbeat(self, job_id: int) -> None:
        self.update(job_id, heartbeat_at=datetime.now(UTC))

    def finish(self, job_id: int, state: JobState, *, error: str | None = None, **values: Any) -> Job:
        """Move to a final state and release the task's one-job lock."""
        assert state in FINAL_STATES
        with self.store.session() as session:
            row = session.get(RetrainJobRow, job_id)
            if row is None:
                raise JobNotFound(f"no retraining job {job_id}")
            was_active = row.state in ACTIVE_STATES
            row.state, row.active_task, row.error = state, None, error if error is not None else row.error
            row.finished_at = row.finished_at or datetime.now(UTC)
            row.updated_at = datetime.now(UTC)
            for key, value in values.items():
                setattr(row, key, value)
            task = row.task
        if was_active:
            record_event(self.store, "retrain_finished", f"{task}: retraining job {job_id} {state}"
                         + (f": {error}" if error else ""), task=task, payload={"job": job_id, "state": state})
        return self.get(job_id)

    def reap(self, *, stale_after_s: float, data_dir: Path | None = None) -> list[int]:
        """Mark unfinished jobs whose worker is gone (or silent for `stale_after_s`) failed and remove their
        half-written adapter folders under `data_dir`; returns their ids."""
        now, host = datetime.now(UTC), socket.gethostname()
        failed = []
        for job in self.recent(limit=1000):
            if not job.active:
                continue
            reason = None
            if job.pid is not None and job.host == host and not process_alive(job.pid):
                reason = f"worker process {job.pid} exited during '{job.state}' without finishing (killed or crashed)"
            elif job.heartbeat_at is not None and (now - job.heartbeat_at).total_seconds() > stale_after_s:
                reason = (f"no heartbeat from worker {job.pid}@{job.host} for "
                          f"{(now - job.heartbeat_at).total_seconds():.0f} s during '{job.state}'")
            elif job.pid is None and (now - job.created_at).total_seconds() > stale_after_s:
                reason = f"no worker picked the job up within {stale_after_s:.0f} s"
            if reason:
                if data_dir is not None:
                    remove_staging(data_dir, job.task, job.id)
                self.finish(job.id, "failed", error=reason + (f"; log: {job.log_path}" if job.log_path else ""))
                failed.append(job.id)
                log.warning("job %s failed: %s", job.id, reason)
        return failed


def staging_prefix(job_id: int) -> str:
    """Name prefix of the folder a job's candidate is trained into before it is registered."""
    return f".training-job{job_id}-"


def remove_staging(data_dir: Path, task: str, job_id: int) -> None:
    for folder in (data_dir / "adapters" / task).glob(staging_prefix(job_id) + "*"):
        shutil.rmtree(folder, ignore_errors=True)


def _conflict(exc: StoreError) -> bool:
    """The store wraps driver errors; a unique-constraint conflict is the expected race, anything else is not."""
    return isinstance(exc.__cause__, IntegrityError)


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a dead child its parent has not waited for yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _to_job(row: RetrainJobRow, triggers: list[TriggerRecord]) -> Job:
    return Job(id=row.id, task=row.task, state=row.state, created_at=as_utc(row.created_at),
               updated_at=as_utc(row.updated_at), finished_at=as_utc(row.finished_at) if row.finished_at else None,
               runner=row.runner, pid=row.pid, host=row.host,
               heartbeat_at=as_utc(row.heartbeat_at) if row.heartbeat_at else None, log_path=row.log_path,
               champion_version=row.champion_version, candidate_version=row.candidate_version,
               dataset_ref=row.dataset_ref, stages=row.stages or {}, decision=row.decision or {},
               watch=row.watch or {}, settings=row.settings or {}, error=row.error, triggers=triggers)
