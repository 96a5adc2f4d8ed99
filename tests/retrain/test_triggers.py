"""Asking for retraining, on a real SQLite job store: Alertmanager payloads become triggers keyed so a re-sent
notification is one request, a runner that cannot start fails its job at once (releasing the task), a job whose
worker died is reaped before a new trigger could join it, and an unknown task is refused before anything is stored."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.fakes import RecordingRunner
from tuneloop.config import Config
from tuneloop.errors import ConfigError
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import Job, ManualTrigger
from tuneloop.retrain.triggers import AlertmanagerPayload, alert_triggers, manual_trigger, request_retrain
from tuneloop.store import Store


def alert(status: str = "firing", **labels: str) -> dict[str, object]:
    return {"status": status, "labels": {"alertname": "TuneloopQualityBelowFloor", **labels},
            "startsAt": "2026-11-27T10:00:00Z"}


def test_firing_alerts_for_configured_tasks_become_triggers_and_the_rest_say_why_not(config: Config) -> None:
    payload = AlertmanagerPayload.model_validate({"status": "firing", "alerts": [
        alert(task="sentiment", dataset="other-topics"), alert("resolved", task="sentiment"), alert(),
        alert(task="nope")]})
    accepted, ignored = alert_triggers(payload, config)
    [(task, trigger)] = accepted
    assert task == "sentiment" and trigger.datasets == ["other-topics"] and trigger.starts_at == "2026-11-27T10:00:00Z"
    assert trigger.key == ("alertmanager:alertname=TuneloopQualityBelowFloor|dataset=other-topics|task=sentiment:"
                           "2026-11-27T10:00:00Z"), "without a fingerprint the sorted labels identify the alert"
    assert ignored == ["TuneloopQualityBelowFloor: status resolved", "TuneloopQualityBelowFloor: no 'task' label",
                       "TuneloopQualityBelowFloor: task 'nope' is not configured (['chat', 'sentiment'])"]
    again, _ = alert_triggers(payload, config)
    assert again[0][1].key == trigger.key, "the same alert re-sent is the same request"


class BrokenRunner(RecordingRunner):
    name = "broken"

    def launch(self, job: Job) -> None:
        raise OSError("no space left on device")


def test_a_runner_that_cannot_start_fails_the_job_at_once_and_frees_the_task(config: Config, store: Store) -> None:
    outcome = request_retrain(config, store, "sentiment", manual_trigger("try", now=datetime.now(UTC)),
                              runner=BrokenRunner())
    assert outcome.created and outcome.job.state == "failed" and not outcome.job.active
    assert "runner 'broken' could not start it: no space left on device" in (outcome.job.error or "")
    runner = RecordingRunner()
    retry = request_retrain(config, store, "sentiment", ManualTrigger(key="manual:2", reason="again"), runner=runner)
    assert retry.created and runner.launched == [retry.job.id], "the failed job did not hold the task's lock"


def test_a_dead_workers_job_is_reaped_before_a_new_trigger_could_join_it(config: Config, store: Store) -> None:
    runner = RecordingRunner()
    first = request_retrain(config, store, "sentiment", ManualTrigger(key="manual:1", reason="r"), runner=runner)
    config.jobs.stale_after_s = 0.001  # no worker ever claimed it: stale at once
    second = request_retrain(config, store, "sentiment", ManualTrigger(key="manual:2", reason="r"), runner=runner)
    assert second.created and second.job.id != first.job.id
    assert JobStore(store).get(first.job.id).state == "failed"
    assert "no worker picked the job up" in (JobStore(store).get(first.job.id).error or "")


def test_an_unknown_task_is_refused_before_anything_is_stored(config: Config, store: Store) -> None:
    runner = RecordingRunner()
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        request_retrain(config, store, "nope", ManualTrigger(key="manual:x", reason="r"), runner=runner)
    assert JobStore(store).recent() == [] and runner.launched == []
