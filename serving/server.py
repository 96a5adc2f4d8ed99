"""The serving process: engine + gateway + capture writer, started and stopped in one sequence.

`running_server` is that sequence (engine first, blocking until ready; the gateway's context, the capture writer
and the replay of its spill file; uvicorn; then whatever runs beside it); `serve` runs it in the foreground until
SIGINT or SIGTERM. What the gateway serves beyond inference and admin (the Alertmanager webhook, the monitor's and
retraining's metrics) is handed in as `GatewayExtensions` by whoever assembles the process (tuneloop/conductor/),
so this package imports neither.

The engine's LoRA flags come from the adapters it will serve (every task's champion and candidate) and the
tasks' training recipes (so a freshly trained adapter can be hot-swapped in without a restart), never a
generous default: vLLM pads to --max-lora-rank and computes every targeted module.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import httpx
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from tuneloop.basemodel import BaseModelFolder, ensure_base_model
from tuneloop.config import Config
from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.modelinfo import model_modules
from tuneloop.redact import Redactor
from tuneloop.registry import ALIASES, AdapterVersion, find_alias
from tuneloop.serving.auth import Authenticator
from tuneloop.serving.capture import CaptureWriter
from tuneloop.serving.engine import EngineSpec, EngineSupervisor, ServingEngine
from tuneloop.serving.engine_client import EngineLimits, check_servable
from tuneloop.serving.gateway import GatewayContext, create_app
from tuneloop.serving.hotswap import HotSwapper
from tuneloop.serving.membership import GatewayMembership
from tuneloop.serving.metrics import GatewayMetrics, ServingStateCollector
from tuneloop.serving.openapi import openapi_document
from tuneloop.serving.periodic import Periodic
from tuneloop.serving.ratelimit import RateLimiter
from tuneloop.serving.replicated_engine import ReplicatedEngine
from tuneloop.serving.retention import TrafficRetention
from tuneloop.serving.routing import Router
from tuneloop.serving.slow_clients import ClientTimeouts, HeadTimeoutProtocol
from tuneloop.store import Store

log = logging.getLogger(__name__)


class ShutdownRequested(Exception):
    """SIGTERM arrived: leave the serving loop through its cleanup."""


def _raise_shutdown(_signum: int, _frame: object) -> None:
    raise ShutdownRequested


@dataclass(frozen=True)
class GatewayExtensions:
    """Routes and Prometheus collectors added to the gateway by whoever assembles the process."""

    routes: Sequence[BaseRoute] = field(default_factory=tuple)
    collectors: Sequence[Collector] = field(default_factory=tuple)
    openapi_paths: Mapping[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "The routes' entries in the gateway's OpenAPI document (serving/openapi.py)."})


@dataclass
class ServedAdapters:
    adapters: list[AdapterVersion]
    max_rank: int
    target_modules: list[str]


def plan_adapters(config: Config, store: Store, base: BaseModelFolder) -> ServedAdapters:
    """Champions and candidates of every task, checked, plus the LoRA flags they and the recipes need (a recipe
    without target modules trains the base model's attention projections, read from the model)."""
    adapters: list[AdapterVersion] = []
    base_sha256 = base.sha256
    recipes = [t.train for t in config.tasks.values() if t.train.method == "lora"]
    ranks = [r.rank for r in recipes]
    targets: set[str] = {m for r in recipes for m in r.target_modules or ()}
    if any(r.target_modules is None for r in recipes):
        targets.update(model_modules(base.path).attention)
    for task in config.tasks:
        for alias in ALIASES:
            version = find_alias(store, task, alias)
            if version is None or version in adapters:
                continue
            try:
                check_servable(version, offline_limits(config, base_sha256))
            except AdapterError as exc:
                log.error("not serving %s %s: %s", alias, version.ref, exc)
                continue
            adapters.append(version)
            ranks.append(int(version.card.hyperparameters.get("rank", 1)))
            targets.update(version.card.hyperparameters.get("target_modules", []))
    return ServedAdapters(adapters=adapters, max_rank=max(ranks or [config.serving.max_lora_rank]),
                          target_modules=sorted(targets))


def offline_limits(config: Config, base_sha256: str) -> EngineLimits:
    """What the next `tuneloop serve` can serve: the configured base, ranks up to serving.max_lora_rank, any
    targets (its --lora-target-modules are derived from the adapters). Used where no engine runs."""
    return EngineLimits(base_sha256, config.serving.max_lora_rank, ())


def build_engine(config: Config, store: Store) -> tuple[EngineSupervisor | ReplicatedEngine, str]:
    """The engine `serving.replicas.engine` names: the supervised single vLLM, or replicas on Ray Serve."""
    base = ensure_base_model(config)
    plan = plan_adapters(config, store, base)
    spec = EngineSpec(model_path=base.path, served_name=config.base_model.name, host=config.serving.vllm_host,
                      port=config.serving.vllm_port, max_model_len=config.serving.max_model_len,
                      max_lora_rank=plan.max_rank, max_loras=config.serving.max_loras,
                      max_cpu_loras=config.serving.max_cpu_loras,
                      lora_target_modules=plan.target_modules,
                      lora_modules={a.ref: a.path for a in plan.adapters}, kv_cache_gib=config.serving.kv_cache_gib,
                      lora_ops=config.serving.lora_ops, lora_compile=config.serving.lora_compile,
                      base_sha256=base.sha256,
                      prefix_caching=config.serving.prefix_caching,
                      cpu_reserved_cores=config.serving.cpu_reserved_cores)
    if config.serving.replicas.engine == "ray-serve":
        return ReplicatedEngine(config, spec, plan.adapters), base.sha256
    engine = EngineSupervisor(spec, config.data_path / "logs" / "vllm.log",
                              start_timeout_s=config.serving.start_timeout_s)
    return engine, base.sha256


def build_context(config: Config, store: Store, engine: ServingEngine, *,
                  extensions: GatewayExtensions = GatewayExtensions(), seed: int | None = None,
                  upstream_transport: httpx.AsyncBaseTransport | None = None) -> GatewayContext:
    """The gateway's shared state around an engine (a supervised vLLM, or a test's stand-in)."""
    registry = CollectorRegistry()
    router = Router(config, store, lambda: set(engine.client.loaded), seed=seed)
    router.refresh()
    redactor = Redactor(config.serving.redact)
    capture = CaptureWriter(store, config.data_path / "spill", redactor=redactor,
                            max_queue=config.serving.capture_queue_size,
                            max_queue_bytes=config.serving.capture_queue_mib * 2**20)
    swapper = HotSwapper(store, engine.client.limits, client=engine.client, router=router,
                         grace_s=config.serving.unload_grace_s)
    retention = TrafficRetention(store, config.serving.retention)
    membership = GatewayMembership(store, f"http://{config.serving.gateway_host}:{config.serving.gateway_port}",
                                   poll_s=config.serving.alias_poll_s)
    registry.register(ServingStateCollector(engine, capture, redactor, retention, membership))
    for collector in extensions.collectors:
        registry.register(collector)
    return GatewayContext(config=config, engine=engine, router=router, capture=capture, swapper=swapper,
                          redactor=redactor, registry=registry, metrics=GatewayMetrics(registry),
                          auth=Authenticator(store, config.admin_token),
                          limiter=RateLimiter(gateways=lambda: membership.live), retention=retention,
                          membership=membership,
                          openapi=openapi_document(config.serving.limits, extensions.openapi_paths),
                          upstream_transport=upstream_transport)


def server_config(config: Config, app: ASGIApp, *, log_level: str = "warning",
                  port: int | None = None) -> uvicorn.Config:
    """uvicorn's settings for the gateway. Bounded at the server: connections and in-flight requests together
    (beyond it uvicorn answers 503), idle keep-alive connections, a request head of at most 16 KiB (h11's
    incomplete-event limit) that must be complete within head_timeout_s, and slow bodies and stalled readers
    (serving/slow_clients.py)."""
    settings = config.serving
    return uvicorn.Config(ClientTimeouts(app, body_timeout_s=settings.body_timeout_s,
                                         send_timeout_s=settings.send_timeout_s),
                          host=settings.gateway_host, port=settings.gateway_port if port is None else port,
                          log_level=log_level, access_log=False,
                          http=HeadTimeoutProtocol.with_timeout(settings.head_timeout_s),
                          limit_concurrency=settings.max_connections, timeout_keep_alive=5,
                          h11_max_incomplete_event_size=16 * 1024,
                          timeout_graceful_shutdown=settings.shutdown_grace_s)


class Background(Protocol):
    """Something that runs beside the gateway (the scheduler): started once the gateway listens, stopped first."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class RunningServer:
    """An engine and gateway started by `running_server`; `url` is the gateway's base URL."""

    url: str
    engine: EngineSupervisor | ReplicatedEngine
    ctx: GatewayContext
    thread: threading.Thread


def follow_registry(ctx: GatewayContext) -> None:
    """The gateway's periodic upkeep: route as the registry says now (a flip made elsewhere), then drop the
    per-adapter series of adapters neither routed nor loaded, which bounds them by what is served."""
    ctx.swapper.follow()
    served = set(ctx.router.loaded()) | {f"{task}@{v}" for (task, _alias), v in ctx.router.current().items()}
    removed = ctx.metrics.retire(served)
    if removed:
        log.info("metrics: dropped %d series of adapters no longer served", removed)


@contextlib.contextmanager
def running_server(config: Config, store: Store, *, extensions: GatewayExtensions = GatewayExtensions(),
                   background: Background | None = None, seed: int | None = None,
                   log_level: str = "warning") -> Iterator[RunningServer]:
    """Engine, gateway (uvicorn on a thread) and `background`, started in order and stopped in reverse.

    Captured traffic that a previous process spilled to disk is replayed before the gateway takes requests."""
    engine, _ = build_engine(config, store)
    ctx: GatewayContext | None = None
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    follower: Periodic | None = None
    members: Periodic | None = None
    started_background = False
    try:
        engine.start()
        ctx = build_context(config, store, engine, extensions=extensions, seed=seed)
        ctx.capture.start()
        ctx.capture.replay_spill()
        ctx.retention.start()
        follower = Periodic("alias-follower", config.serving.alias_poll_s, partial(follow_registry, ctx))
        follower.start()
        assert ctx.membership is not None
        with contextlib.suppress(Exception):  # the database may be away at start; the next beat retries
            ctx.membership.beat()
        members = Periodic("gateway-membership", config.serving.alias_poll_s, ctx.membership.beat)
        members.start()
        server = uvicorn.Server(server_config(config, create_app(ctx, routes=extensions.routes),
                                              log_level=log_level))
        thread = threading.Thread(target=server.run, name="gateway", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise EngineUnavailable(f"the gateway did not start on {config.serving.gateway_host}:"
                                    f"{config.serving.gateway_port} (is the port in use?)")
        if background is not None:
            background.start()
            started_background = True
        yield RunningServer(url=f"http://{config.serving.gateway_host}:{config.serving.gateway_port}",
                            engine=engine, ctx=ctx, thread=thread)
    finally:
        if started_background and background is not None:
            background.stop()
        if server is not None and thread is not None:
            server.should_exit = True
            # uvicorn lets requests in flight finish for shutdown_grace_s; the capture writer closes after them, so
            # what they answered is written (a record that still comes later is spilled, serving/capture.py).
            thread.join(config.serving.shutdown_grace_s + 5)
        if follower is not None:
            follower.stop()
        if members is not None:
            members.stop()
        if ctx is not None and ctx.membership is not None:
            ctx.membership.leave()
        if ctx is not None:
            ctx.swapper.close()
            ctx.retention.stop()
            ctx.capture.close()
        engine.stop()


def serve(config: Config, store: Store, *, extensions: GatewayExtensions = GatewayExtensions(),
          background: Background | None = None) -> None:
    """`running_server` in the foreground until SIGINT or SIGTERM (or the gateway stops by itself)."""
    # The default SIGTERM would end the process without the cleanup above: make it an exception instead.
    signal.signal(signal.SIGTERM, _raise_shutdown)
    try:
        with running_server(config, store, extensions=extensions, background=background,
                            log_level="info") as running:
            log.info("gateway on %s, vLLM on %s", running.url, running.engine.base_url)
            while running.thread.is_alive():
                running.thread.join(0.5)
            log.error("the gateway stopped by itself; shutting down")
    except (KeyboardInterrupt, ShutdownRequested):
        log.info("shutting down")
