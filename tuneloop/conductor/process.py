"""Assembling tuneloop's processes from their parts, once for every caller.

- `tuneloop serve`: vLLM + the gateway, with the webhook route and the monitor's and retraining's collectors;
- `tuneloop run`: the same plus the scheduler and the job reaper beside it;
- `tuneloop exporter`: the two collectors alone;
- `running(...)`: `serve`/`run` in a context manager, for the demo, tests and benchmarks.

The start-up sequence itself (engine, capture, spill replay, uvicorn, background) is serving/server.py's
`running_server`; this module decides what goes into it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from tuneloop import failpoints
from tuneloop.conductor.deployment import GatewayDeployment
from tuneloop.conductor.loop import Loop
from tuneloop.conductor.webhook import AlertmanagerWebhook
from tuneloop.config import Config
from tuneloop.monitor.exporter import MonitorCollector
from tuneloop.retrain.metrics import RetrainCollector
from tuneloop.retrain.runner import JobRunner, LocalRunner
from tuneloop.serving.admin_client import gateway_url
from tuneloop.serving.server import Background, GatewayExtensions, RunningServer, running_server
from tuneloop.serving.server import serve as serve_gateway
from tuneloop.store import Store

log = logging.getLogger(__name__)

WORKER_MODULE = "tuneloop.conductor.worker"


def job_runner(config: Config, kind: str | None = None) -> JobRunner:
    """Where retraining jobs run: jobs.runner, or `kind` (the runner an existing job was started on)."""
    if (kind or config.jobs.runner) == "ray":
        from tuneloop.retrain.ray_runner import RayRunner

        return RayRunner(config, worker_module=WORKER_MODULE)
    return LocalRunner(config, worker_module=WORKER_MODULE)


def assemble_loop(config: Config, store: Store, *, runner: JobRunner | None = None) -> Loop:
    return Loop(config, store, runner=runner or job_runner(config), deployment=GatewayDeployment(config, store),
                endpoint=gateway_url(config))


def collectors(config: Config, store: Store) -> list[Collector]:
    """Every store-backed Prometheus collector; the gateway's own serving metrics come with the gateway."""
    return [MonitorCollector(config, store), RetrainCollector(config, store)]


def extensions(loop: Loop) -> GatewayExtensions:
    webhook = AlertmanagerWebhook(loop)
    return GatewayExtensions(routes=webhook.routes(), collectors=collectors(loop.config, loop.store),
                             openapi_paths=webhook.openapi_paths())


def exporter_registry(config: Config, store: Store) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors(config, store):
        registry.register(collector)
    return registry


class Reaper:
    """Ends retraining jobs whose worker died (JobStore.reap) every `every_s`, beside the scheduler: a read
    command never does it, and a dead job would hold its task's lock until the next trigger. A dead job's
    candidate is unloaded from the engine through `loop`'s deployment."""

    def __init__(self, loop: Loop, *, every_s: float | None = None) -> None:
        self.config, self.loop = loop.config, loop
        self.every_s = every_s or max(1.0, self.config.jobs.stale_after_s / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.loop.reap_jobs()
            except Exception as exc:  # noqa: BLE001 - the database may be away; try again next time
                log.warning("job reaper: %s", exc)


class Together:
    """Several backgrounds as one: started in order, stopped in reverse."""

    def __init__(self, parts: Sequence[Background]) -> None:
        self.parts = list(parts)

    def start(self) -> None:
        for part in self.parts:
            part.start()

    def stop(self) -> None:
        for part in reversed(self.parts):
            part.stop()


def _background(loop: Loop, schedule: bool) -> Background | None:
    if not schedule:
        return None
    return Together([loop.scheduler(), Reaper(loop)])


def serve(config: Config, store: Store, *, schedule: bool = False) -> None:
    """`tuneloop serve` (schedule=False) and `tuneloop run` (schedule=True), in the foreground. A machine that never
    ran `tuneloop init` gets its local admin credential here, so the CLI beside the gateway can administer it."""
    failpoints.active()  # a mistyped TUNELOOP_FAILPOINTS fails here, not at the step it meant to crash
    config.ensure_local_credential()
    loop = assemble_loop(config, store)
    serve_gateway(config, store, extensions=extensions(loop), background=_background(loop, schedule))


@dataclass(frozen=True)
class RunningLoop:
    server: RunningServer
    loop: Loop

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def running(config: Config, store: Store, *, schedule: bool = False, seed: int | None = None,
            runner: JobRunner | None = None) -> Iterator[RunningLoop]:
    """The assembled process in this one (uvicorn on a thread): what `serve`/`run` start, for the demo and tests."""
    loop = assemble_loop(config, store, runner=runner)
    with running_server(config, store, extensions=extensions(loop), background=_background(loop, schedule),
                        seed=seed) as server:
        yield RunningLoop(server=server, loop=loop)
