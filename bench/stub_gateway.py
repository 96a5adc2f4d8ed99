"""`python -m bench.stub_gateway CONFIG [UPSTREAM_URL]`: the real gateway (routing, auth, limits, capture into the
configured store) over an engine that answers every request at once, in a process of its own, for measuring what
the gateway and its database cost without an engine's time in the way.

Without UPSTREAM_URL the engine is an httpx mock transport inside the gateway's process: no network hop, no model;
every answer is one label and 2 completion tokens (bench/bench_scale.py). With it, the gateway proxies over
loopback HTTP to that server (bench/stub_upstream.py), exactly as it does to vLLM (bench/bench_gateway.py).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import httpx
import uvicorn

from tuneloop.config import load_config
from tuneloop.serving.engine import EngineState
from tuneloop.serving.engine_client import EngineClient, EngineLimits
from tuneloop.serving.gateway import create_app
from tuneloop.serving.server import build_context, server_config
from tuneloop.store import Store

ENGINE = "http://stub-engine.invalid"


def answer(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "sentiment@1"}]})
    body = json.loads(request.content)
    return httpx.Response(200, json={"model": body["model"], "usage": {"prompt_tokens": 30, "completion_tokens": 2},
                                     "choices": [{"message": {"role": "assistant", "content": "negative"}}]})


class InstantEngine:
    """A ServingEngine whose adapters are whatever the registry names."""

    def __init__(self, upstream: str | None = None) -> None:
        transport = None if upstream else httpx.MockTransport(answer)
        self.client = EngineClient(upstream or ENGINE, EngineLimits("", 64), transport=transport)
        self.client.adopt("sentiment@1", Path("/nowhere"))
        self.state: EngineState = "ready"
        self.restarts = 0
        self.base_url = upstream or ENGINE
        self.auth_headers: dict[str, str] = {}


def main() -> None:
    config = load_config(Path(sys.argv[1]))
    store = Store(config.resolved_database_url)
    upstream = sys.argv[2] if len(sys.argv) > 2 else None
    ctx = build_context(config, store, InstantEngine(upstream),
                        upstream_transport=None if upstream else httpx.MockTransport(answer))
    ctx.capture.start()
    server = uvicorn.Server(server_config(config, create_app(ctx)))
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    thread.join()
    ctx.capture.close()
    store.close()


if __name__ == "__main__":
    main()
