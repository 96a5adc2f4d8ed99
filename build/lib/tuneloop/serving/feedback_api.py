"""`POST /v1/feedback`: attach the right answer to a captured request (serving/feedback.py validates it).

Labels become training data, so writing one needs a key with the `feedback` scope, the label records which key
wrote it, and replacing a label needs `admin`."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.serving.auth import permit
from tuneloop.serving.feedback import attach_reference
from tuneloop.serving.protocol import FeedbackRequest, read_json_body, validate_body
from tuneloop.serving.state import context


async def feedback(request: Request) -> Response:
    ctx = context(request)
    caller = await ctx.auth.require(request, "feedback")
    parsed = validate_body(FeedbackRequest, await read_json_body(request))
    if parsed.overwrite:
        permit(caller, "admin")
    result = await run_in_threadpool(attach_reference, ctx.capture.store, ctx.config, parsed.request_id,
                                     parsed.reference, overwrite=parsed.overwrite, key_id=caller.key_id,
                                     redactor=ctx.redactor)
    return JSONResponse(result.model_dump(mode="json"))


def routes() -> list[BaseRoute]:
    return [Route("/v1/feedback", feedback, methods=["POST"])]
