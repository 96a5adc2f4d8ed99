"""The gateway's per-adapter series are bounded by what is served now, not by every version ever answered with:
one hundred tasks through five versions each leave one hundred adapters' series, and the gateway's upkeep drops an
adapter's series once it is neither routed nor loaded."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from tests.serving.test_gateway import _gateway
from tuneloop.serving.metrics import GatewayMetrics
from tuneloop.serving.server import follow_registry


def _adapters_with_series(registry: CollectorRegistry) -> set[str]:
    return {sample.labels["adapter"] for family in registry.collect() for sample in family.samples
            if "adapter" in sample.labels}


def _answer(metrics: GatewayMetrics, task: str, adapter: str, route: str = "champion") -> None:
    labels = {"task": task, "adapter": adapter, "route": route}
    metrics.requests.labels(**labels, status="200").inc()
    metrics.latency.labels(**labels).observe(0.1)
    metrics.prompt_tokens.labels(**labels).inc(12)
    metrics.completion_tokens.labels(**labels).inc(3)


def test_a_hundred_tasks_through_five_versions_keep_the_series_of_the_hundred_served() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    tasks = [f"task{i:03d}" for i in range(100)]
    for version in range(1, 6):
        for task in tasks:
            _answer(metrics, task, f"{task}@{version}")
            if version == 5:
                metrics.errors.labels(task=task, adapter=f"{task}@5", route="champion", status="503").inc()
    _answer(metrics, "base", "base", route="base")
    assert len(_adapters_with_series(registry)) == 501

    served = {f"{task}@5" for task in tasks}
    removed = metrics.retire(served)

    assert _adapters_with_series(registry) == served | {"base"}
    assert removed == 400 * 4, "four per-adapter families answered each of the 400 retired versions"
    for task in tasks[:3]:  # what is still served keeps its counts
        labels = {"task": task, "adapter": f"{task}@5", "route": "champion"}
        assert registry.get_sample_value("tuneloop_gateway_requests_total", {**labels, "status": "200"}) == 1
        assert registry.get_sample_value("tuneloop_gateway_request_errors_total", {**labels, "status": "503"}) == 1
        assert registry.get_sample_value("tuneloop_gateway_prompt_tokens_total", labels) == 12
    assert registry.get_sample_value("tuneloop_gateway_requests_total",
                                     {"task": "base", "adapter": "base", "route": "base", "status": "200"}) == 1
    assert metrics.retire(served) == 0, "nothing left to drop"


def test_the_gateway_upkeep_drops_a_replaced_champion_once_it_is_unloaded(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path):
        assert gateway.chat("sentiment", "the flight was fine").status_code == 200
        gateway.ctx.swapper.promote("sentiment@2")
        assert gateway.chat("sentiment", "the flight was late").status_code == 200
        labels = {"task": "sentiment", "route": "champion", "status": "200"}
        assert gateway.sample("tuneloop_gateway_requests_total", adapter="sentiment@1", **labels) == 1

        follow_registry(gateway.ctx)  # sentiment@1 is still loaded (the unload grace period): kept
        assert gateway.sample("tuneloop_gateway_requests_total", adapter="sentiment@1", **labels) == 1

        assert gateway.engine.client.unload("sentiment@1")
        follow_registry(gateway.ctx)
        assert "sentiment@1" not in _adapters_with_series(gateway.ctx.registry)
        assert gateway.sample("tuneloop_gateway_requests_total", adapter="sentiment@2", **labels) == 1
        assert gateway.sample("tuneloop_gateway_requests_total", adapter="chat@1", **labels) == 0, "never asked"
        assert {"sentiment@2"} <= _adapters_with_series(gateway.ctx.registry)
