"""The scheduler of `tuneloop run`: per task, evaluation of the champion and a drift check, on intervals or cron.

APScheduler 3.x with its SQLAlchemy job store in tuneloop's own database, so jobs and their next run times survive
a restart; missed runs are coalesced into one and run if missed by less than monitor.misfire_grace_s; one
instance of a job runs at a time. Only the holder of the single-scheduler lease (monitor/lease.py) starts its
APScheduler; a standby process keeps trying and takes over when the holder's lease lapses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from tuneloop.config import Config, parse_interval
from tuneloop.monitor import jobs
from tuneloop.monitor.jobs import JOB_KINDS, JobFunction, JobKind
from tuneloop.monitor.lease import Lease
from tuneloop.store import Store

log = logging.getLogger(__name__)

JOBS_TABLE = "apscheduler_jobs"
FIRST_RUN_DELAY_S = 3  # a new job runs soon after start, once the gateway listens


@dataclass(frozen=True)
class JobSpec:
    job: JobKind
    task: str
    schedule: str

    @property
    def id(self) -> str:
        return f"{self.job}:{self.task}"

    @property
    def name(self) -> str:
        """Stored with the job; a changed schedule changes the name, so the job is replaced, else kept."""
        return f"{self.id} [{self.schedule}]"

    def trigger(self) -> Any:
        if len(self.schedule.split()) == 5:
            return CronTrigger.from_crontab(self.schedule, timezone=UTC)
        return IntervalTrigger(seconds=parse_interval(self.schedule), timezone=UTC)


def job_specs(config: Config) -> list[JobSpec]:
    specs = []
    for task, task_config in config.tasks.items():
        for kind in JOB_KINDS:
            schedule = task_config.schedule.eval if kind == "eval" else task_config.schedule.drift
            if schedule:
                specs.append(JobSpec(kind, task, schedule))
    return specs


class TuneloopScheduler:
    """Lease-guarded APScheduler. `runners` maps a job kind to what it does for a task (tests pass their own)."""

    def __init__(self, config: Config, store: Store, runners: dict[JobKind, JobFunction], *,
                 holder: str | None = None, on_success: Callable[[JobKind, str], object] | None = None) -> None:
        self.config, self.store, self.runners = config, store, runners
        self.lease = Lease(store, holder=holder, ttl_s=config.monitor.lease_s)
        self.holder = self.lease.holder
        self.on_success = on_success
        self._scheduler: BackgroundScheduler | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    # Lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the lease loop in the background; the APScheduler starts once the lease is held."""
        self._tick()
        self._thread = threading.Thread(target=self._loop, name="scheduler-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        # Do not wait for a running eval (minutes): it fails fast once the engine stops, and is recorded so.
        self._stop_scheduler(wait=False)
        if self._held:
            self.lease.release()
            self._held = False

    def _loop(self) -> None:
        while not self._stop.wait(self.config.monitor.lease_s / 3):
            self._tick()

    def _tick(self) -> None:
        try:
            held = self.lease.try_acquire()
        except Exception as exc:  # the database is away: stop scheduling rather than risk a second scheduler
            log.error("cannot renew the scheduler lease: %s", exc)
            held = False
        if held and self._scheduler is None:
            log.info("scheduler lease taken by %s; starting jobs", self.holder)
            self._held = True
            self._start_scheduler()
        elif not held and self._scheduler is not None:
            log.warning("scheduler lease lost by %s; stopping jobs", self.holder)
            self._held = False
            self._stop_scheduler(wait=False)

    def holds_lease(self) -> bool:
        return self._held and not self._stop.is_set()

    def _start_scheduler(self) -> None:
        grace = int(self.config.monitor.misfire_grace_s)
        scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.store.engine, tablename=JOBS_TABLE)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": grace}, timezone=UTC)
        jobs.ACTIVE[self.store.url] = self
        scheduler.start(paused=True)
        self._scheduler = scheduler
        self.sync_jobs()
        scheduler.resume()

    def _stop_scheduler(self, *, wait: bool) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
            self._scheduler = None
        if jobs.ACTIVE.get(self.store.url) is self:
            del jobs.ACTIVE[self.store.url]

    # Jobs -----------------------------------------------------------------------------------------------------

    def sync_jobs(self) -> None:
        """Make the job store match the config: keep unchanged jobs (and their next run), replace changed ones,
        remove jobs of tasks or schedules no longer configured."""
        assert self._scheduler is not None
        wanted = {spec.id: spec for spec in job_specs(self.config)}
        for job in self._scheduler.get_jobs():
            base_id = job.id.removesuffix(":retry")
            if base_id not in wanted or (job.id == base_id and job.name != wanted[base_id].name):
                job.remove()
        existing = {job.id for job in self._scheduler.get_jobs()}
        for spec in wanted.values():
            if spec.id in existing:
                continue
            self._scheduler.add_job(jobs.run_job, spec.trigger(), id=spec.id, name=spec.name,
                                    kwargs={"database_url": self.store.url, "job": spec.job, "task": spec.task},
                                    next_run_time=datetime.now(UTC) + timedelta(seconds=FIRST_RUN_DELAY_S))

    def schedule_retry(self, job: JobKind, task: str, attempt: int, delay_s: float) -> None:
        if self._scheduler is None:
            return
        self._scheduler.add_job(jobs.run_job, "date", id=f"{job}:{task}:retry", name=f"{job}:{task} retry {attempt}",
                                run_date=datetime.now(UTC) + timedelta(seconds=delay_s), replace_existing=True,
                                kwargs={"database_url": self.store.url, "job": job, "task": task,
                                        "attempt": attempt})

    def after_success(self, job: JobKind, task: str) -> None:
        if self.on_success is not None:
            self.on_success(job, task)

    def jobs(self) -> list[dict[str, Any]]:
        if self._scheduler is None:
            return []
        return [{"id": j.id, "name": j.name, "next_run": j.next_run_time.isoformat() if j.next_run_time else None}
                for j in self._scheduler.get_jobs()]
