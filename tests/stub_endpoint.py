"""A scripted OpenAI-compatible endpoint on a real loopback port, for fast tests of code that asks "the endpoint
users call" over HTTP (scheduled evals, the gate, the watch) without an engine. Each answer comes from a function
of (model, user text); every request is recorded."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from tuneloop.ports import free_port

Answer = Callable[[str, str], str]


@dataclass
class StubEndpoint:
    url: str
    answer: Answer
    asked: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def serving_app(app: ASGIApp) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port, on a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def stub_endpoint(answer: Answer) -> Iterator[StubEndpoint]:
    asked: list[tuple[str, str]] = []

    async def chat(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        text = str(body["messages"][-1]["content"])
        asked.append((body["model"], text))
        return JSONResponse({"model": body["model"], "usage": {"completion_tokens": 1},
                             "choices": [{"message": {"role": "assistant", "content": answer(body["model"], text)}}]})

    with serving_app(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as url:
        yield StubEndpoint(url=url, answer=answer, asked=asked)
