"""Running a scheduled job, and the record of every run.

APScheduler persists a job as a reference to a module-level function plus plain arguments, so the job is
`run_job(database_url, job, task, attempt)`; the live objects it needs (config, store, what each job kind does)
are found through `ACTIVE`, where the scheduler holding the lease for that database registers itself. `execute`
is the sequence of one run, the same whoever calls it (the scheduler, or `tuneloop demo` through the conductor):
a job_runs row, the job function, then either the host's `after_success` (the conductor's policy -> retraining ->
watch) or, when it raised, the failure recorded (`job_failed` event, failure counter) and a retry with a doubling
delay up to monitor.retry_attempts.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from tuneloop.config import Config
from tuneloop.events import record_event
from tuneloop.store import Store
from tuneloop.tables import JobRunRow

log = logging.getLogger(__name__)

JobKind = Literal["eval", "drift"]
JOB_KINDS: tuple[JobKind, ...] = ("eval", "drift")


@dataclass(frozen=True)
class EvalJobResult:
    """A scheduled eval: the champion's run id on each judged set (dataset ref -> run)."""

    adapter: str
    runs: dict[str, int]


@dataclass(frozen=True)
class DriftJobResult:
    run_id: int
    drifted: bool


@dataclass(frozen=True)
class Skipped:
    """Nothing to do yet (no champion, too little traffic): a quiet success, not a failure."""

    reason: str


ScheduledResult = EvalJobResult | DriftJobResult | Skipped
JobFunction = Callable[[str], ScheduledResult]


class JobHost(Protocol):
    """The scheduler side a job needs: runners, identity, and a way to schedule a retry."""

    config: Config
    store: Store
    holder: str
    runners: dict[JobKind, JobFunction]

    def holds_lease(self) -> bool: ...

    def schedule_retry(self, job: JobKind, task: str, attempt: int, delay_s: float) -> None: ...

    def after_success(self, job: JobKind, task: str) -> None: ...


ACTIVE: dict[str, JobHost] = {}


@dataclass(frozen=True)
class JobOutcome:
    status: Literal["ok", "failed"]
    result: ScheduledResult | None = None
    error: str | None = None


def run_job(database_url: str, job: JobKind, task: str, attempt: int = 1) -> None:
    """Entry point APScheduler calls (by reference) for every scheduled run."""
    host = ACTIVE.get(database_url)
    if host is None or not host.holds_lease():
        log.warning("skipping %s:%s: this process does not hold the scheduler lease", job, task)
        return
    execute(host, job, task, attempt)


def execute(host: JobHost, job: JobKind, task: str, attempt: int = 1) -> JobOutcome:
    with host.store.session() as session:
        row = JobRunRow(job=job, task=task, status="running", attempt=attempt, holder=host.holder)
        session.add(row)
        session.flush()
        run_id = row.id
    try:
        result = host.runners[job](task)
        outcome = JobOutcome("ok", result)
    except Exception as exc:  # a scheduled job must never take the scheduler down; it is recorded instead
        log.error("scheduled %s of %s failed (attempt %d): %s", job, task, attempt, exc)
        outcome = JobOutcome("failed", error=f"{type(exc).__name__}: {exc}")
        log.debug("%s", traceback.format_exc())
    with host.store.session() as session:
        stored = session.get(JobRunRow, run_id)
        assert stored is not None
        stored.status, stored.finished_at, stored.error = outcome.status, datetime.now(UTC), outcome.error
    if outcome.status == "failed":
        retry = attempt < host.config.monitor.retry_attempts
        delay = host.config.monitor.retry_delay_s * 2 ** (attempt - 1)
        record_event(host.store, "job_failed", f"{job} of {task} failed (attempt {attempt}"
                     f"{f', retry in {delay:.0f}s' if retry else ', giving up'}): {outcome.error}", task=task,
                     payload={"job": job, "attempt": attempt, "error": outcome.error, "retry": retry})
        if retry:
            host.schedule_retry(job, task, attempt + 1, delay)
    else:
        host.after_success(job, task)
    return outcome
