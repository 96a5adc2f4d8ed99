"""What the gateway's handlers share, built once by `tuneloop serve` (or a test) and reached from a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from tuneloop.config import Config
from tuneloop.redact import Redactor
from tuneloop.serving.auth import Authenticator
from tuneloop.serving.capture import CaptureWriter
from tuneloop.serving.engine import ServingEngine
from tuneloop.serving.hotswap import HotSwapper
from tuneloop.serving.membership import GatewayMembership
from tuneloop.serving.metrics import GatewayMetrics
from tuneloop.serving.ratelimit import RateLimiter
from tuneloop.serving.retention import TrafficRetention
from tuneloop.serving.routing import Router
from tuneloop.serving.upstream import Upstream


@dataclass
class GatewayContext:
    config: Config
    engine: ServingEngine
    router: Router
    capture: CaptureWriter
    swapper: HotSwapper
    redactor: Redactor
    registry: CollectorRegistry
    metrics: GatewayMetrics
    auth: Authenticator
    limiter: RateLimiter
    retention: TrafficRetention
    membership: GatewayMembership | None = field(default=None, metadata={
        "help": "This gateway's entry among those sharing the database (rate-limit shares)."})
    openapi: dict[str, Any] = field(default_factory=dict, metadata={"help": "Served at /openapi.json."})
    upstream_transport: httpx.AsyncBaseTransport | None = field(
        default=None, metadata={"help": "Tests put a stub vLLM here; None = real HTTP to engine.base_url."})
    client: Upstream | None = field(default=None, metadata={"help": "Set while the app runs (its lifespan)."})
    background: set[asyncio.Task[Any]] = field(default_factory=set)


def context(request: Request) -> GatewayContext:
    ctx: GatewayContext = request.app.state.ctx
    return ctx
