"""`tuneloop serve`: engine + gateway + capture writer in one foreground process.

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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import httpx
from prometheus_client import CollectorRegistry

from tuneloop.monitor.exporter import MonitorCollector
from tuneloop.serving.capture import CaptureWriter
from tuneloop.serving.engine import EngineSpec, EngineSupervisor, ServingEngine
from tuneloop.serving.engine_client import EngineLimits, check_servable
from tuneloop.serving.gateway import GatewayContext, create_app
from tuneloop.serving.hotswap import HotSwapper
from tuneloop.serving.metrics import GatewayMetrics, ServingStateCollector
from tuneloop.serving.redact import Redactor
from tuneloop.serving.routing import Router
from tuneloop.basemodel import ensure_base_model
from tuneloop.config import Config
from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.registry import AdapterVersion, find_alias
from tuneloop.store import Store

log = logging.getLogger(__name__)


class ShutdownRequested(Exception):
    """SIGTERM arrived: leave the serving loop through its cleanup."""


def _raise_shutdown(_signum: int, _frame: object) -> None:
    raise ShutdownRequested


@dataclass
class ServedAdapters:
    adapters: list[AdapterVersion]
    max_rank: int
    target_modules: list[str]


def plan_adapters(config: Config, store: Store, base_sha256: str) -> ServedAdapters:
    """Champions and candidates of every task, checked, plus the LoRA flags they and the recipes need."""
    adapters: list[AdapterVersion] = []
    ranks = [t.train.rank for t in config.tasks.values() if t.train.method == "lora"]
    targets: set[str] = {m for t in config.tasks.values() if t.train.method == "lora" for m in t.train.target_modules}
    for task in config.tasks:
        for alias in ("champion", "candidate"):
            version = find_alias(store, task, alias)  # type: ignore[arg-type]
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


def build_engine(config: Config, store: Store) -> tuple[EngineSupervisor, str]:
    base = ensure_base_model(config)
    plan = plan_adapters(config, store, base.sha256)
    spec = EngineSpec(model_path=base.path, served_name=config.base_model.name, host=config.serving.vllm_host,
                      port=config.serving.vllm_port, max_model_len=config.serving.max_model_len,
                      max_lora_rank=plan.max_rank, max_loras=config.serving.max_loras,
                      lora_target_modules=plan.target_modules,
                      lora_modules={a.ref: a.path for a in plan.adapters}, kv_cache_gib=config.serving.kv_cache_gib,
                      lora_ops=config.serving.lora_ops, base_sha256=base.sha256,
                      prefix_caching=config.serving.prefix_caching,
                      cpu_reserved_cores=config.serving.cpu_reserved_cores)
    engine = EngineSupervisor(spec, config.data_path / "logs" / "vllm.log",
                              start_timeout_s=config.serving.start_timeout_s)
    return engine, base.sha256


def build_context(config: Config, store: Store, engine: ServingEngine, *, seed: int | None = None,
                  upstream_transport: httpx.AsyncBaseTransport | None = None) -> GatewayContext:
    """The gateway's shared state around an engine (a supervised vLLM, or a test's stand-in)."""
    registry = CollectorRegistry()
    router = Router(config, store, lambda: set(engine.client.loaded), seed=seed)
    router.refresh()
    capture = CaptureWriter(store, config.data_path / "spill", max_queue=config.serving.capture_queue_size)
    redactor = Redactor(config.serving.redact)
    swapper = HotSwapper(store, engine.client.limits, client=engine.client, router=router,
                         grace_s=config.serving.unload_grace_s)
    registry.register(ServingStateCollector(engine, capture, redactor))
    registry.register(MonitorCollector(config, store))
    return GatewayContext(config=config, engine=engine, router=router, capture=capture, swapper=swapper,
                          redactor=redactor, registry=registry, metrics=GatewayMetrics(registry),
                          upstream_transport=upstream_transport)


class Background(Protocol):
    """Something that runs beside the gateway (the scheduler): started once vLLM is ready, stopped first."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def serve(config: Config, store: Store, *, background: Background | None = None) -> None:
    """Run until interrupted: vLLM first (blocking until ready), then the gateway on its port (and `background`)."""
    import uvicorn

    engine, _ = build_engine(config, store)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; make that an exception so the engine and the
    # capture writer below are still stopped and flushed.
    signal.signal(signal.SIGTERM, _raise_shutdown)
    engine.start()
    ctx = build_context(config, store, engine)
    ctx.capture.start()
    ctx.capture.replay_spill()
    try:
        if background is not None:
            background.start()
        uvicorn.run(create_app(ctx), host=config.serving.gateway_host, port=config.serving.gateway_port,
                    log_level="info", access_log=False)
    except ShutdownRequested:
        log.info("shutting down on SIGTERM")
    finally:
        if background is not None:
            background.stop()
        ctx.capture.close()
        engine.stop()


@dataclass
class RunningServer:
    """An engine and gateway started by `running_server`; `url` is the gateway's base URL."""

    url: str
    engine: EngineSupervisor
    ctx: GatewayContext


@contextlib.contextmanager
def running_server(config: Config, store: Store, *, seed: int | None = None,
                   background: Background | None = None) -> Iterator[RunningServer]:
    """Engine + gateway (uvicorn on a thread) for the demo, tests and benchmarks; stopped on exit."""
    import uvicorn

    engine, _ = build_engine(config, store)
    engine.start()
    ctx = build_context(config, store, engine, seed=seed)
    ctx.capture.start()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host=config.serving.gateway_host,
                                           port=config.serving.gateway_port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise EngineUnavailable(f"the gateway did not start on port {config.serving.gateway_port}")
        if background is not None:
            background.start()
        yield RunningServer(url=f"http://{config.serving.gateway_host}:{config.serving.gateway_port}",
                            engine=engine, ctx=ctx)
    finally:
        if background is not None:
            background.stop()
        server.should_exit = True
        thread.join(15)
        ctx.capture.close()
        engine.stop()
