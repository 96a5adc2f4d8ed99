"""The task gateway: an OpenAI-compatible front for vLLM that routes task names to adapters and captures traffic.

This module assembles the app from its per-feature routers (serving/openai_api.py, admin_api.py,
feedback_api.py, reports_api.py) plus health and metrics, and the routes the process's assembler adds (the
Alertmanager webhook, tuneloop/conductor/webhook.py), and maps every TuneloopError to one OpenAI-style error body
with the status of its type (serving/protocol.py), so every failure looks the same to clients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.errors import RateLimited, TuneloopError
from tuneloop.serving import admin_api, feedback_api, openai_api, reports_api
from tuneloop.serving.protocol import RETRY_AFTER_S, error_response, status_of
from tuneloop.serving.slow_clients import ClientStalled
from tuneloop.serving.state import GatewayContext, context
from tuneloop.serving.upstream import make_upstream

__all__ = ["GatewayContext", "create_app"]
log = logging.getLogger(__name__)


async def healthz(request: Request) -> Response:
    ctx = context(request)
    ready = ctx.engine.state == "ready"
    body = {"status": "ok" if ready else "unavailable", "engine": ctx.engine.state,
            "champions": {t: f"{t}@{v}" for t, v in ctx.router.champions.items()}}
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": RETRY_AFTER_S})


async def metrics(request: Request) -> Response:
    # Collectors query the database (job states, capture counts, scores): off the event loop, so a locked SQLite
    # or a slow Postgres delays the scrape, not every request.
    body = await run_in_threadpool(generate_latest, context(request).registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(context(request).openapi)


async def on_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, TuneloopError):
        raise exc
    status, name = status_of(exc)
    message = str(exc)
    if status >= 500:
        # Our failures name hosts, paths and SQL in their messages: those go to the log, the client gets what it
        # can act on (retry, or report the time).
        log.error("%s answered %s: %s", type(exc).__name__, status, exc)
        message = PUBLIC_MESSAGES.get(name, PUBLIC_MESSAGES["internal_error"])
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        headers = exc.headers
    if 400 <= status < 500:
        context(request).metrics.refused.labels(type=name).inc()
    return error_response(status, message, name, headers=headers)


PUBLIC_MESSAGES = {
    "store_unavailable": "the gateway's database is not answering; retry after Retry-After seconds",
    "service_unavailable": "the model engine is not answering (starting, restarting or overloaded); retry after "
                           "Retry-After seconds",
    "adapter_unavailable": "this task's champion adapter is not loaded in the engine (its files failed the serving "
                           "checks, or vLLM refused it); the gateway's log names the version and the reason",
    "internal_error": "internal error; the gateway's log has the details",
}


async def on_unexpected(_: Request, exc: Exception) -> Response:
    """A bug, not a refusal: the client gets the one error shape and a 500, the log gets the traceback. A client
    that stopped reading is neither: its response has started, so nothing more is sent or logged here."""
    if isinstance(exc, ClientStalled):
        return Response(status_code=500)
    log.exception("unhandled %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal error; the gateway's log has the details", "internal_error")


def create_app(ctx: GatewayContext, *, routes: Sequence[BaseRoute] = ()) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        ctx.client = make_upstream(ctx.engine.base_url, ctx.engine.auth_headers,
                                   timeout_s=ctx.config.serving.request_timeout_s, transport=ctx.upstream_transport)
        try:
            yield
        finally:
            await ctx.client.close()

    every = [*openai_api.routes(), *feedback_api.routes(), *admin_api.routes(), *reports_api.routes(), *routes,
             Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
             Route("/openapi.json", openapi, methods=["GET"])]
    app = Starlette(routes=every, exception_handlers={TuneloopError: on_error, Exception: on_unexpected},
                    lifespan=lifespan)
    app.state.ctx = ctx
    return app
