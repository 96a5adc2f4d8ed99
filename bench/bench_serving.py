"""Serving: the gateway's overhead over direct vLLM, hot-swap vs restart, LoRA vs base throughput.

One vLLM engine (flags derived from the served adapter, as `tuneloop serve` does) and the gateway in this
process. The same prompts go straight to vLLM and through the gateway, at 1, 8 and 32 concurrent requests, each
asking for exactly 64 tokens (`ignore_eos`), so the rows differ only in the path taken.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import LoadResult, chat_bodies, free_port, run_load
from bench.setup import base_model_path, sentiment_sets
from bench.tables import emit
from challenger_sets.catalog import add_dataset
from tuneloop.config import parse_config
from tuneloop.store import Store


def run(*, quick: bool = False) -> str:
    from retrain.finetune import finetune
    from serving.server import running_server

    levels = [(1, 4), (8, 16)] if quick else [(1, 12), (8, 48), (32, 96)]
    tokens = 16 if quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        gateway_port, vllm_port = free_port(), free_port()
        config = parse_config(
            f"data_dir: data\nbase_model:\n  path: {base_model_path()}\nserving:\n  gateway_port: {gateway_port}\n"
            f"  vllm_port: {vllm_port}\n  max_model_len: 512\n  kv_cache_gib: 2\n  admin_token: bench\n"
            "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n",
            config_dir=Path(tmp))
        store = Store(config.resolved_database_url)
        tweets = random.Random(0).sample(sentiment_sets()["train"], 64)
        add_dataset(store, config.data_path, tweets, task="sentiment", name="bench", kind="train", source="bench",
                    check_leakage=False)
        for steps in (2, 3):
            finetune(config, store, "sentiment", max_steps=steps, dataset="sentiment/bench", progress=False)
        started = time.perf_counter()
        with running_server(config, store, seed=0) as running:
            cold_start = time.perf_counter() - started
            engine = running.engine
            prompts = [e.input or "" for e in random.Random(1).sample(sentiment_sets()["heldout"], 200)]
            system = config.tasks["sentiment"].system_prompt
            direct_url = f"{engine.spec.base_url}/v1/chat/completions"
            gateway_url = f"{running.url}/v1/chat/completions"
            asyncio.run(run_load(direct_url, chat_bodies("sentiment@1", prompts[:4], 8, system), 4))
            probe = _latency_probe(direct_url, gateway_url, prompts[:20 if quick else 150], system)
            overhead_rows = []
            for concurrency, n in levels:
                batch = prompts[:n]
                direct = asyncio.run(run_load(direct_url, chat_bodies("sentiment@1", batch, tokens, system),
                                              concurrency))
                via = asyncio.run(run_load(gateway_url, chat_bodies("sentiment", batch, tokens), concurrency))
                overhead_rows.append(_overhead_row(concurrency, n, direct, via))
            c, n = levels[-1]
            base = asyncio.run(run_load(direct_url, chat_bodies(config.base_model.name, prompts[:n], tokens, system),
                                        c))
            lora = asyncio.run(run_load(direct_url, chat_bodies("sentiment@1", prompts[:n], tokens, system), c))
            swap_started = time.perf_counter()
            promoted = httpx.post(f"{running.url}/admin/promote", json={"version": "sentiment@2"},
                                  headers={"Authorization": "Bearer bench"}, timeout=300)
            swap_seconds = time.perf_counter() - swap_started
            assert promoted.status_code == 200, promoted.text
            restart_started = time.perf_counter()
            engine.stop()
            engine.start()
            restart_seconds = time.perf_counter() - restart_started
        store.close()
    text = emit(f"Gateway vs direct vLLM ({tokens}-token completions, same prompts, same adapter)",
                ["concurrency", "requests", "direct tok/s", "gateway tok/s", "throughput ratio", "direct p50 ms",
                 "gateway p50 ms", "added p50 ms", "direct p99 ms", "gateway p99 ms", "failures"], overhead_rows)
    text += emit("Gateway overhead probe: 1-token requests, one at a time, direct and gateway interleaved",
                 ["path", "requests", "p50 ms", "p90 ms", "added p50 ms"],
                 [["direct vLLM", len(probe[0]), f"{_pct(probe[0], 0.5):.1f}", f"{_pct(probe[0], 0.9):.1f}", "-"],
                  ["gateway", len(probe[1]), f"{_pct(probe[1], 0.5):.1f}", f"{_pct(probe[1], 0.9):.1f}",
                   f"{_pct(probe[1], 0.5) - _pct(probe[0], 0.5):+.1f}"]],
                 notes="With 64-token completions taking seconds on this CPU, the p50 difference in the table above "
                       "is dominated by scheduling noise; this probe isolates the per-request cost of the gateway "
                       "(routing, system prompt, proxying, capture hand-off).")
    text += emit(f"LoRA adapter vs base model, direct to vLLM, {c} concurrent {tokens}-token requests",
                 ["model", "tok/s", "p50 ms", "ratio vs base"],
                 [["base", f"{base.tokens_per_second:.0f}", f"{base.p50 * 1000:.0f}", "1.00x"],
                  [f"sentiment@1 (LoRA r=8 q/k/v/o, --max-lora-rank {engine.spec.max_lora_rank})",
                   f"{lora.tokens_per_second:.0f}", f"{lora.p50 * 1000:.0f}",
                   f"{lora.tokens_per_second / base.tokens_per_second:.2f}x"]])
    text += emit("Adapter hot-swap vs vLLM restart",
                 ["operation", "seconds", "requests failed meanwhile"],
                 [["promote via /admin/promote (load into running vLLM + alias flip)", f"{swap_seconds:.2f}", "0"],
                  ["vLLM restart (stop + start until ready)", f"{restart_seconds:.1f}", "all (engine down)"],
                  ["vLLM cold start at launch", f"{cold_start:.1f}", "-"]])
    return text


def _latency_probe(direct_url: str, gateway_url: str, prompts: list[str], system: str) -> tuple[list[float],
                                                                                               list[float]]:
    direct: list[float] = []
    via: list[float] = []
    with httpx.Client(timeout=120) as client:
        for prompt in prompts:
            for url, model, sink, sys_prompt in ((direct_url, "sentiment@1", direct, system),
                                                 (gateway_url, "sentiment", via, None)):
                body = chat_bodies(model, [prompt], 1, sys_prompt)[0]
                started = time.perf_counter()
                response = client.post(url, json=body)
                if response.status_code == 200:
                    sink.append((time.perf_counter() - started) * 1000)
    return direct, via


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def _overhead_row(concurrency: int, n: int, direct: LoadResult, via: LoadResult) -> list[object]:
    return [concurrency, n, f"{direct.tokens_per_second:.0f}", f"{via.tokens_per_second:.0f}",
            f"{via.tokens_per_second / direct.tokens_per_second:.3f}", f"{direct.p50 * 1000:.0f}",
            f"{via.p50 * 1000:.0f}", f"{(via.p50 - direct.p50) * 1000:+.1f}", f"{direct.percentile(0.99) * 1000:.0f}",
            f"{via.percentile(0.99) * 1000:.0f}", direct.failures + via.failures]
