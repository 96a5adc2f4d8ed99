"""Two engine replicas on a real Ray Serve (a throwaway Ray head on 127.0.0.1, bench/ray_cluster.py), each a real
vLLM, behind the real gateway (`serving.replicas.engine: ray-serve`): both serve the champion from the start, a
promotion returns only once the new champion is on both, and a replica SIGKILLed under load costs at most its
requests in flight while the other answers; Serve brings it back with the current champion.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.ray_cluster import ThrowawayRay, throwaway_ray
from tests.live import ADMIN_TOKEN, add_tiny_sets
from tuneloop.config import Config, parse_config
from tuneloop.ports import free_port
from tuneloop.serving.replicated_engine import ReplicatedEngine
from tuneloop.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.ray]


@dataclass
class Replicated:
    url: str
    config: Config
    store: Store
    engine: ReplicatedEngine
    ray: ThrowawayRay

    def ask(self, model: str = "sentiment") -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "@united thanks for the lift"}]})

    def replicas(self) -> list[dict[str, Any]]:
        return [r for r in self.engine.app.deployment().get("replicas", []) if r.get("state") == "RUNNING"]

    def applied(self) -> dict[str, Any]:
        config: dict[str, Any] = self.engine.app.deployment()["deployment_config"]["user_config"]
        return config


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Iterator[Replicated]:
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.server import running_server

    root = tmp_path_factory.mktemp("replicas")
    with throwaway_ray(head_cpus=3) as ray:
        config = parse_config(
            f"data_dir: data\nbase_model:\n  path: {base_model_dir}\n"
            f"serving:\n  gateway_port: {free_port()}\n  vllm_port: {free_port()}\n  max_model_len: 256\n"
            f"  kv_cache_gib: 1\n  admin_token: {ADMIN_TOKEN}\n  unload_grace_s: 1\n  alias_poll_s: 2\n"
            f"  replicas:\n    engine: ray-serve\n    count: 2\n    ray_address: {ray.address}\n"
            f"    http_port: {free_port()}\n    health_check_period_s: 2\n"
            "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n"
            "      eval_every: 100\n",
            config_dir=root)
        store = Store(config.resolved_database_url)
        add_tiny_sets(store, config.data_path)
        for steps in (2, 3):
            finetune(config, store, "sentiment", max_steps=steps, dataset="sentiment/tiny", progress=False)
        with running_server(config, store) as server:
            assert isinstance(server.engine, ReplicatedEngine)
            yield Replicated(url=server.url, config=config, store=store, engine=server.engine, ray=ray)
        store.close()


def test_both_replicas_serve_the_champion_from_the_start(replicated: Replicated) -> None:
    assert len(replicated.replicas()) == 2
    assert sorted(replicated.applied()["adapters"]) == ["sentiment@1"]
    answers = [replicated.ask() for _ in range(12)]
    assert [a.status_code for a in answers] == [200] * 12, answers[-1].text
    assert {a.json()["model"] for a in answers} == {"sentiment@1"}


def test_a_promotion_returns_once_the_new_champion_is_on_every_replica(replicated: Replicated) -> None:
    promoted = httpx.post(f"{replicated.url}/admin/promote", json={"version": "sentiment@2"}, timeout=900,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert promoted.status_code == 200, promoted.text
    assert "sentiment@2" in replicated.applied()["adapters"], "the set every replica applied holds it"
    # Serve's proxy spreads requests over both replicas: were one of them without the adapter, vLLM would refuse.
    answers = [replicated.ask() for _ in range(16)]
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200][:1]
    assert {a.json()["model"] for a in answers} == {"sentiment@2"}


def _engine_processes() -> int:
    """vLLM processes on this machine (API servers, EngineCores, Workers)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        count += text.startswith(b"VLLM::") or b"vllm.entrypoints.openai.api_server" in text and \
            b"engine_guard" not in text
    return count


def test_a_replica_killed_under_load_costs_its_requests_in_flight_and_comes_back_with_the_champion(
        replicated: Replicated) -> None:
    engines_before = _engine_processes()
    statuses: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            async def client() -> None:
                while not stop.is_set():
                    try:
                        response = await http.post(f"{replicated.url}/v1/chat/completions", json={
                            "model": "sentiment", "max_tokens": 2, "temperature": 0,
                            "messages": [{"role": "user", "content": "@united where is my bag"}]})
                        statuses[str(response.status_code)] += 1
                    except httpx.HTTPError as exc:
                        statuses[type(exc).__name__] += 1

            async def fault() -> None:
                await asyncio.sleep(5)
                victim = replicated.replicas()[0]
                os.kill(int(victim["pid"]), signal.SIGKILL)
                await asyncio.sleep(15)
                stop.set()

            await asyncio.gather(*(client() for _ in range(4)), fault())

    asyncio.run(load())
    failed = sum(n for status, n in statuses.items() if status != "200")
    assert statuses["200"] > 0 and failed <= 4, f"at most the 4 requests in flight: {statuses}"
    deadline = time.monotonic() + 900
    while len(replicated.replicas()) < 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert len(replicated.replicas()) == 2, "Serve replaced the dead replica"
    assert replicated.engine.restarts >= 1
    deadline = time.monotonic() + 60  # the dead replica's engine guard ends its vLLM within its grace period
    while _engine_processes() > engines_before and time.monotonic() < deadline:
        time.sleep(1)
    assert _engine_processes() == engines_before, "the dead replica's vLLM (API server, EngineCore, Worker) is gone"
    answers = [replicated.ask() for _ in range(16)]
    assert [a.status_code for a in answers] == [200] * 16 and {a.json()["model"] for a in answers} == {"sentiment@2"}
