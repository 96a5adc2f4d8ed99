"""`POST /v1/hooks/alertmanager` on the in-process gateway (stub vLLM, real store), added by the conductor as in
`tuneloop serve`: auth, malformed bodies, firing vs resolved alerts, replays, and joining a running job. The runner
is a recorder here; the live tests launch the real worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import RecordingDeployment, RecordingRunner
from tests.serving.test_gateway import TOKEN, Gateway, _gateway
from tuneloop.conductor.loop import Loop
from tuneloop.conductor.process import extensions
from tuneloop.config import Config
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import AlertTrigger
from tuneloop.serving.server import GatewayExtensions
from tuneloop.store import Store


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[tuple[Gateway, RecordingRunner]]:
    runner = RecordingRunner()

    def conducted(config: Config, store: Store) -> GatewayExtensions:
        return extensions(Loop(config, store, runner=runner, deployment=RecordingDeployment(store),
                               endpoint="http://gateway.test"))

    for gateway in _gateway(tmp_path, extend=conducted):
        yield gateway, runner


def payload(status: str = "firing", task: str = "sentiment", fingerprint: str = "abc",
            starts: str = "2026-11-27T10:00:00Z") -> dict[str, Any]:
    return {"version": "4", "status": status, "receiver": "tuneloop", "groupKey": "{}:{task=\"sentiment\"}",
            "alerts": [{"status": status, "labels": {"alertname": "TuneloopQualityBreach", "task": task,
                                                     "dataset": "other-topics"},
                        "annotations": {"summary": "macro_f1 below floor"}, "startsAt": starts,
                        "fingerprint": fingerprint}]}


def post(gateway: Gateway, body: object, token: str | None = TOKEN, raw: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return gateway.http.post("/v1/hooks/alertmanager", content=raw, headers={**headers,
                                                                                   "content-type": "application/json"})
    return gateway.http.post("/v1/hooks/alertmanager", json=body, headers=headers)


def test_refused_calls_change_nothing(hooked: tuple[Gateway, RecordingRunner]) -> None:
    gateway, runner = hooked
    assert post(gateway, payload(), token=None).status_code == 401
    assert post(gateway, payload(), token="wrong").status_code == 401
    bad = post(gateway, None, raw='{"alerts": "nope"')
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    wrong_shape = post(gateway, {"status": "firing", "alerts": "nope"})
    assert wrong_shape.status_code == 400 and "alerts" in wrong_shape.json()["error"]["message"]
    assert JobStore(gateway.store).recent() == [] and runner.launched == []


def test_a_firing_alert_starts_one_job_and_a_replay_is_idempotent(hooked: tuple[Gateway, RecordingRunner]) -> None:
    gateway, runner = hooked
    first = post(gateway, payload())
    assert first.status_code == 202
    body = first.json()
    assert body["triggers"][0]["outcome"] == "queued" and runner.launched == [body["triggers"][0]["job"]]
    replay = post(gateway, payload())
    assert replay.json()["triggers"][0] == {**body["triggers"][0], "outcome": "duplicate"}
    again_later = post(gateway, payload(fingerprint="def"))
    assert again_later.json()["triggers"][0]["outcome"] == "attached", "joins the unfinished job"
    jobs = JobStore(gateway.store).recent()
    assert len(jobs) == 1 and runner.launched == [jobs[0].id]
    triggers = [t.trigger for t in jobs[0].triggers]
    assert len(triggers) == 2 and isinstance(triggers[0], AlertTrigger)
    assert triggers[0].datasets == ["other-topics"] and triggers[0].starts_at == "2026-11-27T10:00:00Z"


def test_resolved_and_unknown_task_alerts_are_ignored_with_reasons(hooked: tuple[Gateway, RecordingRunner]) -> None:
    gateway, runner = hooked
    resolved = post(gateway, payload(status="resolved"))
    assert resolved.status_code == 200 and resolved.json()["ignored"] == ["TuneloopQualityBreach: status resolved"]
    unknown = post(gateway, payload(task="nope"))
    assert "task 'nope' is not configured" in unknown.json()["ignored"][0]
    assert JobStore(gateway.store).recent() == [] and runner.launched == []


def test_grafana_contact_point_payload_starts_a_job(hooked: tuple[Gateway, RecordingRunner]) -> None:
    """Grafana-managed alerting's webhook contact point (payload version 1, Grafana's extra fields) works too."""
    gateway, runner = hooked
    grafana = {"receiver": "tuneloop", "status": "firing", "orgId": 1, "version": "1", "state": "alerting",
               "title": "[FIRING:1] TuneloopDriftDetected tuneloop", "message": "...", "truncatedAlerts": 0,
               "groupLabels": {"task": "sentiment"}, "commonLabels": {}, "commonAnnotations": {},
               "externalURL": "http://grafana:3000/", "groupKey": "{}/{action=\"retrain\"}:{task=\"sentiment\"}",
               "alerts": [{"status": "firing", "labels": {"alertname": "TuneloopDriftDetected", "task": "sentiment",
                                                          "action": "retrain", "grafana_folder": "tuneloop"},
                           "annotations": {"summary": "drifted"}, "startsAt": "2026-11-27T10:00:00Z",
                           "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://grafana:3000/alerting/x",
                           "fingerprint": "0f1e2d3c", "silenceURL": "", "dashboardURL": "", "panelURL": "",
                           "values": {"A": 1, "C": 1}, "valueString": "[ var='A' value=1 ]"}]}
    reply = post(gateway, grafana)
    assert reply.status_code == 202 and reply.json()["triggers"][0]["outcome"] == "queued"
    jobs = JobStore(gateway.store).recent()
    assert len(jobs) == 1 and runner.launched == [jobs[0].id]
    assert jobs[0].triggers[0].trigger.reason == "alert TuneloopDriftDetected"


def test_without_the_conductor_the_gateway_has_no_webhook(tmp_path: Path) -> None:
    """The route exists because the process assembler added it; the gateway alone knows nothing of retraining."""
    for gateway in _gateway(tmp_path):
        assert post(gateway, payload()).status_code == 404
