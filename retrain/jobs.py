"""The job store: retraining jobs and their triggers in the database, as typed records (retrain/records.py).

States: queued -> training -> evaluating -> promoted | rejected | failed; a promoted job becomes rolled_back when
its watch undoes the promotion. A trigger that arrives while the task has an unfinished job is attached to that
job instead of queueing a duplicate, and a trigger whose key was seen before (a replayed Alertmanager
notification, an incident already handled) changes nothing.

This module is the only place job rows become records and back; every write is a named method with typed
arguments, so no caller sets a column by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tuneloop.errors import StoreError, TuneloopError
from tuneloop.events import record_event
from tuneloop.processes import process_alive
from tuneloop.retrain.records import (
    ACTIVE_STATES,
    FinalState,
    GateDecision,
    Job,
    JobSettings,
    JobState,
    JobTrigger,
    StageName,
    StageStatus,
    StageTiming,
    Trigger,
    WatchState,
)
from tuneloop.store import Store
from tuneloop.tables import AdapterVersionRow, AliasRow, RetrainJobRow, RetrainTriggerRow
from tuneloop.timewindow import as_utc

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 300
T = TypeVar("T")
_TRIGGER: TypeAdapter[Trigger] = TypeAdapter(Trigger)
_STATE: TypeAdapter[JobState] = TypeAdapter(JobState)
_STAGES: TypeAdapter[dict[StageName, StageTiming]] = TypeAdapter(dict[StageName, StageTiming])
_DECISION = TypeAdapter(GateDecision)
_WATCH = TypeAdapter(WatchState)
_SETTINGS = TypeAdapter(JobSettings)
_TRIGGER_COLUMNS = {"source", "key", "reason"}


class JobNotFound(TuneloopError):
    """No retraining job has this id."""

    exit_code = 4


class JobEnded(TuneloopError):
    """A worker tried to move a job that has already ended (the reaper ended it)."""


class CorruptJobRecord(StoreError):
    """A job row does not hold what the job store writes (edited by hand, or written by an unknown version)."""


@dataclass(frozen=True)
class SubmitOutcome:
    job: Job
    created: bool  # a new job was queued
    duplicate: bool  # the trigger's key was seen before: nothing changed


@dataclass(frozen=True)
class JobCounts:
    """What the Prometheus collector needs on every scrape, read without loading every job."""

    by_state: dict[tuple[str, JobState], int] = field(default_factory=dict)
    latest_stages: dict[str, dict[StageName, StageTiming]] = field(default_factory=dict)
    latest_decision: dict[str, GateDecision] = field(default_factory=dict)


class JobStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # Submission ---------------------------------------------------------------------------------------------

    def submit(self, task: str, trigger: Trigger, *, runner: str, champion_version: int | None,
               settings: JobSettings) -> SubmitOutcome:
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
                                        watch={}, settings=settings.model_dump(mode="json"))
                    session.add(row)
                    session.flush()
                    session.add(_trigger_row(row.id, task, trigger))
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
                session.add(_trigger_row(active.id, task, trigger))
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

    def _trigger_job(self, key: str) -> int | None:
        with self.store.session() as session:
            return session.scalar(select(RetrainTriggerRow.job_id).where(RetrainTriggerRow.key == key[:MAX_KEY_CHARS]))

    # Reading ------------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        with self.store.session() as session:
            row = session.get(RetrainJobRow, job_id)
            if row is None:
                raise JobNotFound(f"no retraining job {job_id}; see `tuneloop jobs list`")
            return _to_job(row, _triggers(session, [job_id]).get(job_id, []))

    def recent(self, *, task: str | None = None, limit: int = 50) -> list[Job]:
        query = select(RetrainJobRow).order_by(RetrainJobRow.id.desc()).limit(limit)
        if task:
            query = query.where(RetrainJobRow.task == task)
        with self.store.session() as session:
            rows = list(session.scalars(query))
            triggers = _triggers(session, [r.id for r in rows])
            return [_to_job(r, triggers.get(r.id, [])) for r in rows]

    def active(self) -> list[Job]:
        with self.store.session() as session:
            rows = list(session.scalars(select(RetrainJobRow).where(RetrainJobRow.active_task.is_not(None))
                                        .order_by(RetrainJobRow.id)))
            triggers = _triggers(session, [r.id for r in rows])
            return [_to_job(r, triggers.get(r.id, [])) for r in rows]

    def latest(self, task: str, state: JobState) -> Job | None:
        with self.store.session() as session:
            row = session.scalars(select(RetrainJobRow).where(RetrainJobRow.task == task, RetrainJobRow.state == state)
                                  .order_by(RetrainJobRow.id.desc()).limit(1)).first()
            return _to_job(row, _triggers(session, [row.id]).get(row.id, [])) if row else None

    def counts(self) -> JobCounts:
        """State counts per task, and the stages and gate decision of each task's latest job that has them."""
        counts = JobCounts()
        with self.store.session() as session:
            for row in session.execute(select(RetrainJobRow.id, RetrainJobRow.task, RetrainJobRow.state,
                                              RetrainJobRow.stages, RetrainJobRow.decision)
                                       .order_by(RetrainJobRow.id)):
                state = _state(row.id, row.state)
                counts.by_state[(row.task, state)] = counts.by_state.get((row.task, state), 0) + 1
                if row.stages:
                    counts.latest_stages[row.task] = _stages(row.id, row.stages)
                if row.decision:
                    counts.latest_decision[row.task] = _decision(row.id, row.decision)
        return counts

    # Progress (the worker) --------------------------------------------------------------------------------

    def claim(self, job_id: int, *, log_path: str | None) -> None:
        """The worker process announces itself: pid and host (for the reaper), first heartbeat."""
        with self._row(job_id) as row:
            row.pid, row.host, row.log_path = os.getpid(), socket.gethostname(), log_path
            row.heartbeat_at = datetime.now(UTC)

    def record_runner_ref(self, job_id: int, ref: str) -> None:
        """The runner's own name for the job (a Ray submission id), once it has accepted it."""
        with self._row(job_id) as row:
            row.runner_ref = ref

    def heartbeat(self, job_id: int) -> bool:
        """The worker is alive; False once the job has ended without it (the reaper failed it: the worker was
        thought dead, e.g. on a Ray node that lost its cluster), so the worker stops."""
        with self._row(job_id) as row:
            row.heartbeat_at = datetime.now(UTC)
            return row.state in ACTIVE_STATES

    def transition(self, job_id: int, state: JobState) -> None:
        """The worker's next state; refused once the job has ended (a reaped job's worker must not go on)."""
        with self._row(job_id) as row:
            if row.state not in ACTIVE_STATES:
                raise JobEnded(f"job {job_id} ended {row.state} ({row.error or 'no reason'}); its worker stops")
            row.state = state
        log.info("job %s: %s", job_id, state)

    def require_active(self, job_id: int) -> None:
        """Raise JobEnded unless the job is still unfinished (checked by the worker before it promotes)."""
        job = self.get(job_id)
        if not job.active:
            raise JobEnded(f"job {job_id} ended {job.state} ({job.error or 'no reason'}); its worker stops")

    def record_champion(self, job_id: int, version: int, settings: JobSettings) -> None:
        """The champion the candidate will be compared with, and the settings the job decided on."""
        with self._row(job_id) as row:
            row.champion_version, row.settings = version, settings.model_dump(mode="json")

    def record_dataset(self, job_id: int, ref: str) -> None:
        with self._row(job_id) as row:
            row.dataset_ref = ref

    def record_candidate(self, job_id: int, version: int) -> None:
        with self._row(job_id) as row:
            row.candidate_version = version

    def record_decision(self, job_id: int, decision: GateDecision) -> None:
        with self._row(job_id) as row:
            row.decision = decision.model_dump(mode="json")

    def record_watch(self, job_id: int, watch: WatchState, *, state: JobState | None = None) -> None:
        """The watch's latest findings; `state` rolled_back when it undid the promotion."""
        with self._row(job_id) as row:
            row.watch = watch.model_dump(mode="json")
            if state is not None:
                row.state = state

    @contextlib.contextmanager
    def stage(self, job_id: int, name: StageName) -> Iterator[None]:
        """Record the stage's start, end and seconds in the job (also when it fails)."""
        started, wall = time.perf_counter(), datetime.now(UTC)
        self._set_stage(job_id, name, StageTiming(started_at=wall, status="running"))
        log.info("job %s: stage %s started", job_id, name)
        status: StageStatus = "failed"
        try:
            yield
            status = "done"
        finally:
            seconds = round(time.perf_counter() - started, 2)
            self._set_stage(job_id, name, StageTiming(started_at=wall, status=status, seconds=seconds,
                                                      finished_at=datetime.now(UTC)))
            log.info("job %s: stage %s %s in %.1f s", job_id, name, status, seconds)

    def _set_stage(self, job_id: int, name: StageName, timing: StageTiming) -> None:
        with self._row(job_id) as row:
            row.stages = {**(row.stages or {}), name: timing.model_dump(mode="json")}

    def finish(self, job_id: int, state: FinalState, *, error: str | None = None,
               decision: GateDecision | None = None, watch: WatchState | None = None) -> Job:
        """Move to a final state and release the task's one-job lock."""
        self._finish(job_id, state, error=error, decision=decision, watch=watch)
        return self.get(job_id)

    def _finish(self, job_id: int, state: FinalState, *, error: str | None, decision: GateDecision | None,
                watch: WatchState | None) -> bool:
        """`finish`; True if this call ended the job. A job that already ended keeps the end it reached: a reaper
        that looked while the worker was finishing, or a worker the reaper had given up on, changes nothing."""
        with self._row(job_id) as row:
            was_active = row.state in ACTIVE_STATES
            if not was_active:
                return False  # an ended job keeps the end it reached
            row.state, row.active_task = state, None
            row.error = error if error is not None else row.error
            row.finished_at = row.finished_at or datetime.now(UTC)
            if decision is not None:
                row.decision = decision.model_dump(mode="json")
            if watch is not None:
                row.watch = watch.model_dump(mode="json")
            task = row.task
        if was_active:
            record_event(self.store, "retrain_finished", f"{task}: retraining job {job_id} {state}"
                         + (f": {error}" if error else ""), task=task, payload={"job": job_id, "state": state})
        return was_active

    @contextlib.contextmanager
    def _row(self, job_id: int) -> Iterator[RetrainJobRow]:
        with self.store.session() as session:
            # FOR UPDATE (Postgres; SQLite locks the whole database on write): the worker and a reaper in another
            # process must not both read a live job and each write an end.
            row = session.get(RetrainJobRow, job_id, with_for_update=True)
            if row is None:
                raise JobNotFound(f"no retraining job {job_id}")
            yield row
            row.updated_at = datetime.now(UTC)

    # The reaper ---------------------------------------------------------------------------------------------

    def reap(self, *, stale_after_s: float, data_dir: Path | None = None,
             release: Callable[[Job], None] | None = None,
             gone: Callable[[Job], str | None] | None = None) -> list[int]:
        """End unfinished jobs whose worker is gone (or silent for `stale_after_s`) and remove their half-written
        adapter folders under `data_dir`; returns their ids. Changes state: the scheduler process and `tuneloop
        jobs reap` call it, read commands only show `why_stale`.

        A worker that died after its candidate became champion did promote it: that job ends `promoted` with its
        watch started at the promotion's time (failing it would leave a promotion nobody watches). Any other dead
        job ends `failed`, and `release` (the serving side's unload) is handed each one that left a registered
        candidate behind, which the gate may have loaded into the engine. `gone` is the job's runner's word (Ray's
        job status), asked first because it names the cause; the heartbeat and pid decide when it has none."""
        ended = []
        for job in self.active():
            reason = (gone(job) if gone is not None else None) or why_stale(job, stale_after_s=stale_after_s)
            if reason is None:
                continue
            if data_dir is not None:
                remove_staging(data_dir, job.task, job.id)
            promoted_at = self._promoted_at(job)
            if promoted_at is not None:
                if not self._finish_promoted(job, promoted_at, reason):
                    continue  # its worker finished it in the meantime
            else:
                if not self._finish(job.id, "failed", error=reason + (f"; log: {job.log_path}" if job.log_path else ""),
                                    decision=None, watch=None):
                    continue
                if job.candidate_version is not None and release is not None:
                    try:
                        release(job)
                    except Exception as exc:  # noqa: BLE001 - costs only an engine slot; the job has ended
                        log.warning("job %s: could not release candidate %s: %s", job.id, job.candidate_ref, exc)
            ended.append(job.id)
            log.warning("job %s ended: %s", job.id, reason)
        return ended

    def _promoted_at(self, job: Job) -> datetime | None:
        """When the job's candidate became champion, if it is champion now."""
        if job.candidate_version is None:
            return None
        with self.store.session() as session:
            alias = session.get(AliasRow, (job.task, "champion"))
            champion = session.get(AdapterVersionRow, alias.adapter_id) if alias is not None else None
            if champion is None or champion.version != job.candidate_version:
                return None
            return as_utc(alias.updated_at) if alias is not None and alias.updated_at else datetime.now(UTC)

    def _finish_promoted(self, job: Job, promoted_at: datetime, reason: str) -> bool:
        watch_s = job.settings.retrain.watch_s
        previous = job.champion_version if job.champion_version is not None else job.candidate_version
        assert previous is not None
        watch = WatchState(status="watching" if watch_s > 0 else "off", promoted_at=promoted_at,
                           until=promoted_at + timedelta(seconds=watch_s), previous_version=previous,
                           through_gateway=True, reason=f"recovered by the reaper: {reason} after promoting")
        return self._finish(job.id, "promoted", error=None, decision=None, watch=watch)


def why_stale(job: Job, *, stale_after_s: float, now: datetime | None = None) -> str | None:
    """Why an unfinished job's worker must be gone (its process exited, its heartbeat lapsed, no worker ever
    claimed it), or None while it may still be running. Reads only."""
    if not job.active:
        return None
    now = now or datetime.now(UTC)
    if job.pid is not None and job.host == socket.gethostname() and not process_alive(job.pid):
        return f"worker process {job.pid} exited during '{job.state}' without finishing (killed or crashed)"
    if job.heartbeat_at is not None and (now - job.heartbeat_at).total_seconds() > stale_after_s:
        return (f"no heartbeat from worker {job.pid}@{job.host} for "
                f"{(now - job.heartbeat_at).total_seconds():.0f} s during '{job.state}'")
    if job.pid is None and (now - job.created_at).total_seconds() > stale_after_s:
        return f"no worker picked the job up within {stale_after_s:.0f} s"
    return None


def staging_prefix(job_id: int) -> str:
    """Name prefix of the folder a job's candidate is trained into before it is registered."""
    return f".training-job{job_id}-"


def remove_staging(data_dir: Path, task: str, job_id: int) -> None:
    for folder in (data_dir / "adapters" / task).glob(staging_prefix(job_id) + "*"):
        shutil.rmtree(folder, ignore_errors=True)


# Rows <-> records -----------------------------------------------------------------------------------------------

def _conflict(exc: StoreError) -> bool:
    """The store wraps driver errors; a unique-constraint conflict is the expected race, anything else is not."""
    return isinstance(exc.__cause__, IntegrityError)


def _trigger_row(job_id: int, task: str, trigger: Trigger) -> RetrainTriggerRow:
    return RetrainTriggerRow(job_id=job_id, task=task, source=trigger.source, key=trigger.key[:MAX_KEY_CHARS],
                             reason=trigger.reason, detail=trigger.model_dump(mode="json", exclude=_TRIGGER_COLUMNS),
                             created_at=datetime.now(UTC))


def _triggers(session: Session, ids: list[int]) -> dict[int, list[JobTrigger]]:
    out: dict[int, list[JobTrigger]] = {}
    if not ids:
        return out
    for t in session.scalars(select(RetrainTriggerRow).where(RetrainTriggerRow.job_id.in_(ids))
                             .order_by(RetrainTriggerRow.id)):
        trigger = _validated(t.job_id, "trigger", _TRIGGER,
                             {**t.detail, "source": t.source, "key": t.key, "reason": t.reason})
        out.setdefault(t.job_id, []).append(JobTrigger(trigger=trigger, received_at=as_utc(t.created_at)))
    return out


def _validated(job_id: int, what: str, adapter: TypeAdapter[T], value: object) -> T:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise CorruptJobRecord(f"retraining job {job_id}: its stored {what} is not a valid record ({problems}); "
                               "was it written by another tuneloop version or edited by hand?") from None


def _state(job_id: int, value: str) -> JobState:
    return _validated(job_id, "state", _STATE, value)


def _stages(job_id: int, value: dict[str, Any]) -> dict[StageName, StageTiming]:
    return _validated(job_id, "stages", _STAGES, value)


def _decision(job_id: int, value: dict[str, Any]) -> GateDecision:
    return _validated(job_id, "gate decision", _DECISION, value)


def _to_job(row: RetrainJobRow, triggers: list[JobTrigger]) -> Job:
    settings = _validated(row.id, "settings", _SETTINGS, row.settings)
    watch = _validated(row.id, "watch", _WATCH, row.watch) if row.watch else None
    return Job(id=row.id, task=row.task, state=_state(row.id, row.state), created_at=as_utc(row.created_at),
               updated_at=as_utc(row.updated_at), finished_at=as_utc(row.finished_at) if row.finished_at else None,
               runner=row.runner, runner_ref=row.runner_ref, pid=row.pid, host=row.host,
               heartbeat_at=as_utc(row.heartbeat_at) if row.heartbeat_at else None, log_path=row.log_path,
               champion_version=row.champion_version, candidate_version=row.candidate_version,
               dataset_ref=row.dataset_ref, stages=_stages(row.id, row.stages or {}),
               decision=_decision(row.id, row.decision) if row.decision else None, watch=watch, settings=settings,
               error=row.error, triggers=triggers)
