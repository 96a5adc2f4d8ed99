"""The OpenAI-compatible routes: chat completions, completions and the model list, by task name.

A task name routes to its champion (or the canary's candidate), `task@N` to a loaded version, the base model's
name to no adapter. The gateway adds the task's system prompt when a chat has none, so serving sees the format
training used, and constrains a classification task's answers to its labels (serving/constraints.py).
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuneloop.errors import AuthError, PermissionDenied
from tuneloop.keys import Caller
from tuneloop.serving.auth import permit
from tuneloop.serving.constraints import constrain_to_labels
from tuneloop.serving.limits import check_limits
from tuneloop.serving.protocol import (
    EVAL_PURPOSE_HEADER,
    ChatRequest,
    CompletionRequest,
    Purpose,
    read_json_body,
    text_content,
    validate_body,
)
from tuneloop.serving.proxy import ProxiedRequest, forward
from tuneloop.serving.quality_signal import SignalPlan, plan_signal
from tuneloop.serving.state import GatewayContext, context


async def _caller(request: Request, ctx: GatewayContext) -> tuple[Caller | None, Purpose]:
    """Who sent an inference request, and what for. A key is needed when `serving.require_api_key` is on (the
    production stack) and optional otherwise, but a key that is sent must be valid and hold `inference`. Marking
    a request as evaluation traffic keeps it out of capture and drift, so only an admin caller may."""
    caller = await ctx.auth.caller(request, open_gateway=not ctx.config.serving.require_api_key)
    if caller is None and ctx.config.serving.require_api_key:
        raise AuthError("this gateway needs an API key: send 'Authorization: Bearer <key>' (an operator creates "
                        "one with `tuneloop keys create NAME --scope inference`)")
    if caller is not None:
        permit(caller, "inference")
    purpose: Purpose = "user"
    if request.headers.get(EVAL_PURPOSE_HEADER, "").lower() == "eval":
        if caller is None or not caller.can("admin"):
            raise PermissionDenied(f"{EVAL_PURPOSE_HEADER}: eval keeps a request out of capture and drift; it "
                                   "needs an admin key")
        purpose = "eval"
    ctx.limiter.admit(caller)
    return caller, purpose


async def chat_completions(request: Request) -> Response:
    ctx = context(request)
    caller, purpose = await _caller(request, ctx)
    body = await read_json_body(request)
    parsed = validate_body(ChatRequest, body)
    check_limits("chat", body, ctx.config.serving.limits)
    route = ctx.router.resolve(parsed.model)
    messages = [m.model_dump(exclude_none=True) for m in parsed.messages]
    signal: SignalPlan | None = None
    if route.task:
        task = ctx.config.tasks[route.task]
        if not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        constrained = constrain_to_labels(body, task)
        if purpose == "user":
            signal = plan_signal(body, task, constrained=constrained, stream=parsed.stream)
    body["messages"] = messages
    users = [text_content(m.get("content")) for m in messages if m["role"] == "user"]
    return await forward(ctx, ProxiedRequest(route=route, endpoint="chat", body=body,
                                             prompt_text=users[-1] if users else "", messages=messages,
                                             stream=parsed.stream, purpose=purpose, caller=caller,
                                             signal=signal))


async def completions(request: Request) -> Response:
    ctx = context(request)
    caller, purpose = await _caller(request, ctx)
    body = await read_json_body(request)
    parsed = validate_body(CompletionRequest, body)
    check_limits("completion", body, ctx.config.serving.limits)
    route = ctx.router.resolve(parsed.model)
    if route.task:
        constrain_to_labels(body, ctx.config.tasks[route.task])
    prompt = parsed.prompt if isinstance(parsed.prompt, str) else "\n".join(parsed.prompt)
    return await forward(ctx, ProxiedRequest(route=route, endpoint="completion", body=body, prompt_text=prompt,
                                             messages=[{"role": "user", "content": prompt}], stream=parsed.stream,
                                             purpose=purpose, caller=caller))


async def models(request: Request) -> Response:
    ctx = context(request)
    await _caller(request, ctx)
    now = int(time.time())
    names = [*sorted(ctx.router.champions), *sorted(ctx.engine.client.loaded), ctx.config.base_model.name]
    return JSONResponse({"object": "list", "data": [{"id": n, "object": "model", "created": now,
                                                     "owned_by": "tuneloop"} for n in dict.fromkeys(names)]})


def routes() -> list[BaseRoute]:
    return [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"])]
