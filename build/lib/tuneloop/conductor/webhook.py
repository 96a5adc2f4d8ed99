"""`POST /v1/hooks/alertmanager`: Alertmanager's webhook starts (or joins) retraining of the alerted task.

Caller: Alertmanager, with a key of the `webhook` scope (or the admin token) as its bearer credential
(grafana/alertmanager.yml): a webhook key can start retraining, never promote or load an adapter. The token is checked
before the body is read; a malformed body is refused whole (400, naming the field); firing alerts with a configured
`task` label each become a trigger keyed by fingerprint and start time, so a re-sent notification is answered
with the same job and changes nothing. The conductor adds this route to the gateway; the gateway itself knows
nothing of retraining.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.conductor.loop import Loop
from tuneloop.retrain.triggers import AlertmanagerPayload, alert_triggers
from tuneloop.serving.openapi import operation
from tuneloop.serving.protocol import read_json_body, validate_body
from tuneloop.serving.state import context

PATH = "/v1/hooks/alertmanager"


class AlertmanagerWebhook:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    async def receive(self, request: Request) -> Response:
        config = self.loop.config
        await context(request).auth.require(request, "webhook")
        payload = validate_body(AlertmanagerPayload, await read_json_body(request))
        accepted, ignored = alert_triggers(payload, config)
        results = []
        for task, trigger in accepted:
            outcome = await run_in_threadpool(self.loop.request_retrain, task, trigger)
            results.append({"task": task, "job": outcome.job.id, "state": outcome.job.state,
                            "outcome": "duplicate" if outcome.duplicate else "queued" if outcome.created
                            else "attached"})
        return JSONResponse({"triggers": results, "ignored": ignored}, status_code=202 if results else 200)

    def routes(self) -> list[BaseRoute]:
        return [Route(PATH, self.receive, methods=["POST"])]

    @staticmethod
    def openapi_paths() -> dict[str, dict[str, Any]]:
        return {PATH: {"post": operation("Alertmanager's webhook: start or join retraining of the alerted task",
                                         "webhook", body=AlertmanagerPayload.model_json_schema(),
                                         ok="no alert named a configured task (202: jobs queued or joined)")}}
