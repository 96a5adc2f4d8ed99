"""Schema-driven fuzzing (schemathesis) of every route in the gateway's own OpenAPI document, against the gateway
as `tuneloop serve` assembles it (the conductor's webhook included) behind uvicorn with `server_config`, over real
loopback HTTP, with a stub vLLM and a real SQLite store.

Requests come from the document's schemas, valid and deliberately invalid ones, sent without a credential and with
an inference+feedback key. For every one: no 5xx (the stub engine is up, so not even 503), and afterwards nothing
an unprivileged caller could change has changed: the aliases, the API keys, the loaded adapters, the jobs, every
captured request's reference. Examples per route are few here so the suite stays fast; `make reliability` is where
a longer run belongs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from sqlalchemy import select

from tests.fakes import RecordingDeployment, RecordingRunner
from tests.serving.test_gateway import Gateway, _gateway
from tests.serving.test_slow_clients import served
from tuneloop.conductor.loop import Loop
from tuneloop.conductor.process import extensions
from tuneloop.conductor.webhook import AlertmanagerWebhook
from tuneloop.config import Config
from tuneloop.keys import create_key
from tuneloop.registry import alias_versions
from tuneloop.retrain.jobs import JobStore
from tuneloop.serving.openapi import openapi_document
from tuneloop.serving.server import GatewayExtensions
from tuneloop.store import Store
from tuneloop.tables import ApiKeyRow, TrafficRow

pytestmark = pytest.mark.slow

SCHEMA = schemathesis.openapi.from_dict(openapi_document(extra_paths=AlertmanagerWebhook.openapi_paths()))
EXAMPLES_PER_ROUTE = 25


class Fuzzed:
    def __init__(self, gateway: Gateway, url: str, key: str) -> None:
        self.gateway, self.url, self.key = gateway, url, key
        self.statuses: dict[str, list[int]] = {}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp_path: Path = tmp_path_factory.mktemp("fuzz")

    def conducted(config: Config, store: Store) -> GatewayExtensions:
        return extensions(Loop(config, store, runner=RecordingRunner(), deployment=RecordingDeployment(store),
                               endpoint="http://gateway.test"))

    for gateway in _gateway(tmp_path, extend=conducted):
        _, key = create_key(gateway.store, "fuzzer", scopes=["inference", "feedback"])
        assert gateway.chat("sentiment", "a captured request the fuzzer may try to relabel").status_code == 200
        deadline = time.monotonic() + 10
        while not _state(gateway)["references"] and time.monotonic() < deadline:
            time.sleep(0.05)
        before = _state(gateway)
        assert before["references"], "the request was not captured"
        with served(gateway) as port:
            fuzz = Fuzzed(gateway, f"http://127.0.0.1:{port}", key)
            yield fuzz
        assert _state(gateway) == before, "an unprivileged caller changed the store or the engine"
        answered = {route: sorted(set(codes)) for route, codes in fuzz.statuses.items()}
        assert any(200 in codes for codes in answered.values()), f"nothing was ever answered: {answered}"


def _state(gateway: Gateway) -> dict[str, Any]:
    with gateway.store.session() as session:
        keys = sorted((r.name, r.revoked_at is None) for r in session.scalars(select(ApiKeyRow)))
        references = sorted((r.request_id, r.reference) for r in session.scalars(select(TrafficRow)))
    return {"aliases": alias_versions(gateway.store), "keys": keys, "references": references,
            "loaded": sorted(gateway.engine.client.loaded), "load_calls": list(gateway.vllm.load_calls),
            "jobs": [j.id for j in JobStore(gateway.store).recent()]}


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@pytest.mark.parametrize("credential", ["none", "inference-key"])
def test_no_route_answers_a_generated_request_with_a_server_error(case: schemathesis.Case, credential: str,
                                                                  fuzzed: Fuzzed) -> None:
    headers = {"Authorization": f"Bearer {fuzzed.key}"} if credential == "inference-key" else {}
    response = case.call(base_url=fuzzed.url, headers=headers, timeout=30)
    fuzzed.statuses.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
    assert response.status_code < 500, (f"{case.method} {case.path} answered {response.status_code}: "
                                        f"{response.text[:300]}\nbody: {str(case.body)[:300]}")
    if case.path.startswith("/admin"):
        assert response.status_code in (400, 401, 403, 405, 408, 413, 429), "admin routes refuse unprivileged callers"


def test_the_document_is_served_and_names_who_may_call_each_route(fuzzed: Fuzzed) -> None:
    import httpx

    document = httpx.get(f"{fuzzed.url}/openapi.json", timeout=10).json()
    assert document == fuzzed.gateway.ctx.openapi
    paths = document["paths"]
    assert "/v1/hooks/alertmanager" in paths, "the conductor's webhook is documented with the gateway's routes"
    scopes = {path: op["security"][0]["bearer"][0] for path, ops in paths.items() for op in ops.values()
              if "security" in op}
    assert scopes["/v1/chat/completions"] == "inference" and scopes["/v1/feedback"] == "feedback"
    assert scopes["/admin/promote"] == "admin" and scopes["/v1/hooks/alertmanager"] == "webhook"
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["additionalProperties"] is False and chat["properties"]["n"]["maximum"] == 4
