"""The endpoint side of an evaluation: one OpenAI-compatible chat request per example, retried on the failures
that pass (429, 502-504, connection errors; Retry-After honoured), answered or recorded as an error.

Requests are greedy with a fixed seed and carry the task's system prompt explicitly; a classification task's
requests also carry its label constraint (serving/constraints.py), so the base model and every adapter are asked
exactly the same way, whichever route answers them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from tuneloop.answer_signal import answer_token_signal, first_token_logprobs
from tuneloop.challenger_sets.records import Example
from tuneloop.config import EvaluationConfig, TaskConfig
from tuneloop.errors import EngineUnavailable, ModelNotFound
from tuneloop.evaluators.targets import EvalTarget
from tuneloop.parsing import is_decimal
from tuneloop.serving.constraints import constrain_to_labels
from tuneloop.serving.protocol import EVAL_PURPOSE_HEADER, KEEPALIVE_EXPIRY_S

RETRYABLE_STATUS = {429, 502, 503, 504}
MAX_BACKOFF_S = 10.0
FLUSH_EVERY = 16  # answers written to the store per batch while a run is in flight


@dataclass(frozen=True)
class Answer:
    position: int
    example_id: str
    text: str | None
    error: str | None
    latency_ms: float
    completion_tokens: int | None
    # asked with top_logprobs: the first token's top candidates; with logprobs alone: the answer tokens' summary
    signal: dict[str, float] | None = None


def request_body(target: EvalTarget, task: TaskConfig, example: Example, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": target.model, "messages": example.chat_messages(task.system_prompt),
                            "max_tokens": task.max_new_tokens, "temperature": 0, "seed": seed}
    constrain_to_labels(body, task)
    return body


def decoding_settings(task: TaskConfig, seed: int) -> dict[str, Any]:
    """The decoding-relevant part of every request of a run (part of the run's key and signature)."""
    body = request_body(EvalTarget(task="", model="", adapter_version=None, base_url=""), task,
                        Example(id="-", input="-", reference="-"), seed)
    return {k: v for k, v in body.items() if k not in ("model", "messages")}


class EndpointClient:
    """An async HTTP client for one evaluation; use as `async with EndpointClient(...) as client`."""

    def __init__(self, target: EvalTarget, settings: EvaluationConfig, *,
                 transport: httpx.AsyncBaseTransport | None = None, token: str | None = None) -> None:
        self.target, self.settings = target, settings
        # Evaluation requests are marked so the gateway keeps them out of capture and drift, which it allows an
        # admin caller only: the runner sends the admin credential the CLI has.
        self._headers = {EVAL_PURPOSE_HEADER: "eval", **({"Authorization": f"Bearer {token}"} if token else {})}
        self._http = httpx.AsyncClient(base_url=target.base_url, transport=transport,
                                       timeout=httpx.Timeout(settings.request_timeout_s, connect=5.0),
                                       limits=httpx.Limits(max_connections=settings.concurrency * 2,
                                                           keepalive_expiry=KEEPALIVE_EXPIRY_S))

    async def __aenter__(self) -> EndpointClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self._http.aclose()

    async def ask(self, position: int, example: Example, body: dict[str, Any]) -> Answer:
        last = ""
        for attempt in range(self.settings.max_attempts):
            started = time.perf_counter()
            try:
                response = await self._http.post("/v1/chat/completions", json=body, headers=self._headers)
            except httpx.TransportError as exc:
                last = f"{exc.__class__.__name__}: {exc}"
                await asyncio.sleep(min(MAX_BACKOFF_S, 0.5 * 2 ** attempt))
                continue
            latency_ms = (time.perf_counter() - started) * 1000
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}: {error_message(response)}"
                await asyncio.sleep(retry_delay(response, attempt))
                continue
            if response.status_code == 404:
                raise ModelNotFound(f"{self.target.base_url} does not serve '{self.target.model}': "
                                    f"{error_message(response)}")
            if response.status_code != 200:
                return Answer(position, example.id, None, f"HTTP {response.status_code}: "
                              f"{error_message(response)}"[:2000], latency_ms, None)
            payload = response.json()
            text = (payload.get("choices") or [{}])[0].get("message", {}).get("content")
            tokens = (payload.get("usage") or {}).get("completion_tokens")
            signal = (None if not body.get("logprobs") else first_token_logprobs(payload) if body.get("top_logprobs")
                      else answer_token_signal(payload))
            return Answer(position, example.id, text, None, latency_ms, tokens, signal)
        raise EngineUnavailable(f"{self.target.base_url} did not answer example {example.id} after "
                                f"{self.settings.max_attempts} attempts ({last}); the run is saved, run the same "
                                "command again to resume it")


def retry_delay(response: httpx.Response, attempt: int) -> float:
    header = str(response.headers.get("retry-after", ""))
    if is_decimal(header):
        return min(MAX_BACKOFF_S, float(header))
    return min(MAX_BACKOFF_S, 0.5 * 2.0 ** attempt)


def error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(payload)[:300]
