"""One engine, a hundred adapters: mixed traffic over all of them against the base model on the same traffic, what
loading one into the running engine costs (as a promotion does) and its first requests against later ones, and the
memory each loaded adapter costs.

The adapters are random r=8 q/k/v/o LoRAs with trained-size deltas (bench/many_adapters.py: a full-size random
delta spells labels in 3-5 tokens, so its requests would do more work than the base model's; the run fails if the
answers' lengths differ by more than 10 %). Serving speed does not otherwise depend on their values.
vLLM runs with `--max-loras 16` (a step of 16 requests can hold 16 different adapters) and `--max-cpu-loras 100`
(all of them stay loaded once used, least recently used evicted beyond that), float32, prefix caching off. The
traffic is the sentiment task's classification requests (system prompt, a tweet, ≤ 4 tokens constrained to the
labels), 16 in flight: request i names adapter i mod 100, or the base model on the base rounds, in ABBA order.

Published multi-adapter curves to read ours beside (GPU systems; their absolute numbers do not transfer to 2 CPU
cores, their shape does): S-LoRA (Sheng et al., 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters")
serves 2,000 adapters on one A100 at throughput within a few per cent of a handful, with unified paging of adapter
weights and KV cache and custom kernels for heterogeneous batches; LoRAX (Predibase) loads adapters on demand,
batches requests of different adapters together and reports throughput roughly flat in the number of adapters.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_lora import _classification_bodies
from bench.load import LoadResult, run_load
from bench.many_adapters import TARGETS, TRAINED_LIKE_B_SCALE, WEIGHTS, write_adapters
from bench.setup import base_model_path, sentiment_sets
from bench.tables import Table, emit
from tuneloop.config import Config
from tuneloop.ports import free_port
from tuneloop.processes import live_members
from tuneloop.serving.engine import EngineSpec, EngineSupervisor


def run(*, quick: bool = False) -> list[Table]:
    count = 20 if quick else 100
    requests = 64 if quick else 200
    rounds = 1 if quick else 2
    probes = 4 if quick else 12
    task, serving = Config().tasks["sentiment"], Config().serving
    tweets = [e.last_user_text() for e in random.Random(5).sample(sentiment_sets()["heldout"], requests)]
    base = base_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(base, Path(tmp) / "adapters", count, b_scale=TRAINED_LIKE_B_SCALE)
        names = list(adapters)
        spec = EngineSpec(model_path=base, served_name="base", port=free_port(), max_model_len=512,
                          kv_cache_gib=2, max_lora_rank=8, max_loras=16, max_cpu_loras=count,
                          lora_target_modules=list(TARGETS), prefix_caching=False, dtype="float32",
                          lora_ops=serving.lora_ops, lora_compile=serving.lora_compile)  # the serving defaults
        engine = EngineSupervisor(spec, Path(tmp) / "vllm.log", restart=False)
        engine.start()
        try:
            url = f"{spec.base_url}/v1/chat/completions"
            one = _classification_bodies("base", tweets[:1], task)[0]
            for _ in range(4):
                _ask(spec, url, one)
            rss_before = _engine_rss_mib(engine)
            loads = [_load(spec, name, path) for name, path in adapters.items()]  # as a promotion loads one
            rss_after = _engine_rss_mib(engine)
            first, again, base_latency = [], [], []
            for name in names[:probes]:  # loaded, never asked yet
                first.append(_ask(spec, url, dict(one, model=name)))
                again.append(_ask(spec, url, dict(one, model=name)))
                base_latency.append(_ask(spec, url, one))
            for name in names:  # every adapter answers once before the timed rounds
                _ask(spec, url, dict(one, model=name))
            bodies = _classification_bodies("base", tweets, task)
            mixed = [dict(body, model=names[i % count]) for i, body in enumerate(bodies)]
            results: dict[str, list[LoadResult]] = {"adapters": [], "base": []}
            for i in range(rounds * 2):
                for kind in (("adapters", "base") if i % 2 == 0 else ("base", "adapters")):
                    results[kind].append(asyncio.run(run_load(url, mixed if kind == "adapters" else bodies, 16,
                                                              headers=spec.auth_headers)))
        finally:
            engine.stop()
        adapter_mib = (Path(adapters[names[0]]) / WEIGHTS).stat().st_size / 2**20
    rate = {kind: sum(r.requests - r.failures for r in rs) / sum(r.seconds for r in rs) for kind, rs in results.items()}
    tokens = {kind: sum(r.completion_tokens for r in rs) / max(1, sum(r.requests - r.failures for r in rs))
              for kind, rs in results.items()}
    if abs(tokens["adapters"] / tokens["base"] - 1) > 0.1:  # see bench/many_adapters.py
        raise RuntimeError(f"adapter answers average {tokens['adapters']:.2f} completion tokens, base answers "
                           f"{tokens['base']:.2f}: requests/s would compare different work")
    failures = sum(r.failures for rs in results.values() for r in rs)
    throughput = emit(f"{count} adapters on one engine vs the base model, same requests (16 in flight)", [
        "traffic", "requests", "requests/s", "vs base model", "failed", "tokens per answer"], [
        [f"spread over all {count} adapters", requests * rounds * 2, f"{rate['adapters']:.1f}",
         f"{rate['adapters'] / rate['base']:.2f}x", failures, f"{tokens['adapters']:.2f}"],
        ["base model (no adapter)", requests * rounds * 2, f"{rate['base']:.1f}", "1.00x", "-",
         f"{tokens['base']:.2f}"]],
        key="adapters-throughput",
        notes=f"{rounds * 2} rounds in ABBA order; every adapter had been loaded and had answered once before "
              f"(--max-cpu-loras {count}); a step of 16 requests holds up to 16 different adapters (--max-loras 16). "
              f"The serving defaults: lora_ops {spec.lora_ops}, compiled {spec.lora_compile}. "
              "Target: >= 0.9x the base model.")
    latency = emit("An adapter's load and first requests, one at a time (ms)", [
        "step", "probes", "median ms", "max ms"], [
        ["load into the running engine (POST /v1/load_lora_adapter)", len(loads),
         f"{statistics.median(loads):.0f}", f"{max(loads):.0f}"],
        ["its first request", len(first), f"{statistics.median(first):.0f}", f"{max(first):.0f}"],
        ["its second request", len(again), f"{statistics.median(again):.0f}", f"{max(again):.0f}"],
        ["a base-model request between them", len(base_latency), f"{statistics.median(base_latency):.0f}",
         f"{max(base_latency):.0f}"]],
        key="adapters-cold",
        notes=f"Every one of the {count} adapters loaded at runtime (as a promotion does), then a classification "
              f"request (≤ 4 tokens) to {len(first)} of them twice, with a base-model request after each pair, on an "
              "idle engine.")
    memory = emit("Memory per loaded adapter", ["adapters loaded", "engine RSS before MiB", "engine RSS after MiB",
                                                "MiB per adapter", "adapter file MiB"], [
        [count, f"{rss_before:,.0f}", f"{rss_after:,.0f}", f"{(rss_after - rss_before) / count:.2f}",
         f"{adapter_mib:.2f}"]], key="adapters-memory",
        notes="Resident memory of the engine's process group (vLLM's API server, engine core and workers) after a "
              "warm-up on the base model with no adapter loaded, and again once all were loaded. r=8 on q/k/v/o of "
              "SmolLM2-135M in float32.")
    return [throughput, latency, memory]


def _ask(spec: EngineSpec, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    response = httpx.post(url, json=body, headers=spec.auth_headers, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"{body['model']}: {response.status_code} {response.text[:300]}")
    return (time.perf_counter() - started) * 1000


def _load(spec: EngineSpec, name: str, path: Path) -> float:
    started = time.perf_counter()
    response = httpx.post(f"{spec.base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                          headers=spec.auth_headers, timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"loading {name}: {response.status_code} {response.text[:300]}")
    return (time.perf_counter() - started) * 1000


def _engine_rss_mib(engine: EngineSupervisor) -> float:
    assert engine.process is not None
    total = 0
    for pid in live_members(group=engine.process.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024
