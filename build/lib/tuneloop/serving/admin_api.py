"""The admin routes (bearer token required; without it 401 and nothing changes): promote, roll back, load and
unload adapters. Every load goes through the engine client's checks (serving/engine_client.py)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.errors import AdapterError
from tuneloop.serving.protocol import (
    AdapterLoadRequest,
    PromoteRequest,
    RollbackRequest,
    read_json_body,
    validate_body,
)
from tuneloop.serving.state import GatewayContext, context


async def _authorised(request: Request) -> GatewayContext:
    ctx = context(request)
    await ctx.auth.require(request, "admin")
    return ctx


async def promote(request: Request) -> Response:
    ctx = await _authorised(request)
    parsed = validate_body(PromoteRequest, await read_json_body(request))
    result = await run_in_threadpool(ctx.swapper.promote, parsed.version)
    return JSONResponse({"task": result.task, "champion": result.champion, "previous": result.previous})


async def rollback(request: Request) -> Response:
    ctx = await _authorised(request)
    parsed = validate_body(RollbackRequest, await read_json_body(request))
    ctx.config.task(parsed.task)
    result = await run_in_threadpool(ctx.swapper.rollback, parsed.task)
    return JSONResponse({"task": result.task, "champion": result.champion, "previous": result.previous})


async def load(request: Request) -> Response:
    ctx = await _authorised(request)
    parsed = validate_body(AdapterLoadRequest, await read_json_body(request))
    version = await run_in_threadpool(ctx.swapper.load, parsed.version)
    return JSONResponse({"loaded": version.ref})


async def unload(request: Request) -> Response:
    ctx = await _authorised(request)
    parsed = validate_body(AdapterLoadRequest, await read_json_body(request))
    task = parsed.version.split("@")[0]
    active = {f"{task}@{v}" for v in (ctx.router.champions.get(task), ctx.router.candidates.get(task)) if v}
    if parsed.version in active:
        raise AdapterError(f"{parsed.version} is a champion or candidate; promote or roll back first")
    await run_in_threadpool(ctx.engine.client.unload, parsed.version)
    return JSONResponse({"unloaded": parsed.version})


def routes() -> list[BaseRoute]:
    return [Route("/admin/promote", promote, methods=["POST"]),
            Route("/admin/rollback", rollback, methods=["POST"]),
            Route("/admin/adapters/load", load, methods=["POST"]),
            Route("/admin/adapters/unload", unload, methods=["POST"])]
