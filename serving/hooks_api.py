"""`POST /v1/hooks/alertmanager`: Alertmanager's webhook starts (or joins) retraining of the alerted task.

The bearer token is checked before the body is read; a malformed body is refused whole (400, naming the field);
firing alerts with a configured `task` label each become a trigger keyed by fingerprint and start time, so a
re-sent notification is answered with the same job and changes nothing.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.retrain.triggers import AlertmanagerPayload, alert_triggers, request_retrain
from tuneloop.serving.auth import require_admin
from tuneloop.serving.protocol import read_json_body, validate_body
from tuneloop.serving.state import context


async def alertmanager(request: Request) -> Response:
    ctx = context(request)
    require_admin(request, ctx.config.admin_token)
    payload = validate_body(AlertmanagerPayload, await read_json_body(request))
    accepted, ignored = alert_triggers(payload, ctx.config)
    results = []
    for task, trigger in accepted:
        outcome = await run_in_threadpool(request_retrain, ctx.config, ctx.capture.store, task, trigger)
        results.append({"task": task, "job": outcome.job.id, "state": outcome.job.state,
                        "outcome": "duplicate" if outcome.duplicate else "queued" if outcome.created else "attached"})
    return JSONResponse({"triggers": results, "ignored": ignored}, status_code=202 if results else 200)


def routes() -> list[BaseRoute]:
    return [Route("/v1/hooks/alertmanager", alertmanager, methods=["POST"])]
