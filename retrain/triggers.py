"""Asking for retraining: from a policy incident, an Alertmanager notification, or a person.

Every request goes through `request_retrain`: stale jobs are reaped first (so a crashed job does not hold the
task's lock), the trigger is queued as a new job or attached to the task's unfinished one, and a new job is handed
to the runner. A runner that cannot start marks the job failed on the spot. Incident triggers are built by the
conductor from the incident's typed rule id (tuneloop/conductor/loop.py); this module builds the other two.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneloop.config import Config
from tuneloop.registry import find_alias
from tuneloop.retrain.jobs import JobStore, SubmitOutcome
from tuneloop.retrain.records import AlertTrigger, JobSettings, ManualTrigger, Trigger
from tuneloop.retrain.runner import JobRunner
from tuneloop.store import Store

log = logging.getLogger(__name__)
MAX_ALERTS = 1000


def request_retrain(config: Config, store: Store, task: str, trigger: Trigger, *, runner: JobRunner) -> SubmitOutcome:
    config.task(task)
    jobs = JobStore(store)
    jobs.reap(stale_after_s=config.jobs.stale_after_s, data_dir=config.data_path)
    champion = find_alias(store, task, "champion")
    outcome = jobs.submit(task, trigger, runner=runner.name, champion_version=champion.version if champion else None,
                          settings=JobSettings(retrain=config.task(task).retrain))
    if outcome.created:
        try:
            ref = runner.launch(outcome.job)
            if ref is not None:
                jobs.record_runner_ref(outcome.job.id, ref)
                outcome = SubmitOutcome(jobs.get(outcome.job.id), created=True, duplicate=False)
        except Exception as exc:  # noqa: BLE001 - a job that cannot start must not hold the task's lock
            log.exception("could not launch job %s", outcome.job.id)
            job = jobs.finish(outcome.job.id, "failed", error=f"runner '{runner.name}' could not start it: {exc}")
            return SubmitOutcome(job, created=True, duplicate=False)
    return outcome


def manual_trigger(reason: str | None, *, now: datetime) -> ManualTrigger:
    return ManualTrigger(key=f"manual:{now.isoformat()}", reason=reason or "requested by hand")


# Alertmanager -----------------------------------------------------------------------------------------------

class AlertmanagerAlert(BaseModel):
    """One alert of Alertmanager's webhook payload (version 4)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = Field(min_length=1, max_length=100)  # noqa: N815 - Alertmanager's field name
    fingerprint: str | None = Field(default=None, max_length=200)


class AlertmanagerPayload(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str = Field(default="4")
    status: Literal["firing", "resolved"]
    receiver: str = ""
    groupKey: str = ""  # noqa: N815 - Alertmanager's field name
    alerts: list[AlertmanagerAlert] = Field(min_length=1, max_length=MAX_ALERTS)


def alert_triggers(payload: AlertmanagerPayload, config: Config) -> tuple[list[tuple[str, AlertTrigger]], list[str]]:
    """(task, trigger) per firing alert that names a configured task; and why each other alert was ignored.

    The key is the alert's fingerprint and start time: Alertmanager re-sends the same firing alert every
    repeat_interval and on retries, which must not start a second job."""
    accepted, ignored = [], []
    for alert in payload.alerts:
        name = alert.labels.get("alertname", "?")
        task = alert.labels.get("task")
        if alert.status != "firing":
            ignored.append(f"{name}: status {alert.status}")
        elif not task:
            ignored.append(f"{name}: no 'task' label")
        elif task not in config.tasks:
            ignored.append(f"{name}: task '{task}' is not configured ({sorted(config.tasks)})")
        else:
            fingerprint = alert.fingerprint or "|".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
            datasets = [alert.labels["dataset"]] if alert.labels.get("dataset") else []
            accepted.append((task, AlertTrigger(
                key=f"alertmanager:{fingerprint}:{alert.startsAt}", reason=f"alert {name}", alertname=name,
                labels=alert.labels, annotations=alert.annotations, starts_at=alert.startsAt, datasets=datasets)))
    return accepted, ignored
