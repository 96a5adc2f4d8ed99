"""The loop, in the order it runs. Every other module does one step; this one says which step follows which.

1. a scheduled job runs for a task: `eval` (the champion on its judged sets) or `drift`     monitor/scheduled.py
2. the policy checks the task's rules and opens or resolves incidents                      monitor/policy.py
3. each newly opened incident becomes a retraining trigger naming the set it breached on  `incident_trigger`
4. the trigger queues (or joins) the task's one retraining job on the runner               retrain/triggers.py
5. the job's worker assembles data, trains a candidate and gates it against the champion   retrain/worker.py
6. a passing candidate is promoted through the deployment, and its watch starts            conductor/deployment.py
7. after every scheduled eval, a watched promotion is re-checked and rolled back if worse  retrain/watch.py

Alertmanager's webhook (conductor/webhook.py) and `tuneloop retrain` enter at step 4, `tuneloop drift` at step 1.
The scheduler runs step 1 on its clock and calls `after_scheduled` (steps 2-4, 7); the worker process runs step
5-6 (conductor/worker.py); `tuneloop demo` calls the same methods in the order the scheduler would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from tuneloop.config import Config
from tuneloop.monitor.incidents import Incident
from tuneloop.monitor.jobs import DriftJobResult, JobFunction, JobKind, JobOutcome, Skipped, execute
from tuneloop.monitor.policy import Policy, PolicyOutcome
from tuneloop.monitor.scheduled import scheduled_drift, scheduled_estimate, scheduled_eval
from tuneloop.monitor.scheduler import TuneloopScheduler
from tuneloop.registry import get_adapter
from tuneloop.retrain.deployment import Deployment
from tuneloop.retrain.jobs import JobStore, SubmitOutcome
from tuneloop.retrain.records import IncidentTrigger, Job, JobState, Trigger
from tuneloop.retrain.runner import JobRunner
from tuneloop.retrain.triggers import request_retrain
from tuneloop.retrain.watch import Watch, WatchOutcome
from tuneloop.store import Store

if TYPE_CHECKING:
    from tuneloop.monitor.drift import DriftDetector, DriftReport

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class AfterScheduled:
    """What followed one scheduled job: the policy's verdicts, the retraining it asked for, the watch's check."""

    policy: PolicyOutcome
    retraining: list[SubmitOutcome] = field(default_factory=list)
    watch: WatchOutcome | None = None


def incident_trigger(incident: Incident) -> IncidentTrigger:
    """Step 3: a floor or drop rule names the challenger set it breached on; retraining learns from that set."""
    datasets = [incident.rule.dataset] if incident.rule.kind in ("floor", "drop") and incident.rule.dataset else []
    return IncidentTrigger(key=f"incident:{incident.id}", reason=f"incident {incident.id}: {incident.rule}",
                           incident=incident.id, rule=str(incident.rule), datasets=datasets,
                           message=incident.message[:MAX_MESSAGE_CHARS])


class Loop:
    """The loop's steps over one config and store, with the runner retraining jobs start on, the deployment that
    serves and promotes versions, and the gateway `endpoint` scheduled evals ask."""

    def __init__(self, config: Config, store: Store, *, runner: JobRunner, deployment: Deployment,
                 endpoint: str) -> None:
        self.config, self.store, self.runner, self.deployment, self.endpoint = (config, store, runner, deployment,
                                                                                endpoint)
        self._detector: DriftDetector | None = None
        self._host: TuneloopScheduler | None = None

    # 1. scheduled jobs -------------------------------------------------------------------------------------------

    @property
    def detector(self) -> DriftDetector:
        """One drift detector per loop: it keeps the embedding model loaded between checks."""
        if self._detector is None:
            from tuneloop.monitor.drift import DriftDetector

            self._detector = DriftDetector(self.config, self.store)
        return self._detector

    def job_functions(self) -> dict[JobKind, JobFunction]:
        return {"eval": lambda task: scheduled_eval(self.config, self.store, task, endpoint=self.endpoint),
                "drift": self._drift_then_estimate}

    def _drift_then_estimate(self, task: str) -> DriftJobResult | Skipped:
        """The drift check, then the live-traffic estimate of the same traffic (the policy reads both)."""
        result = scheduled_drift(self.detector, task)
        estimate = scheduled_estimate(self.config, self.store, task, endpoint=self.endpoint)
        if isinstance(estimate, Skipped):
            log.debug("no live-traffic estimate of %s: %s", task, estimate.reason)
        return result

    def scheduler(self, *, holder: str | None = None) -> TuneloopScheduler:
        """The lease-guarded scheduler that runs step 1 on the configured clock and steps 2-4, 7 after it."""
        return TuneloopScheduler(self.config, self.store, self.job_functions(), holder=holder,
                                 on_success=self.after_scheduled)

    def run_scheduled(self, kind: JobKind, task: str) -> JobOutcome:
        """Step 1 now, exactly as the scheduler runs it (recorded, retried on failure, followed by steps 2-4, 7)."""
        if self._host is None:
            self._host = self.scheduler(holder="inline")
        return execute(self._host, kind, task)

    def check_drift(self, task: str, *, window: int | None = None, since: datetime | None = None,
                    html: bool | None = None, progress: bool = False) -> tuple[DriftReport, AfterScheduled]:
        """Step 1 by hand (`tuneloop drift`): a drift check of the chosen window, then what follows a scheduled
        one."""
        self.detector.progress = progress
        report = self.detector.run(task, window=window, since=since, html=html)
        return report, self.after_scheduled("drift", task)

    # 2-4, 7. after a scheduled job -------------------------------------------------------------------------------

    def after_scheduled(self, kind: JobKind, task: str) -> AfterScheduled:
        outcome = Policy(self.config, self.store).evaluate(task)
        retraining = []
        if outcome.changes.opened:
            log.warning("%s: incident(s) opened: %s", task, [str(i.rule) for i in outcome.changes.opened])
        if self.config.task(task).retrain.on_incident:
            for incident in outcome.changes.opened:
                submitted = self.request_retrain(task, incident_trigger(incident))
                retraining.append(submitted)
                log.warning("%s: incident %s -> retraining job %s", task, incident.id, submitted.job.id)
        watched = self.check_watch(task) if kind == "eval" else None
        return AfterScheduled(policy=outcome, retraining=retraining, watch=watched)

    def request_retrain(self, task: str, trigger: Trigger) -> SubmitOutcome:
        """Step 4: queue a job for the task or join its running one (the webhook and `tuneloop retrain` too)."""
        self.reap_jobs()
        return request_retrain(self.config, self.store, task, trigger, runner=self.runner)

    def reap_jobs(self) -> list[int]:
        """End the jobs whose worker died, unloading the candidates they left in the engine."""
        return JobStore(self.store).reap(stale_after_s=self.config.jobs.stale_after_s, data_dir=self.config.data_path,
                                         release=self._release_candidate, gone=self._gone)

    def _gone(self, job: Job) -> str | None:
        """The runner's word on a job it started (Ray's job status); jobs of another runner go by heartbeat."""
        return self.runner.why_gone(job) if job.runner == self.runner.name else None

    def _release_candidate(self, job: Job) -> None:
        if job.candidate_ref is not None:
            self.deployment.release(get_adapter(self.store, job.candidate_ref))

    def check_watch(self, task: str) -> WatchOutcome | None:
        """Step 7: compare a watched promotion with the champion it replaced; a regression rolls it back."""
        watched = Watch(self.config, self.store, self.deployment).check(task)
        if watched is not None and watched.status == "rolled_back":
            log.warning("%s: watch rolled back job %s's promotion", task, watched.job)
        return watched

    # 5-6. the job --------------------------------------------------------------------------------------------------

    def run_job(self, job_id: int, *, log_path: str | None = None,
                on_reaped: Callable[[], None] | None = None) -> JobState:
        """Steps 5 and 6 in this process (the worker's): assemble, train, gate, promote or reject."""
        from tuneloop.retrain.worker import run_job

        return run_job(self.config, self.store, job_id, self.deployment, log_path=log_path, on_reaped=on_reaped)
