"""One retraining job, start to end: the stage sequence a worker process runs (tuneloop/conductor/worker.py is
that process's entry point; it hands in the deployment).

champion? -> judged sets -> preflight -> assemble -> train -> evaluate (gate) -> promote (and start the watch) or
reject (and release the candidate). Any exception marks the job failed with its message and leaves the champion
serving; SIGTERM does the same (`Terminated`). SIGKILL cannot be caught: the reaper (JobStore.reap) finds the dead
worker, marks the job failed and removes the half-written weights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from tuneloop import failpoints
from tuneloop.challenger_sets.catalog import qualify
from tuneloop.challenger_sets.splits import GATE_SUFFIX
from tuneloop.config import Config
from tuneloop.registry import find_alias
from tuneloop.retrain.deployment import Deployment
from tuneloop.retrain.jobs import JobStore, remove_staging, staging_prefix
from tuneloop.retrain.records import JobSettings, JobState, JobTrigger, WatchState
from tuneloop.store import Store

log = logging.getLogger(__name__)


class Terminated(Exception):
    """SIGTERM arrived."""


def run_job(config: Config, store: Store, job_id: int, deployment: Deployment, *,
            log_path: str | None = None, on_reaped: Callable[[], None] | None = None) -> JobState:
    """Run the job's stages; returns its final state. `on_reaped` is called (from the heartbeat thread) if the job
    is ended by someone else while this runs: the worker process passes a SIGTERM to itself."""
    from tuneloop.challenger_sets.judged import judged_sets
    from tuneloop.retrain.data import assemble
    from tuneloop.retrain.finetune import finetune
    from tuneloop.retrain.gate import Gate

    jobs = JobStore(store)
    job = jobs.get(job_id)
    jobs.claim(job_id, log_path=log_path)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(jobs, job_id, config.jobs.heartbeat_s, stop, on_reaped),
                            daemon=True)
    beat.start()
    task, settings = job.task, config.task(job.task).retrain
    try:
        champion = find_alias(store, task, "champion")
        if champion is None:
            return jobs.finish(job_id, "failed", error=f"task '{task}' has no champion to compare a candidate "
                               "with; train one first").state
        challengers = challenger_sets(config, job.triggers, task)
        jobs.record_champion(job_id, champion.version, JobSettings(retrain=job.settings.retrain,
                                                                   challenger_sets=challengers))
        judged = judged_sets(config, store, task, challengers)
        gate = Gate(config, store, task, deployment)
        refused = gate.preflight(judged, champion.ref)
        if refused is not None:
            return jobs.finish(job_id, "rejected", decision=refused).state
        jobs.transition(job_id, "training")
        with jobs.stage(job_id, "assemble"):
            data = assemble(config, store, task, judged=judged, name=f"retrain-job{job_id}")
        jobs.record_dataset(job_id, data.dataset.manifest.ref)
        with jobs.stage(job_id, "train"):
            candidate = finetune(config, store, task, dataset=data.dataset.manifest.ref, max_steps=settings.max_steps,
                                 progress=False, staging_prefix=staging_prefix(job_id),
                                 init_from=champion if settings.start_from == "champion" else None)
        jobs.record_candidate(job_id, candidate.version)
        jobs.transition(job_id, "evaluating")
        with jobs.stage(job_id, "evaluate"):
            decision = gate.decide(champion, candidate, judged)
        jobs.record_decision(job_id, decision)
        for line in decision.reasons:
            log.info("job %s gate: %s", job_id, line)
        if not decision.promote:
            deployment.release(candidate)
            return jobs.finish(job_id, "rejected").state
        jobs.require_active(job_id)  # a worker the reaper gave up on (its node lost the cluster) never promotes
        with jobs.stage(job_id, "promote"):
            promoted = deployment.promote(candidate)
        failpoints.reach("worker.after_promote")
        now = datetime.now(UTC)
        watch = WatchState(status="watching" if settings.watch_s > 0 else "off", promoted_at=now,
                           until=now + timedelta(seconds=settings.watch_s), previous_version=champion.version,
                           through_gateway=promoted.through_gateway)
        return jobs.finish(job_id, "promoted", watch=watch).state
    except BaseException as exc:  # noqa: BLE001 - every way out of a job must leave a record
        reason = "terminated (SIGTERM)" if isinstance(exc, Terminated) else f"{type(exc).__name__}: {exc}"
        log.exception("job %s failed", job_id)
        remove_staging(config.data_path, task, job_id)
        jobs.finish(job_id, "failed", error=reason)
        if not isinstance(exc, Exception | Terminated):
            raise
        return "failed"
    finally:
        stop.set()


def challenger_sets(config: Config, triggers: list[JobTrigger], task: str) -> list[str]:
    """The configured challenger sets the triggers name (an incident's rule, an alert's `dataset` label), else all
    of the task's."""
    configured = {qualify(task, c) for c in config.task(task).challenger_datasets}
    named: list[str] = []
    for received in triggers:
        for name in received.trigger.datasets:
            full = qualify(task, name).removesuffix(GATE_SUFFIX)
            if full in configured and full not in named:
                named.append(full)
    return named or sorted(configured)


def _heartbeat(jobs: JobStore, job_id: int, every_s: float, stop: threading.Event,
               on_reaped: Callable[[], None] | None) -> None:
    """Beat until stopped; if the job ended without this worker (the reaper failed it, believing the worker dead),
    call `on_reaped`: the worker process stops its stages without changing the job's record (and before
    promoting, `require_active` refuses anyway)."""
    while not stop.wait(every_s):
        try:
            alive = jobs.heartbeat(job_id)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried; the job goes on
            log.warning("heartbeat of job %s failed: %s", job_id, exc)
            continue
        if not alive:
            log.error("job %s was ended while this worker ran (reaped)%s", job_id, "; stopping" if on_reaped else "")
            if on_reaped is not None:
                on_reaped()
            return
