"""A bounded async load generator for OpenAI-compatible endpoints on loopback."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx


def percentile(values: list[float], q: float) -> float:
    """The value at quantile `q` (nearest rank, no interpolation) of unsorted `values`; NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class LoadResult:
    requests: int
    failures: int
    completion_tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")




async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, int, bool]:
    started = time.perf_counter()
    response = await client.post(url, json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        return elapsed, 0, False
    return elapsed, int(response.json().get("usage", {}).get("completion_tokens", 0)), True


async def run_load(url: str, bodies: list[dict[str, Any]], concurrency: int,
                   headers: dict[str, str] | None = None) -> LoadResult:
    """Send every body once, at most `concurrency` in flight; latencies are per request, wall clock overall.
    `headers`: vLLM's key when `url` is the engine itself."""
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency * 2),
                                 headers=headers) as client:
        async def bounded(body: dict[str, Any]) -> tuple[float, int, bool]:
            async with semaphore:
                return await _one(client, url, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(b) for b in bodies))
        seconds = time.perf_counter() - started
    return LoadResult(requests=len(results), failures=sum(1 for r in results if not r[2]),
                      completion_tokens=sum(r[1] for r in results), seconds=seconds,
                      latencies=[r[0] for r in results if r[2]])


def chat_bodies(model: str, prompts: list[str], max_tokens: int, system: str | None = None) -> list[dict[str, Any]]:
    bodies = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        bodies.append({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True})
    return bodies
