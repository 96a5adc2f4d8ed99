"""Adapter changes for engine replicas, against a scripted Serve REST API (the live test on a real Ray Serve is
tests/serving/test_replicas_live.py): a load is one config change that must reach every replica before it
returns; a replica that cannot apply it makes the client put the previous set back and refuse, so the champion
alias never flips onto an adapter some replica lacks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.serving.test_hotswap import BASE, _register
from tests.stub_endpoint import serving_app
from tuneloop.config import Config
from tuneloop.errors import AdapterError
from tuneloop.registry import get_adapter
from tuneloop.serving import replicated_engine
from tuneloop.serving.engine import EngineSpec
from tuneloop.serving.replicated_engine import ReplicatedEngine, engine_key
from tuneloop.store import Store


@dataclass
class FakeServe:
    """Serve's REST API as the client sees it: each PUT is applied by `replicas` replicas, unless a replica
    refuses an adapter named in `refuse`."""

    replicas: int = 2
    refuse: set[str] = field(default_factory=set)
    puts: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def app(self) -> Starlette:
        async def put(request: Request) -> JSONResponse:
            body = json.loads(await request.body())
            self.puts.append(body)
            deployment = body["applications"][0]["deployments"][0]
            wanted = set(deployment["user_config"]["adapters"])
            failed = wanted & self.refuse
            self.state = {"status": "DEPLOY_FAILED" if failed else "HEALTHY",
                          "status_trigger": "REPLICA_STARTUP_FAILED" if failed else "CONFIG_UPDATE_COMPLETED",
                          "message": f"replica 1: vLLM refused to load {sorted(failed)}" if failed else "",
                          "deployment_config": {"user_config": deployment["user_config"]},
                          "replicas": [{"replica_id": f"r{i}", "state": "RUNNING"} for i in range(self.replicas)]}
            return JSONResponse({})

        async def get(_request: Request) -> JSONResponse:
            return JSONResponse({"applications": {"tuneloop-engine": {
                "status": "RUNNING", "deployments": {"EngineReplica": self.state}}}})

        return Starlette(routes=[Route("/api/serve/applications/", put, methods=["PUT"]),
                                 Route("/api/serve/applications/", get, methods=["GET"])])


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeServe, str]]:
    monkeypatch.setattr(replicated_engine, "POLL_S", 0.05)
    fake = FakeServe()
    with serving_app(fake.app()) as url:
        yield fake, url


def _engine(config: Config, store: Store, url: str, adapters: list[str]) -> ReplicatedEngine:
    config.serving.replicas.engine, config.serving.replicas.ray_address = "ray-serve", url
    config.serving.replicas.apply_timeout_s = 5
    spec = EngineSpec(model_path=Path("/models/base"), served_name="base", max_lora_rank=8, base_sha256=BASE)
    return ReplicatedEngine(config, spec, [get_adapter(store, ref) for ref in adapters])


def _adapters(put: dict[str, Any]) -> list[str]:
    return sorted(put["applications"][0]["deployments"][0]["user_config"]["adapters"])


def test_a_load_reaches_every_replica_before_it_returns_and_a_refusal_restores_the_set(
        serve: tuple[FakeServe, str], config: Config, store: Store, tmp_path: Path) -> None:
    fake, url = serve
    one, two, three = (_register(store, config, tmp_path, name) for name in ("one", "two", "three"))
    engine = _engine(config, store, url, [one])
    engine.start()
    try:
        assert _adapters(fake.puts[-1]) == [one] and engine.state == "ready"
        first = fake.puts[-1]["applications"][0]
        assert first["import_path"] == "tuneloop.serving.replicas:build"
        assert first["args"]["key_sha256"] != engine_key(config.data_path), "only the key's digest is in the config"
        assert first["deployments"][0]["user_config"]["adapters"][one]["sha256"] == get_adapter(
            store, one).card.weights_sha256, "each replica checks the weights against the registry's checksum"
        assert engine.client.load(get_adapter(store, two)) is True
        assert _adapters(fake.puts[-1]) == sorted([one, two]) and set(engine.client.loaded) == {one, two}
        fake.refuse = {three}
        with pytest.raises(AdapterError, match="could not be loaded on every replica.*DEPLOY_FAILED"):
            engine.client.load(get_adapter(store, three))
        assert _adapters(fake.puts[-2]) == sorted([one, three, two]), "it was tried on every replica"
        assert _adapters(fake.puts[-1]) == sorted([one, two]), "and the previous set put back"
        assert set(engine.client.loaded) == {one, two}
        assert engine.client.unload(one) is True and _adapters(fake.puts[-1]) == [two]
    finally:
        engine.stop()


def test_replicas_need_a_ray_cluster_named(config: Config, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.errors import ConfigError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config.serving.replicas.engine = "ray-serve"
    spec = EngineSpec(model_path=Path("/models/base"), served_name="base", base_sha256=BASE)
    with pytest.raises(ConfigError, match="no Ray cluster is named"):
        ReplicatedEngine(config, spec, [])


def test_two_gateways_sharing_the_replicas_do_not_undo_each_others_loads(
        serve: tuple[FakeServe, str], config: Config, store: Store, tmp_path: Path) -> None:
    fake, url = serve
    one, two, three = (_register(store, config, tmp_path, name) for name in ("one", "two", "three"))
    first, second = _engine(config, store, url, [one]), _engine(config, store, url, [one])
    first.start()
    second.start()
    try:
        assert first.client.load(get_adapter(store, two))
        assert second.client.load(get_adapter(store, three)), "second's view had only one"
        assert _adapters(fake.puts[-1]) == sorted([one, two, three]), "the second kept what the first loaded"
        assert second.client.unload(two) and _adapters(fake.puts[-1]) == sorted([one, three])
    finally:
        first.stop()
        second.stop()
