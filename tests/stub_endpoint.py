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

from tests.live import free_port

Answer = Callable[[str, str], str]


@dataclass
class StubEndpoint:
    url: str
    answer: Answer
    asked: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def stub_endpoint(answer: Answer) -> Iterator[StubEndpoint]:
    port = free_port()
    stub = StubEndpoint(url=f"http://127.0.0.1:{port}", answer=answer)

    async def chat(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        text = str(body["messages"][-1]["content"])
        stub.asked.append((body["model"], text))
        return JSONResponse({"model": body["model"], "usage": {"completion_tokens": 1},
                             "choices": [{"message": {"role": "assistant", "content": stub.answer(body["model"],
                                                                                                   text)}}]})

    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield stub
    finally:
        server.should_exit = True
        thread.join(10)
