"""Two gateways on one database (a real SQLite file), each with its own stub engine: a promotion or rollback made
through one is loaded into the other's engine and routed there by `HotSwapper.follow`, the poll every gateway runs;
a version the second engine cannot load leaves it on the champion it had."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.serving.test_gateway import BASE_SHA, ENGINE_AUTH, VLLM, FakeVllm, Gateway, StubEngine, _gateway
from tuneloop.serving.engine_client import EngineClient, EngineLimits
from tuneloop.serving.periodic import Periodic
from tuneloop.serving.server import build_context
from tuneloop.serving.state import GatewayContext


def _second_gateway(first: Gateway, tmp_path: Path) -> tuple[GatewayContext, FakeVllm]:
    """Another gateway process's state on the same config and database, with an engine of its own that has
    loaded what the first one started with."""
    vllm = FakeVllm()
    engine = StubEngine(EngineClient(VLLM, EngineLimits(BASE_SHA, 8, ("q_proj", "v_proj")),
                                     transport=httpx.MockTransport(vllm), headers={"Authorization": ENGINE_AUTH}))
    for name in ("sentiment@1", "chat@1"):
        engine.client.adopt(name, tmp_path)
    ctx = build_context(first.config, first.store, engine, seed=0, upstream_transport=httpx.MockTransport(vllm))
    return ctx, vllm


def test_a_promotion_through_one_gateway_is_loaded_and_routed_by_the_other(tmp_path: Path) -> None:
    for first in _gateway(tmp_path):
        second, second_vllm = _second_gateway(first, tmp_path)
        assert second.router.resolve("sentiment").target == "sentiment@1"
        assert second.swapper.follow() == [], "nothing changed yet"

        first.ctx.swapper.promote("sentiment@2")
        assert first.ctx.router.resolve("sentiment").target == "sentiment@2"
        assert second.router.resolve("sentiment").target == "sentiment@1", "not followed yet"
        assert second.swapper.follow() == ["sentiment@2"]
        assert second_vllm.load_calls == ["sentiment@2"], "loaded into the second engine before it is routed"
        assert second.router.resolve("sentiment").target == "sentiment@2"

        first.ctx.swapper.rollback("sentiment")
        assert second.swapper.follow() == ["sentiment@1"]
        assert second.router.resolve("sentiment").target == "sentiment@1"
        assert second_vllm.load_calls == ["sentiment@2"], "sentiment@1 was still loaded there"


def test_a_version_the_other_engine_cannot_load_keeps_it_on_its_champion(tmp_path: Path) -> None:
    for first in _gateway(tmp_path):
        second, second_vllm = _second_gateway(first, tmp_path)
        first.ctx.swapper.promote("sentiment@2")
        second_vllm.down = True  # the second engine refuses every load
        assert second.swapper.follow() == []
        assert second.router.resolve("sentiment").target == "sentiment@1", "no 404s for a version it lacks"
        second_vllm.down = False
        assert second.swapper.follow() == ["sentiment@2"], "retried on the next poll"


def test_the_poll_follows_within_a_few_rounds(tmp_path: Path) -> None:
    for first in _gateway(tmp_path):
        second, _ = _second_gateway(first, tmp_path)
        poll = Periodic("alias-follower", 0.05, second.swapper.follow)
        poll.start()
        try:
            first.ctx.swapper.promote("sentiment@2")
            deadline = time.monotonic() + 10
            while second.router.resolve("sentiment").target != "sentiment@2" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert second.router.resolve("sentiment").target == "sentiment@2"
        finally:
            poll.stop()
