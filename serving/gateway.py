"""The task gateway: an OpenAI-compatible front for vLLM that routes task names to adapters and captures traffic.

Every failure leaves as the same OpenAI-style error body (`protocol.error_response`), with the status code of
its exception type. Requests never hang on a dead engine: when vLLM is down or restarting they get 503 with
Retry-After at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from serving.auth import require_admin
from serving.capture import CaptureWriter, TrafficRecord
from serving.feedback import FeedbackConflict, UnknownRequest, attach_reference
from serving.hotswap import HotSwapper
from serving.metrics import GatewayMetrics
from serving.protocol import (
    EVAL_PURPOSE_HEADER,
    MAX_BODY_BYTES,
    AdapterLoadRequest,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    PromoteRequest,
    RollbackRequest,
    error_response,
    text_content,
)
from serving.redact import Redactor
from serving.routing import Route, Router
from tuneloop.config import Config
from tuneloop.errors import (
    AdapterError,
    AuthError,
    DatasetError,
    EngineUnavailable,
    ModelNotFound,
    TuneloopError,
)

log = logging.getLogger(__name__)
RETRY_AFTER_S = "5"
STATUS_BY_ERROR: list[tuple[type[TuneloopError], int, str]] = [
    (AuthError, 401, "authentication_error"),
    (ModelNotFound, 404, "not_found_error"),
    (UnknownRequest, 404, "not_found_error"),
    (FeedbackConflict, 409, "conflict_error"),
    (EngineUnavailable, 503, "service_unavailable"),
    (AdapterError, 400, "adapter_error"),
    (DatasetError, 400, "invalid_request_error"),
    (TuneloopError, 400, "invalid_request_error"),
]


@dataclass
class GatewayContext:
    """What the gateway's handlers share; built by `tuneloop serve` (or a test) and passed in."""

    config: Config
    engine: Any
    router: Router
    capture: CaptureWriter
    swapper: HotSwapper
    redactor: Redactor
    registry: CollectorRegistry
    metrics: GatewayMetrics
    client: httpx.AsyncClient | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)


def create_app(ctx: GatewayContext) -> Starlette:
    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request)
        parsed = _validate(ChatRequest, body)
        route = ctx.router.resolve(parsed.model)
        messages = [m.model_dump(exclude_none=True) for m in parsed.messages]
        if route.task and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": ctx.config.tasks[route.task].system_prompt})
        body["messages"] = messages
        users = [text_content(m.get("content")) for m in messages if m["role"] == "user"]
        return await _forward(ctx, route, body, "chat", users[-1] if users else "", messages, parsed.stream,
                              evaluation=_is_eval(request))

    async def completions(request: Request) -> Response:
        body = await _read_json(request)
        parsed = _validate(CompletionRequest, body)
        route = ctx.router.resolve(parsed.model)
        prompt = parsed.prompt if isinstance(parsed.prompt, str) else "\n".join(parsed.prompt)
        return await _forward(ctx, route, body, "completion", prompt, [{"role": "user", "content": prompt}],
                              parsed.stream, evaluation=_is_eval(request))

    async def models(_: Request) -> Response:
        now = int(time.time())
        names = [*sorted(ctx.router.champions), *sorted(ctx.engine.loaded), ctx.config.base_model.name]
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "created": now,
                                                         "owned_by": "tuneloop"} for n in dict.fromkeys(names)]})

    async def healthz(_: Request) -> Response:
        ready = ctx.engine.state == "ready"
        body = {"status": "ok" if ready else "unavailable", "engine": ctx.engine.state,
                "champions": {t: f"{t}@{v}" for t, v in ctx.router.champions.items()}}
        return JSONResponse(body, status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": RETRY_AFTER_S})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    async def admin_promote(request: Request) -> Response:
        require_admin(request, ctx.config.admin_token)
        parsed = _validate(PromoteRequest, await _read_json(request))
        result = await run_in_threadpool(ctx.swapper.promote, parsed.version)
        return JSONResponse({"task": result.task, "champion": result.champion, "previous": result.previous})

    async def admin_rollback(request: Request) -> Response:
        require_admin(request, ctx.config.admin_token)
        parsed = _validate(RollbackRequest, await _read_json(request))
        ctx.config.task(parsed.task)
        result = await run_in_threadpool(ctx.swapper.rollback, parsed.task)
        return JSONResponse({"task": result.task, "champion": result.champion, "previous": result.previous})

    async def admin_load(request: Request) -> Response:
        require_admin(request, ctx.config.admin_token)
        parsed = _validate(AdapterLoadRequest, await _read_json(request))
        version = await run_in_threadpool(ctx.swapper.load, parsed.version)
        return JSONResponse({"loaded": version.ref})

    async def admin_unload(request: Request) -> Response:
        require_admin(request, ctx.config.admin_token)
        parsed = _validate(AdapterLoadRequest, await _read_json(request))
        task = parsed.version.split("@")[0]
        active = {f"{t}@{v}" for t, v in ((task, ctx.router.champions.get(task)),
                                          (task, ctx.router.candidates.get(task))) if v}
        if parsed.version in active:
            raise AdapterError(f"{parsed.version} is a champion or candidate; promote or roll back first")
        await run_in_threadpool(ctx.engine.unload_adapter, parsed.version)
        return JSONResponse({"unloaded": parsed.version})

    async def feedback(request: Request) -> Response:
        parsed = _validate(FeedbackRequest, await _read_json(request))
        if parsed.overwrite:
            require_admin(request, ctx.config.admin_token)
        result = await run_in_threadpool(attach_reference, ctx.capture.store, ctx.config, parsed.request_id,
                                         parsed.reference, overwrite=parsed.overwrite)
        return JSONResponse(result.model_dump(mode="json"))

    async def on_error(_: Request, exc: Exception) -> Response:
        for error_type, status, name in STATUS_BY_ERROR:
            if isinstance(exc, error_type):
                headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
                if status == 401:
                    headers = {"WWW-Authenticate": "Bearer"}
                return error_response(status, str(exc), name, headers=headers)
        raise exc

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        ctx.client = httpx.AsyncClient(base_url=ctx.engine.spec.base_url,
                                       timeout=httpx.Timeout(ctx.config.serving.request_timeout_s, connect=2.0),
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        try:
            yield
        finally:
            await ctx.client.aclose()

    routes = [
        HttpRoute("/v1/chat/completions", chat_completions, methods=["POST"]),
        HttpRoute("/v1/completions", completions, methods=["POST"]),
        HttpRoute("/v1/models", models, methods=["GET"]),
        HttpRoute("/v1/feedback", feedback, methods=["POST"]),
        HttpRoute("/healthz", healthz, methods=["GET"]),
        HttpRoute("/metrics", metrics, methods=["GET"]),
        HttpRoute("/admin/promote", admin_promote, methods=["POST"]),
        HttpRoute("/admin/rollback", admin_rollback, methods=["POST"]),
        HttpRoute("/admin/adapters/load", admin_load, methods=["POST"]),
        HttpRoute("/admin/adapters/unload", admin_unload, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={TuneloopError: on_error}, lifespan=lifespan)


async def _read_json(request: Request) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise DatasetError(f"request body is {int(length):,} bytes, over the {MAX_BODY_BYTES:,}-byte limit")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise DatasetError(f"request body is over the {MAX_BODY_BYTES:,}-byte limit")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"request body is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise DatasetError("request body must be a JSON object")
    return body


def _validate(model: Any, body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise DatasetError(f"invalid request: {problems}") from None


def _is_eval(request: Request) -> bool:
    return request.headers.get(EVAL_PURPOSE_HEADER, "").lower() == "eval"


async def _forward(ctx: GatewayContext, route: Route, body: dict[str, Any], endpoint: str, prompt_text: str,
                   messages: list[dict[str, Any]], stream: bool, *, evaluation: bool = False) -> Response:
    """Proxy to vLLM. Evaluation requests are counted (route="eval") but neither captured nor shadowed: they are
    not user traffic and must not reach drift detection or challenger sets."""
    if ctx.engine.state != "ready" or ctx.client is None:
        raise EngineUnavailable(f"the engine is {ctx.engine.state}; retry shortly")
    body["model"] = route.target
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    request_id = uuid.uuid4().hex
    started = time.perf_counter()
    labels = {"task": route.task or "base", "adapter": route.adapter, "route": "eval" if evaluation else route.kind}
    shadow = None if evaluation else ctx.router.shadow_for(route)
    if shadow is not None:
        task = asyncio.create_task(_shadow(ctx, shadow, dict(body), path, endpoint, prompt_text, messages,
                                           request_id))
        ctx.background.add(task)
        task.add_done_callback(ctx.background.discard)
    try:
        upstream = await ctx.client.send(ctx.client.build_request("POST", path, json=body), stream=True)
    except httpx.HTTPError as exc:
        _count(ctx, labels, 503, started)
        raise EngineUnavailable(f"vLLM is not answering ({exc.__class__.__name__}); retry shortly") from None
    if not stream or upstream.status_code != 200:
        raw = await upstream.aread()
        await upstream.aclose()
        payload = _json_or_none(raw)
        completion, usage = _completion_of(payload, endpoint)
        _finish(ctx, route, labels, request_id, endpoint, prompt_text, messages, completion, usage,
                upstream.status_code, started, stream=False)
        return Response(raw, status_code=upstream.status_code, media_type="application/json",
                        headers={"X-Request-Id": request_id})
    return StreamingResponse(_relay(ctx, upstream, route, labels, request_id, endpoint, prompt_text, messages,
                                    started), media_type="text/event-stream",
                             headers={"X-Request-Id": request_id})


async def _relay(ctx: GatewayContext, upstream: httpx.Response, route: Route, labels: dict[str, str],
                 request_id: str, endpoint: str, prompt_text: str, messages: list[dict[str, Any]],
                 started: float) -> AsyncIterator[bytes]:
    parts: list[str] = []
    usage: dict[str, Any] = {}
    buffer = b""
    status = 200
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = _json_or_none(line[6:])
                if not event:
                    continue
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {}).get("content") if endpoint == "chat" else choice.get("text")
                    if delta:
                        parts.append(delta)
    except httpx.HTTPError:
        status = 502
    finally:
        await upstream.aclose()
        _finish(ctx, route, labels, request_id, endpoint, prompt_text, messages, "".join(parts), usage, status,
                started, stream=True)


async def _shadow(ctx: GatewayContext, route: Route, body: dict[str, Any], path: str, endpoint: str,
                  prompt_text: str, messages: list[dict[str, Any]], shadow_of: str) -> None:
    body.update(model=route.target, stream=False)
    started = time.perf_counter()
    labels = {"task": route.task or "base", "adapter": route.adapter, "route": "shadow"}
    assert ctx.client is not None
    try:
        response = await ctx.client.post(path, json=body)
        completion, usage = _completion_of(_json_or_none(response.content), endpoint)
        status = response.status_code
    except httpx.HTTPError:
        completion, usage, status = None, {}, 503
    _finish(ctx, route, labels, uuid.uuid4().hex, endpoint, prompt_text, messages, completion, usage, status,
            started, stream=False, shadow_of=shadow_of)


def _finish(ctx: GatewayContext, route: Route, labels: dict[str, str], request_id: str, endpoint: str,
            prompt_text: str, messages: list[dict[str, Any]], completion: str | None, usage: dict[str, Any],
            status: int, started: float, *, stream: bool, shadow_of: str | None = None) -> None:
    latency = time.perf_counter() - started
    _count(ctx, labels, status, started)
    if usage.get("prompt_tokens"):
        ctx.metrics.prompt_tokens.labels(**labels).inc(usage["prompt_tokens"])
    if usage.get("completion_tokens"):
        ctx.metrics.completion_tokens.labels(**labels).inc(usage["completion_tokens"])
    if labels["route"] == "eval":
        return
    pii: dict[str, int] = {}
    clean_messages = []
    for message in messages:
        text, found = ctx.redactor.redact(text_content(message.get("content")))
        clean_messages.append({"role": message["role"], "content": text})
        for kind, n in found.items():
            pii[kind] = pii.get(kind, 0) + n
    users = [m["content"] for m in clean_messages if m["role"] == "user"]
    clean_prompt = users[-1] if users else ""
    clean_completion = None
    if completion is not None:
        clean_completion, found = ctx.redactor.redact(completion)
        for kind, n in found.items():
            pii[kind] = pii.get(kind, 0) + n
    ctx.capture.submit(TrafficRecord(
        request_id=request_id, task=route.task or "base", adapter_version=route.version, route=labels["route"],
        endpoint=endpoint, prompt_text=clean_prompt, messages=clean_messages, completion=clean_completion,
        prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
        latency_ms=round(latency * 1000, 2), status=status, stream=stream, shadow_of=shadow_of, pii=pii))


def _count(ctx: GatewayContext, labels: dict[str, str], status: int, started: float) -> None:
    ctx.metrics.requests.labels(**labels, status=str(status)).inc()
    ctx.metrics.latency.labels(**labels).observe(time.perf_counter() - started)
    if status >= 400:
        ctx.metrics.errors.labels(**labels, status=str(status)).inc()


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _completion_of(payload: Any, endpoint: str) -> tuple[str | None, dict[str, Any]]:
    if not isinstance(payload, dict) or not payload.get("choices"):
        return None, {}
    choice = payload["choices"][0]
    text = (choice.get("message") or {}).get("content") if endpoint == "chat" else choice.get("text")
    return text, payload.get("usage") or {}
