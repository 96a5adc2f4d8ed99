"""Serving: what the gateway costs over calling vLLM directly, and hot-swap against a restart.

One vLLM engine (flags derived from the served adapters, as `tuneloop serve` does) and the gateway in this
process. Fair by construction:

- The same request bodies reach vLLM on both paths: the `chat` task (free text, no label constraint), the task's
  system prompt sent explicitly on the direct path and added by the gateway on the other, `ignore_eos` so every
  answer is exactly as long.
- Prefix caching is off for the engine, so a path cannot reuse the KV cache the other path's run left behind.
- The paths alternate: throughput rounds run direct, gateway, gateway, direct (ABBA) and are summed per path; the
  latency probe alternates which path goes first in each pair, and the added latency is the median of the
  per-pair differences with a bootstrap interval.
- Failed requests are counted and shown, never dropped.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load import LoadResult, chat_bodies, run_load
from bench.setup import base_model_path, chat_sets, sentiment_sets
from bench.tables import Table, emit
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.config import parse_config
from tuneloop.ports import free_port
from tuneloop.serving.admin_client import AdminClient
from tuneloop.serving.engine import EngineSupervisor
from tuneloop.store import Store


def run(*, quick: bool = False) -> list[Table]:
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.server import running_server

    levels = [(1, 4), (8, 16)] if quick else [(1, 12), (8, 48), (32, 96)]
    tokens = 16 if quick else 64
    probe_pairs = 10 if quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            f"data_dir: data\nbase_model:\n  path: {base_model_path()}\nserving:\n  gateway_port: {free_port()}\n"
            f"  vllm_port: {free_port()}\n  max_model_len: 512\n  kv_cache_gib: 2\n  admin_token: bench\n"
            "  prefix_caching: false\n"
            "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n"
            "  chat:\n    train:\n      batch_size: 4\n      validation_examples: 2\n", config_dir=Path(tmp))
        store = Store(config.resolved_database_url)
        for task, examples in (("sentiment", sentiment_sets()["train"]), ("chat", chat_sets()["train"])):
            add_dataset(store, config.data_path, random.Random(0).sample(examples, 32), task=task, name="bench",
                        kind="train", source="bench", check_leakage=False)
        for task, steps in (("sentiment", 2), ("sentiment", 3), ("chat", 2)):
            finetune(config, store, task, max_steps=steps, dataset=f"{task}/bench", progress=False)
        system = config.tasks["chat"].system_prompt
        prompts = [e.last_user_text() for e in random.Random(1).sample(chat_sets()["heldout"], 200)]
        started = time.perf_counter()
        with running_server(config, store, seed=0) as running:
            cold_start = time.perf_counter() - started
            engine = running.engine
            assert isinstance(engine, EngineSupervisor), "this bench runs the single supervised vLLM"
            direct_url = f"{engine.spec.base_url}/v1/chat/completions"
            gateway_url = f"{running.url}/v1/chat/completions"
            key = engine.spec.auth_headers  # direct requests carry vLLM's key, as the gateway's do
            asyncio.run(run_load(direct_url, chat_bodies("chat@1", prompts[:4], 4, system), 4, key))  # warm-up
            probe = _latency_probe(direct_url, gateway_url, prompts[:probe_pairs], system, key)
            overhead_rows = [_overhead(direct_url, gateway_url, prompts[:n], system, tokens, concurrency, key)
                             for concurrency, n in levels]
            tweet = sentiment_sets()["heldout"][0].last_user_text()
            load_body = {"model": "sentiment", "messages": [{"role": "user", "content": tweet}], "temperature": 0}
            swap = _under_load(gateway_url, load_body, lambda: AdminClient(config).promote("sentiment@2"))
            restart: LoadDuring | None = None
            if not quick:  # a smoke run skips the restart: tests/serving kill and restart vLLM already
                restart = _under_load(gateway_url, load_body, lambda: _restart(engine))
        store.close()
    tables = [emit(f"Gateway vs direct vLLM ({tokens}-token chat replies, identical upstream bodies, ABBA rounds)",
                   ["concurrency", "requests per path", "direct tok/s", "gateway tok/s", "throughput ratio",
                    "direct p50 ms", "gateway p50 ms", "direct p99 ms", "gateway p99 ms", "failed (direct / gateway)"],
                   overhead_rows, key="gateway-throughput",
                   notes="Each path ran two rounds of the same prompts in the order direct, gateway, gateway, direct; "
                         "tokens and seconds are summed per path. Prefix caching is off.")]
    tables.append(_probe_table(probe))
    hot_swap_rows = [["promote via /admin/promote (load into running vLLM + alias flip)", *swap.row()],
                     ["vLLM restart (stop + start until ready)",
                      *(restart.row() if restart else ["not measured (smoke run)"] * 5)],
                     ["vLLM cold start at launch", f"{cold_start:.1f}", "-", "-", "-", "-"]]
    tables.append(emit("Adapter hot-swap vs vLLM restart, under load", ["operation", "seconds",
                       "requests answered / failed in the window", "longest wait between answers s",
                       "normal wait between answers s", "answered by"], hot_swap_rows, key="hot-swap",
                       notes=f"{LOAD_WORKERS} clients send `sentiment` requests through the gateway, one after "
                             f"another each, from {SETTLE_S:.0f} s before the operation to {SETTLE_S:.0f} s after "
                             "it; a failed request is retried after 0.2 s. 'Longest wait' is the largest gap "
                             "between consecutive answers in that window, 'normal' the median gap."))
    return tables


LOAD_WORKERS = 2
SETTLE_S = 3.0


@dataclass(frozen=True)
class LoadDuring:
    """What clients saw while an operation ran: the number the hot-swap table is about."""

    seconds: float
    answered: int
    failed: int
    longest_gap_s: float
    median_gap_s: float
    models: dict[str, int]

    def row(self) -> list[str]:
        answered_by = ", ".join(f"{model} x{count}" for model, count in self.models.items()) or "-"
        return [f"{self.seconds:.2f}", f"{self.answered} / {self.failed}", f"{self.longest_gap_s:.2f}",
                f"{self.median_gap_s:.2f}", answered_by]


def _under_load(url: str, body: dict[str, Any], operation: Callable[[], object]) -> LoadDuring:
    """Run `operation` while LOAD_WORKERS clients keep sending `body`, and record what they saw."""
    stop = threading.Event()
    lock = threading.Lock()
    answers: list[tuple[float, str]] = []
    failures = 0

    def client_loop() -> None:
        nonlocal failures
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                try:
                    response = client.post(url, json=body)
                    model = response.json().get("model", "?") if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    model = None
                with lock:
                    if model is None:
                        failures += 1
                    else:
                        answers.append((time.perf_counter(), model))
                if model is None:
                    time.sleep(0.2)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(LOAD_WORKERS)]
    for thread in threads:
        thread.start()
    time.sleep(SETTLE_S)
    started = time.perf_counter()
    operation()
    seconds = time.perf_counter() - started
    time.sleep(SETTLE_S)
    stop.set()
    for thread in threads:
        thread.join()
    times = sorted(t for t, _ in answers)
    gaps = np.diff(times) if len(times) > 1 else np.array([float("nan")])
    return LoadDuring(seconds=seconds, answered=len(answers), failed=failures,
                      longest_gap_s=float(gaps.max()), median_gap_s=float(np.median(gaps)),
                      models=dict(Counter(model for _, model in sorted(answers))))


def _restart(engine: EngineSupervisor) -> None:
    engine.stop()
    engine.start()


def _overhead(direct_url: str, gateway_url: str, prompts: list[str], system: str, tokens: int,
              concurrency: int, key: dict[str, str]) -> list[Any]:
    results: dict[str, list[LoadResult]] = {"direct": [], "gateway": []}
    for path in ("direct", "gateway", "gateway", "direct"):
        if path == "direct":
            bodies = chat_bodies("chat@1", prompts, tokens, system)
            results[path].append(asyncio.run(run_load(direct_url, bodies, concurrency, key)))
        else:
            results[path].append(asyncio.run(run_load(gateway_url, chat_bodies("chat", prompts, tokens),
                                                      concurrency)))
    direct, via = _combine(results["direct"]), _combine(results["gateway"])
    return [concurrency, len(prompts) * 2, f"{direct.tokens_per_second:.0f}", f"{via.tokens_per_second:.0f}",
            f"{via.tokens_per_second / direct.tokens_per_second:.3f}", f"{direct.p50 * 1000:.0f}",
            f"{via.p50 * 1000:.0f}", f"{direct.percentile(0.99) * 1000:.0f}", f"{via.percentile(0.99) * 1000:.0f}",
            f"{direct.failures} / {via.failures}"]


def _combine(results: list[LoadResult]) -> LoadResult:
    return LoadResult(requests=sum(r.requests for r in results), failures=sum(r.failures for r in results),
                      completion_tokens=sum(r.completion_tokens for r in results),
                      seconds=sum(r.seconds for r in results), latencies=[x for r in results for x in r.latencies])


def _latency_probe(direct_url: str, gateway_url: str, prompts: list[str], system: str,
                   key: dict[str, str]) -> dict[str, Any]:
    """1-token requests one at a time; pair i runs direct first when i is even, the gateway first when odd."""
    pairs: list[tuple[float, float]] = []
    failures = {"direct": 0, "gateway": 0}
    with httpx.Client(timeout=120) as client:
        for i, prompt in enumerate(prompts):
            sides = [("direct", direct_url, chat_bodies("chat@1", [prompt], 1, system)[0]),
                     ("gateway", gateway_url, chat_bodies("chat", [prompt], 1)[0])]
            timings: dict[str, float] = {}
            for name, url, body in sides if i % 2 == 0 else list(reversed(sides)):
                started = time.perf_counter()
                response = client.post(url, json=body, headers=key if name == "direct" else None)
                if response.status_code == 200:
                    timings[name] = (time.perf_counter() - started) * 1000
                else:
                    failures[name] += 1
            if len(timings) == 2:
                pairs.append((timings["direct"], timings["gateway"]))
    return {"pairs": pairs, "failures": failures}


def _probe_table(probe: dict[str, Any]) -> Table:
    pairs = np.array(probe["pairs"])
    differences = pairs[:, 1] - pairs[:, 0]
    rng = np.random.default_rng(12345)
    medians = np.median(differences[rng.integers(0, len(differences), (2000, len(differences)))], axis=1)
    low, high = np.quantile(medians, [0.025, 0.975])
    direct, via = pairs[:, 0], pairs[:, 1]
    rows = [["direct vLLM", len(direct), f"{np.median(direct):.1f}", f"{np.quantile(direct, 0.9):.1f}", "-",
             probe["failures"]["direct"]],
            ["gateway", len(via), f"{np.median(via):.1f}", f"{np.quantile(via, 0.9):.1f}",
             f"{np.median(differences):+.1f} [{low:+.1f}, {high:+.1f}]", probe["failures"]["gateway"]]]
    return emit("Gateway overhead probe: 1-token requests, one at a time, paths alternating first",
                ["path", "requests", "p50 ms", "p90 ms", "added: median of per-pair differences [95 % CI]",
                 "failed"], rows, key="gateway-latency",
                notes=f"Mean per-pair difference {statistics.fmean(differences):+.1f} ms. With replies taking seconds "
                      "on this CPU, the throughput table's p50 differences are scheduling noise; this probe isolates "
                      "the per-request cost of the gateway (validation, routing, system prompt, proxying, capture "
                      "hand-off).")
