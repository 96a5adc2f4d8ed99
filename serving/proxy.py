"""Forwarding one routed request to vLLM, relaying its answer, and handing the finished exchange to capture.

A request's facts travel as one `ProxiedRequest`. Evaluation requests are counted (route="eval") but neither
captured nor shadowed: they are not user traffic and must not reach drift detection or challenger sets. Requests
never hang on a dead engine: they fail at once with EngineUnavailable (503, Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.responses import Response, StreamingResponse

from tuneloop.errors import EngineUnavailable
from tuneloop.keys import Caller
from tuneloop.serving.capture import TrafficRecord
from tuneloop.serving.protocol import Endpoint, Purpose, text_content
from tuneloop.serving.quality_signal import SignalPlan, strip_logprobs
from tuneloop.serving.routing import Route
from tuneloop.serving.state import GatewayContext
from tuneloop.serving.upstream import UpstreamError, UpstreamResponse

UPSTREAM_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass
class ProxiedRequest:
    """Everything known about one request on its way through the gateway."""

    route: Route
    endpoint: Endpoint
    body: dict[str, Any]
    prompt_text: str = field(metadata={"help": "The last user message (or the prompt): what drift watches."})
    messages: list[dict[str, Any]]
    stream: bool = False
    purpose: Purpose = "user"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    shadow_of: str | None = None
    caller: Caller | None = field(default=None, metadata={"help": "The API key that sent it, if any."})
    signal: SignalPlan | None = field(default=None, metadata={
        "help": "How the answer's quality signal is read (serving/quality_signal.py); None: no signal."})

    @property
    def labels(self) -> dict[str, str]:
        """Prometheus labels: eval requests are counted apart from the route users took."""
        return {"task": self.route.task or "base", "adapter": self.route.adapter,
                "route": "eval" if self.purpose == "eval" else self.route.kind}


@dataclass(frozen=True)
class Outcome:
    completion: str | None
    usage: dict[str, Any]
    status: int
    signal: dict[str, float] | None = None


async def forward(ctx: GatewayContext, request: ProxiedRequest) -> Response:
    if ctx.engine.state != "ready" or ctx.client is None:
        raise EngineUnavailable(f"the engine is {ctx.engine.state}; retry shortly")
    request.body["model"] = request.route.target
    if request.purpose == "user":
        _start_shadow(ctx, request)
    try:
        upstream = await ctx.client.open(UPSTREAM_PATHS[request.endpoint], encode(request.body))
    except UpstreamError as exc:
        _count(ctx, request, 503)
        raise EngineUnavailable(f"vLLM is not answering ({exc}); retry shortly") from None
    headers = {"X-Request-Id": request.request_id}
    if not request.stream or upstream.status != 200:
        try:
            raw = await upstream.read()
        except UpstreamError as exc:
            _count(ctx, request, 503)
            raise EngineUnavailable(f"vLLM stopped answering mid-reply ({exc}); retry shortly") from None
        finally:
            await upstream.close()
        payload = json_or_none(raw)
        completion, usage = completion_of(payload, request.endpoint)
        signal = None
        if request.signal is not None and upstream.status == 200:
            signal = request.signal.read(payload)
            if request.signal.strip and isinstance(payload, dict) and strip_logprobs(payload):
                raw = encode(payload)
        finish(ctx, request, Outcome(completion, usage, upstream.status, signal))
        return Response(raw, status_code=upstream.status, media_type="application/json", headers=headers)
    return RelayResponse(_relay(ctx, upstream, request), media_type="text/event-stream", headers=headers)


def encode(body: dict[str, Any]) -> bytes:
    """The upstream body, compact; non-ASCII text goes as UTF-8 rather than escapes (fewer bytes, same JSON)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class RelayResponse(StreamingResponse):
    """A stream whose relay is closed as soon as the response ends, however it ends: a client that disconnected
    or stopped reading (serving/slow_clients.py) would otherwise leave the generator suspended until garbage
    collection, holding its upstream connection to vLLM and its capture record."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


async def _relay(ctx: GatewayContext, upstream: UpstreamResponse, request: ProxiedRequest) -> AsyncIterator[bytes]:
    """Pass server-sent events through untouched while collecting the text and usage for capture."""
    parts: list[str] = []
    usage: dict[str, Any] = {}
    buffer = b""
    status = 200
    try:
        async for chunk in upstream.chunks():
            yield chunk
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json_or_none(line[6:])
                if not event:
                    continue
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    delta = (choice.get("delta", {}).get("content") if request.endpoint == "chat"
                             else choice.get("text"))
                    if delta:
                        parts.append(delta)
    except UpstreamError:
        status = 502
    finally:
        await upstream.close()
        finish(ctx, request, Outcome("".join(parts), usage, status))


def _start_shadow(ctx: GatewayContext, request: ProxiedRequest) -> None:
    route = ctx.router.shadow_for(request.route)
    if route is None:
        return
    shadow = replace(request, route=route, body=dict(request.body, model=route.target, stream=False), stream=False,
                     request_id=uuid.uuid4().hex, started=time.perf_counter(), shadow_of=request.request_id)
    task = asyncio.create_task(_shadow(ctx, shadow))
    ctx.background.add(task)
    task.add_done_callback(ctx.background.discard)


async def _shadow(ctx: GatewayContext, request: ProxiedRequest) -> None:
    assert ctx.client is not None
    try:
        response = await ctx.client.open(UPSTREAM_PATHS[request.endpoint], encode(request.body))
        try:
            raw = await response.read()
        finally:
            await response.close()
        payload = json_or_none(raw)
        completion, usage = completion_of(payload, request.endpoint)
        signal = (request.signal.read(payload)
                  if request.signal is not None and response.status == 200 else None)
        outcome = Outcome(completion, usage, response.status, signal)
    except UpstreamError:
        outcome = Outcome(None, {}, 503)
    finish(ctx, request, outcome)


def finish(ctx: GatewayContext, request: ProxiedRequest, outcome: Outcome) -> None:
    """Count the request and, for user traffic, hand a redacted record to the capture writer."""
    labels = request.labels
    _count(ctx, request, outcome.status)
    if outcome.usage.get("prompt_tokens"):
        ctx.metrics.prompt_tokens.labels(**labels).inc(outcome.usage["prompt_tokens"])
    if outcome.usage.get("completion_tokens"):
        ctx.metrics.completion_tokens.labels(**labels).inc(outcome.usage["completion_tokens"])
    if request.shadow_of is None:  # a shadow request is ours, not the client's: not charged, not counted per key
        used = outcome.usage.get("total_tokens") or ((outcome.usage.get("prompt_tokens") or 0)
                                                     + (outcome.usage.get("completion_tokens") or 0))
        ctx.limiter.charge(request.caller, int(used))
        ctx.metrics.key_requests.labels(key=request.caller.key_id if request.caller else "none",
                                        status=str(outcome.status)).inc()
    if request.purpose == "eval":
        return
    # Redaction happens in the capture writer's thread: it is linear, but a 2 MB prompt still costs milliseconds
    # that every other request on the event loop would wait for.
    messages = [{"role": message["role"], "content": text_content(message.get("content"))}
                for message in request.messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    ctx.capture.submit(TrafficRecord(
        request_id=request.request_id, task=request.route.task or "base", adapter_version=request.route.version,
        route=labels["route"], endpoint=request.endpoint, prompt_text=users[-1] if users else "",
        messages=messages, completion=outcome.completion, prompt_tokens=outcome.usage.get("prompt_tokens"),
        completion_tokens=outcome.usage.get("completion_tokens"),
        latency_ms=round((time.perf_counter() - request.started) * 1000, 2), status=outcome.status,
        stream=request.stream, shadow_of=request.shadow_of,
        key_id=request.caller.key_id if request.caller else None, signal=outcome.signal))


def _count(ctx: GatewayContext, request: ProxiedRequest, status: int) -> None:
    labels = request.labels
    ctx.metrics.requests.labels(**labels, status=str(status)).inc()
    ctx.metrics.latency.labels(**labels).observe(time.perf_counter() - request.started)
    if status >= 400:
        ctx.metrics.errors.labels(**labels, status=str(status)).inc()


def json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def completion_of(payload: Any, endpoint: Endpoint) -> tuple[str | None, dict[str, Any]]:
    if not isinstance(payload, dict) or not payload.get("choices"):
        return None, {}
    choice = payload["choices"][0]
    text = (choice.get("message") or {}).get("content") if endpoint == "chat" else choice.get("text")
    return text, payload.get("usage") or {}
