"""The gateway in-process against a stub vLLM: routing, label constraints, error mapping, body limits, admin auth,
capture and metrics, fast enough for `make test-fast`. The same features against a real vLLM are in
test_gateway_live.py; here the upstream is scripted so every request the gateway forwards can be inspected."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from tuneloop.config import Config, parse_config
from tuneloop.registry import AdapterCard, find_alias, register_adapter
from tuneloop.serving.engine import EngineState
from tuneloop.serving.engine_client import EngineClient, EngineLimits
from tuneloop.serving.gateway import create_app
from tuneloop.serving.protocol import MAX_BODY_BYTES
from tuneloop.serving.server import GatewayExtensions, build_context
from tuneloop.serving.state import GatewayContext
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

BASE_SHA = "b" * 64
TOKEN = "fast-admin-token"
VLLM = "http://vllm.test"
USER = {"role": "user", "content": "x"}
ENGINE_AUTH = "Bearer engine-key"


class SentEvents(httpx.AsyncByteStream):
    """A response body that arrives in chunks, as server-sent events do (not read up front); `fail_after` chunks
    the connection breaks."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks, self.fail_after = chunks, fail_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(self.chunks):
            if self.fail_after is not None and i >= self.fail_after:
                raise httpx.ReadError("connection reset by peer")
            yield chunk


class FakeVllm:
    """Answers like vLLM's OpenAI server and records what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.loaded: set[str] = {"sentiment@1", "chat@1"}
        self.load_calls: list[str] = []
        self.down = False
        self.stream_fails_after: int | None = None
        self.stream_parts: list[str] = ["a free", "-text", " answer"]
        self.refuse_with: tuple[int, str] | None = None
        self.authorizations: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused")
        path = request.url.path
        self.authorizations.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != ENGINE_AUTH:  # vLLM started with VLLM_API_KEY
            return httpx.Response(401, json={"error": "Unauthorized"})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": n} for n in sorted(self.loaded | {"smollm2-base"})]})
        body = json.loads(request.content)
        if path == "/v1/load_lora_adapter":
            self.load_calls.append(body["lora_name"])
            self.loaded.add(body["lora_name"])
            return httpx.Response(200, text="ok")
        if path == "/v1/unload_lora_adapter":
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="ok")
        self.bodies.append(body)
        if self.refuse_with is not None:
            return httpx.Response(self.refuse_with[0], json={"object": "error", "message": self.refuse_with[1]})
        choices = (body.get("structured_outputs") or {}).get("choice")
        text = choices[0] if choices else "a free-text answer"
        usage = {"prompt_tokens": 11, "completion_tokens": 2}
        if body.get("stream"):
            events: list[dict[str, Any]] = [{"choices": [{"delta": {"content": part}}]}
                                            for part in self.stream_parts]
            events.append({"choices": [], "usage": usage})
            chunks = [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]
            return httpx.Response(200, stream=SentEvents(chunks, self.stream_fails_after),
                                  headers={"content-type": "text/event-stream"})
        message: dict[str, Any] = {"message": {"role": "assistant", "content": text}} \
            if path.endswith("chat/completions") else {"text": text}
        if body.get("logprobs") and path.endswith("chat/completions") and not choices:
            # a free-text answer: each sampled token's log-probability, no top candidates unless asked
            message["logprobs"] = {"content": [{"token": token, "logprob": logprob, "top_logprobs": []}
                                               for token, logprob in (("a", -0.5), (" free", -1.5), ("-text", -2.5))]}
        elif body.get("logprobs") and path.endswith("chat/completions"):
            # vLLM's shape: the first token's top candidates, raw (before the constraint), one not a label
            top = [{"token": "negative", "logprob": -0.2}, {"token": "Jane", "logprob": -1.5},
                   {"token": "neutral", "logprob": -2.0}, {"token": " positive", "logprob": -3.0}]
            message["logprobs"] = {"content": [{"token": text, "logprob": -0.2,
                                                "top_logprobs": top[: body.get("top_logprobs") or 0]}]}
        return httpx.Response(200, json={"model": body["model"], "choices": [message], "usage": usage})


@dataclass
class StubEngine:
    client: EngineClient
    state: EngineState = "ready"
    restarts: int = 0
    base_url: str = VLLM
    auth_headers: dict[str, str] = field(default_factory=lambda: {"Authorization": ENGINE_AUTH})


@dataclass
class Gateway:
    http: TestClient
    ctx: GatewayContext
    vllm: FakeVllm
    store: Store
    config: Config
    engine: StubEngine = field(repr=False, default=None)  # type: ignore[assignment]

    def chat(self, model: str, text: str, **extra: Any) -> Any:
        """The TestClient's response (httpx-shaped)."""
        return self.http.post("/v1/chat/completions", json={"model": model, "messages": [
            {"role": "user", "content": text}], **extra})

    def sample(self, name: str, **labels: str) -> float:
        return self.ctx.registry.get_sample_value(name, labels) or 0.0


def _adapter(store: Store, config: Config, tmp_path: Path, task: str, *, base: str = BASE_SHA) -> str:
    folder = tmp_path / f"{task}-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(folder.name.encode())
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    card = AdapterCard(task=task, method="lora", base_model={"name": "b", "sha256": base}, datasets=[],
                       hyperparameters={"rank": 8, "target_modules": ["q_proj", "v_proj"]})
    return register_adapter(store, config.data_path, folder, card).ref


def _gateway(tmp_path: Path, extra_config: str = "", *,
             extend: Callable[[Config, Store], GatewayExtensions] | None = None) -> Generator[Gateway, None, None]:
    """The gateway over a stub engine; `extend` builds what a process assembler would add (routes, collectors)."""
    config = parse_config(f"data_dir: data\nbase_model:\n  name: smollm2-base\nserving:\n  admin_token: {TOKEN}\n"
                          + extra_config, config_dir=tmp_path)
    store = Store(config.resolved_database_url)
    adapters = tmp_path / "adapters-src"
    adapters.mkdir()
    for task in ("sentiment", "chat", "sentiment"):
        _adapter(store, config, adapters, task)
    _adapter(store, config, adapters, "sentiment", base="c" * 64)  # sentiment@3: another base model
    vllm = FakeVllm()
    engine = StubEngine(EngineClient(VLLM, EngineLimits(BASE_SHA, 8, ("q_proj", "v_proj")),
                                     transport=httpx.MockTransport(vllm), headers={"Authorization": ENGINE_AUTH}))
    for name in ("sentiment@1", "chat@1"):
        engine.client.adopt(name, tmp_path)
    extensions = extend(config, store) if extend is not None else GatewayExtensions()
    ctx = build_context(config, store, engine, extensions=extensions, seed=0,
                        upstream_transport=httpx.MockTransport(vllm))
    ctx.capture.start()
    try:
        with TestClient(create_app(ctx, routes=extensions.routes)) as http:
            yield Gateway(http, ctx, vllm, store, config, engine)
    finally:
        ctx.capture.close()
        store.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(tmp_path)


def test_a_task_name_routes_to_its_champion_with_the_task_prompt(gateway: Gateway) -> None:
    response = gateway.chat("chat", "hello there")
    assert response.status_code == 200 and response.headers["X-Request-Id"]
    sent = gateway.vllm.bodies[-1]
    assert sent["model"] == "chat@1"
    assert sent["messages"][0] == {"role": "system", "content": gateway.config.tasks["chat"].system_prompt}
    assert "structured_outputs" not in sent, "a generation task is not constrained"
    gateway.chat("smollm2-base", "hello")
    assert gateway.vllm.bodies[-1]["model"] == "smollm2-base" and "structured_outputs" not in gateway.vllm.bodies[-1]


def test_a_classification_task_is_constrained_to_its_labels(gateway: Gateway) -> None:
    labels = gateway.config.tasks["sentiment"].labels
    response = gateway.chat("sentiment", "What is the capital of Australia?", max_tokens=1)
    assert response.status_code == 200
    sent = gateway.vllm.bodies[-1]
    assert sent["structured_outputs"] == {"choice": labels}
    assert sent["max_tokens"] >= len("negative") + 1, "room for the longest label"
    assert response.json()["choices"][0]["message"]["content"] in labels
    completion = gateway.http.post("/v1/completions", json={"model": "sentiment", "prompt": "Wie spät ist es?"})
    assert completion.status_code == 200 and gateway.vllm.bodies[-1]["structured_outputs"] == {"choice": labels}
    own = {"choice": ["yes", "no"]}
    gateway.chat("sentiment", "is this a question?", structured_outputs=own)
    assert gateway.vllm.bodies[-1]["structured_outputs"] == own, "a request's own structured outputs are kept"
    gateway.chat("sentiment", "json please", response_format={"type": "json_object"})
    assert "structured_outputs" not in gateway.vllm.bodies[-1]


def test_the_label_constraint_can_be_turned_off_per_task(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path, "tasks:\n  sentiment:\n    constrain_labels: false\n"):
        gateway.chat("sentiment", "anything", max_tokens=1)
        assert "structured_outputs" not in gateway.vllm.bodies[-1] and gateway.vllm.bodies[-1]["max_tokens"] == 1


@pytest.mark.parametrize(("send", "status", "kind", "fragment"), [
    (lambda c: c.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_request_error", "not valid JSON"),
    (lambda c: c.post("/v1/chat/completions", content=b'{"model": "chat", "messages": ["\xff"]}'), 400,
     "invalid_request_error", "not valid UTF-8"),
    (lambda c: c.post("/v1/chat/completions", json=[1, 2]), 400, "invalid_request_error", "must be a JSON object"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat"}), 400, "invalid_request_error",
     "messages: Field required"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "wizard",
                                                                                  "content": "x"}]}),
     400, "invalid_request_error", "messages.0.role"),
    (lambda c: c.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [{"role": "user", '
                      b'"content": "' + b"x" * MAX_BODY_BYTES + b'"}]}'), 413, "request_too_large", "limit"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "nosuchtask", "messages": [{"role": "user",
                                                                                        "content": "x"}]}),
     404, "not_found_error", "does not exist"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "sentiment@2", "messages": [{"role": "user",
                                                                                         "content": "x"}]}),
     404, "not_found_error", "/admin/adapters/load"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "sentiment@\u00b2", "messages": [USER]}), 404,
     "not_found_error", "write task@N"),
    (lambda c: c.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [{"role": "user", '
                      b'"content": "x"}], "temperature": NaN}'), 400, "invalid_request_error", "NaN is not"),
    (lambda c: c.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [{"role": "user", '
                      b'"content": "\\ud800"}]}'), 400, "invalid_request_error", "lone surrogate"),
    (lambda c: c.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [{"role": "user", '
                      b'"content": "x"}], "x": '
                      + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "invalid_request_error", "nested deeper"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [USER], "tools": [{"a": [[[[[[[[[[
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}), 400, "invalid_request_error",
     "nested deeper than 32 levels (at body.tools.0.a"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [USER],
                                                    "chat_template_kwargs": {}}), 400, "invalid_request_error",
     "unknown field(s) 'chat_template_kwargs'"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [USER], "n": 64}), 400,
     "invalid_request_error", "n is 64; the gateway allows 1 to 4"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "sentiment", "messages": [USER], "max_tokens": -1}),
     400, "invalid_request_error", "max_tokens is -1"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [USER], "max_tokens": True}),
     400, "invalid_request_error", "max_tokens must be an integer"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [USER] * 129}), 400,
     "invalid_request_error", "129 messages"),
    (lambda c: c.post("/v1/chat/completions", json={"model": "chat", "messages": [
        {"role": "user", "content": "x" * 100_001}]}), 400, "invalid_request_error", "100,001 characters"),
    (lambda c: c.post("/v1/completions", json={"model": "chat", "prompt": ["x"] * 17}), 400,
     "invalid_request_error", "17 prompts"),
], ids=["bad-json", "not-utf8", "not-an-object", "missing-field", "bad-role", "too-large", "unknown-model",
        "version-not-loaded", "unicode-digit-version", "nan", "lone-surrogate", "deep-nesting-parser",
        "deep-nesting", "unknown-field", "n-over-limit", "negative-max-tokens", "bool-max-tokens", "too-many-messages",
        "too-many-chars", "too-many-prompts"])
def test_bad_requests_get_one_error_shape_and_reach_nothing(gateway: Gateway, send, status, kind,
                                                            fragment) -> None:
    response = send(gateway.http)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == status and fragment in error["message"]
    assert gateway.vllm.bodies == [], "nothing was forwarded"


def test_a_dead_or_restarting_engine_fails_fast_with_retry_after(gateway: Gateway) -> None:
    gateway.engine.state = "restarting"
    response = gateway.chat("chat", "hi")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert gateway.vllm.bodies == []
    assert gateway.http.get("/healthz").status_code == 503
    gateway.engine.state = "ready"
    gateway.vllm.down = True
    response = gateway.chat("chat", "hi")
    assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
    assert gateway.sample("tuneloop_gateway_requests_total", task="chat", adapter="chat@1", route="champion",
                          status="503") == 1


def test_admin_calls_need_the_token_and_a_refused_call_changes_nothing(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = gateway.http.post("/admin/promote", json={"version": "sentiment@2"}, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    champion = find_alias(gateway.store, "sentiment", "champion")
    assert champion is not None and champion.version == 1 and gateway.vllm.load_calls == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    refused = gateway.http.post("/admin/adapters/load", json={"version": "sentiment@3"}, headers=auth)
    assert refused.status_code == 400 and "trained on base model cccccccccccc" in refused.json()["error"]["message"]
    assert gateway.vllm.load_calls == [], "an incompatible adapter never reaches vLLM"
    loaded = gateway.http.post("/admin/adapters/load", json={"version": "sentiment@2"}, headers=auth)
    assert loaded.status_code == 200 and gateway.vllm.load_calls == ["sentiment@2"]
    again = gateway.http.post("/admin/adapters/load", json={"version": "sentiment@2"}, headers=auth)
    assert again.status_code == 200 and gateway.vllm.load_calls == ["sentiment@2"], "vLLM's list says loaded"
    assert gateway.chat("sentiment@2", "hi").json()["model"] == "sentiment@2"
    promoted = gateway.http.post("/admin/promote", json={"version": "sentiment@2"}, headers=auth)
    assert promoted.json() == {"task": "sentiment", "champion": "sentiment@2", "previous": "sentiment@1"}
    assert gateway.chat("sentiment", "hi").json()["model"] == "sentiment@2"


def test_user_traffic_is_captured_redacted_and_eval_traffic_only_counted(gateway: Gateway) -> None:
    assert gateway.chat("sentiment", "mail me at jane@example.com").status_code == 200
    streamed = gateway.chat("chat", "tell me a story", stream=True)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    body = {"model": "sentiment", "messages": [{"role": "user", "content": "eval"}]}
    anonymous = gateway.http.post("/v1/chat/completions", headers={"X-Tuneloop-Purpose": "eval"}, json=body)
    assert anonymous.status_code == 403 and "needs an admin key" in anonymous.json()["error"]["message"], \
        "anyone could keep their traffic out of capture and drift"
    evaluation = gateway.http.post("/v1/chat/completions", json=body,
                                   headers={"X-Tuneloop-Purpose": "eval", "Authorization": f"Bearer {TOKEN}"})
    assert evaluation.status_code == 200
    rows = captured(gateway, 2)
    assert [(r.task, r.prompt_text) for r in rows] == [("sentiment", "mail me at [EMAIL]"),
                                                        ("chat", "tell me a story")]
    assert rows[0].completion == "negative" and rows[1].completion == "a free-text answer" and rows[1].stream
    assert gateway.sample("tuneloop_gateway_requests_total", task="sentiment", adapter="sentiment@1", route="eval",
                          status="200") == 1
    assert gateway.sample("tuneloop_gateway_requests_total", task="sentiment", adapter="sentiment@1",
                          route="champion", status="200") == 1
    assert gateway.sample("tuneloop_gateway_completion_tokens_total", task="chat", adapter="chat@1",
                          route="champion") == 2
    assert gateway.sample("tuneloop_engine_adapters_loaded") == 2


def captured(gateway: Gateway, count: int) -> list[TrafficRow]:
    """The first `count` captured records (the capture writer inserts off the request path, within a second)."""
    rows: list[TrafficRow] = []
    deadline = time.monotonic() + 10
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        with gateway.store.session() as session:
            rows = list(session.scalars(select(TrafficRow).order_by(TrafficRow.id)))
    return rows


def test_a_label_answers_logprobs_are_captured_and_returned_only_when_asked_for(gateway: Gateway) -> None:
    """The quality signal (serving/quality_signal.py): the gateway asks vLLM for the first token's top
    log-probabilities of a classification answer, keeps only the labels' in capture, and returns the answer as the
    client asked for it."""
    plain = gateway.chat("sentiment", "my bag is lost")
    sent = gateway.vllm.bodies[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20
    assert plain.status_code == 200 and "logprobs" not in plain.json()["choices"][0], "added by us, taken out"
    assert plain.json()["choices"][0]["message"]["content"] == "negative"
    asked = gateway.chat("sentiment", "great crew", logprobs=True, top_logprobs=2)
    assert gateway.vllm.bodies[-1]["top_logprobs"] == 2, "a client's own logprobs request is left as it is"
    assert [t["token"] for t in asked.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]] == \
        ["negative", "Jane"]
    streamed = gateway.chat("sentiment", "streamed", stream=True)
    assert streamed.status_code == 200 and "logprobs" not in gateway.vllm.bodies[-1]
    rows = captured(gateway, 3)
    signals = {r.prompt_text: r.signal for r in rows}
    assert signals["my bag is lost"] == {"negative": -0.2, "neutral": -2.0, "positive": -3.0, "_missing": 0.0}
    assert signals["great crew"] == {"negative": -0.2, "neutral": -1.5, "positive": -1.5, "_missing": 2.0}, \
        "labels outside the top candidates get the lowest one returned, and are counted"
    assert signals["streamed"] is None
    assert all("Jane" not in (s or {}) for s in signals.values()), "candidate tokens other than labels are not kept"


def test_a_free_text_answers_token_logprobs_are_summarised_in_capture(gateway: Gateway) -> None:
    """A generation task's signal: vLLM is asked for the sampled tokens' log-probabilities only (no top-k); capture
    keeps their mean, minimum and count, never the tokens; the client gets the answer it asked for."""
    plain = gateway.chat("chat", "hello")
    sent = gateway.vllm.bodies[-1]
    assert sent["logprobs"] is True and "top_logprobs" not in sent
    assert plain.status_code == 200 and "logprobs" not in plain.json()["choices"][0]
    asked = gateway.chat("chat", "hi there", logprobs=True)
    assert [t["token"] for t in asked.json()["choices"][0]["logprobs"]["content"]] == ["a", " free", "-text"]
    gateway.chat("chat", "streamed", stream=True)
    assert "logprobs" not in gateway.vllm.bodies[-1]
    signals = {r.prompt_text: r.signal for r in captured(gateway, 3)}
    assert signals["hello"] == {"mean_logprob": -1.5, "min_logprob": -2.5, "tokens": 3.0}
    assert signals["hi there"] == signals["hello"]
    assert signals["streamed"] is None


def test_the_signal_can_be_turned_off_per_task(tmp_path: Path) -> None:
    config = "tasks:\n  sentiment:\n    estimate:\n      signal: false\n  chat:\n    estimate:\n      signal: false\n"
    for gateway in _gateway(tmp_path, config):
        for task in ("sentiment", "chat"):
            response = gateway.chat(task, "anything")
            assert response.status_code == 200 and "logprobs" not in gateway.vllm.bodies[-1]


def test_the_model_list_names_tasks_loaded_versions_and_the_base(gateway: Gateway) -> None:
    names = [m["id"] for m in gateway.http.get("/v1/models").json()["data"]]
    assert names == ["chat", "sentiment", "chat@1", "sentiment@1", "smollm2-base"]


def test_pooled_upstream_connections_expire_before_the_servers_keep_alive() -> None:
    """uvicorn (vLLM's server, and the gateway's) closes a connection idle for 5 s; a client that reuses it at that
    moment fails the request. Measured with a real uvicorn and 8-request bursts 5 s apart: 2 of 96 requests failed
    at httpx's default 5 s expiry, none at 2 s (docs/architecture.md)."""
    import uvicorn

    from tuneloop.serving.protocol import KEEPALIVE_EXPIRY_S

    assert uvicorn.Config(app=None).timeout_keep_alive > KEEPALIVE_EXPIRY_S  # type: ignore[arg-type]


def test_our_failures_are_5xx_and_never_blamed_on_the_client(tmp_path: Path) -> None:
    """A database outage, a training or evaluation failure, any error not classified, and a plain bug reach the
    client as 5xx in the one error shape; only what the client sent wrong is a 4xx."""
    from starlette.requests import Request
    from starlette.routing import Route

    from tuneloop.errors import ConfigError, EvaluationError, StoreError, TrainingError, TuneloopError

    raised: dict[str, Exception] = {"store": StoreError("database error on sqlite:///x: OperationalError"),
                                    "training": TrainingError("loss became nan"),
                                    "evaluation": EvaluationError("runs differ"),
                                    "unclassified": TuneloopError("something of ours"),
                                    "config": ConfigError("unknown task 'nope'"), "bug": KeyError("oops")}

    async def fail(request: Request) -> None:
        raise raised[request.path_params["kind"]]

    def extend(config: Config, store: Store) -> GatewayExtensions:
        return GatewayExtensions(routes=[Route("/fail/{kind}", fail)])

    for gateway in _gateway(tmp_path, extend=extend):
        with TestClient(gateway.http.app, raise_server_exceptions=False) as http:
            answers = {kind: http.get(f"/fail/{kind}") for kind in raised}
    expected = {"store": (503, "store_unavailable"), "training": (500, "internal_error"),
                "evaluation": (500, "internal_error"), "unclassified": (500, "internal_error"),
                "config": (400, "invalid_request_error"), "bug": (500, "internal_error")}
    assert {k: (r.status_code, r.json()["error"]["type"]) for k, r in answers.items()} == expected
    store_message = answers["store"].json()["error"]["message"]
    assert answers["store"].headers["Retry-After"] and "database" in store_message
    assert "OperationalError" not in store_message and "sqlite" not in store_message, "no SQL or host reaches a client"
    assert "nan" not in answers["training"].text and "runs differ" not in answers["evaluation"].text
    assert "oops" not in answers["bug"].text, "a bug's details stay in the log"


def test_masked_candidates_are_neither_signal_nor_floor() -> None:
    """vLLM lists tokens the label constraint forbids at -9999; a label outside the real candidates gets the
    lowest real one."""
    from tuneloop.answer_signal import first_token_logprobs, label_signal

    payload = {"choices": [{"logprobs": {"content": [{"token": "negative", "top_logprobs": [
        {"token": "negative", "logprob": -0.1}, {"token": "neg", "logprob": -2.5},
        {"token": "positive", "logprob": -3.0}, {"token": "<masked>", "logprob": -9999.0}]}]}}]}
    top = first_token_logprobs(payload)
    assert top == {"negative": -0.1, "neg": -2.5, "positive": -3.0}
    assert label_signal(top, ["negative", "neutral", "positive"]) == {
        "negative": -0.1, "neutral": -3.0, "positive": -3.0, "_missing": 1.0}
    assert first_token_logprobs({"choices": [{"message": {}}]}) is None
