"""The serving side of a retraining job: a job that reaches its gate while the gateway restarts waits for it
(bounded by jobs.gateway_wait_s) instead of failing an hour of training on a minute of restart."""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.monitor.helpers import register_champion
from tuneloop.conductor import deployment as deployment_module
from tuneloop.conductor.deployment import GatewayDeployment
from tuneloop.config import Config
from tuneloop.ports import free_port
from tuneloop.registry import get_adapter
from tuneloop.serving.admin_client import GatewayNotRunning
from tuneloop.store import Store


async def models(_request: Request) -> JSONResponse:
    return JSONResponse({"data": [{"id": "sentiment@1"}]})


def test_the_gate_waits_for_a_restarting_gateway_and_gives_up_after_its_bound(
        config: Config, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    register_champion(store, "sentiment", 1)
    version = get_adapter(store, "sentiment@1")
    config.serving.gateway_port = free_port()
    config.jobs.gateway_wait_s = 0
    with pytest.raises(GatewayNotRunning):
        GatewayDeployment(config, store).endpoint_for(version)
    monkeypatch.setattr(deployment_module, "GATEWAY_POLL_S", 0.2)
    config.jobs.gateway_wait_s = 60
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/models", models)]), host="127.0.0.1",
                                           port=config.serving.gateway_port, log_level="error"))
    late = threading.Timer(1.5, server.run)  # the gateway comes back 1.5 s into the wait
    late.start()
    try:
        started = time.monotonic()
        url = GatewayDeployment(config, store).endpoint_for(version)
        assert url == f"http://127.0.0.1:{config.serving.gateway_port}"
        assert time.monotonic() - started >= 1.0, "it waited for the gateway rather than failing"
    finally:
        server.should_exit = True
        late.join(10)
