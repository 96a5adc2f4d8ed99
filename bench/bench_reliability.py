"""Reliability: the gateway under concurrent clients and hostile input, on a real vLLM and a real SQLite store.

- Load: C clients (8, 32, 128) each send requests one after another through the gateway with an inference key;
  every answer is counted as answered (200), refused explicitly (4xx, 429, 503) or failed (a 5xx other than 503,
  or no HTTP answer), and each answered request id is looked up in the store: captured exactly once, missing,
  or duplicated.
- Hostile input: each attack is sent 20 times, 4 at a time, while /healthz is polled every 50 ms; the table shows
  the statuses the attack got, any 5xx other than 503, the slowest /healthz answer during it, and how many
  traffic rows the attack added (0 for every request refused before it reached vLLM).

The load runs on SQLite and on a throwaway Postgres 15 (bench/postgres.py); faults under load are bench/bench_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.load import percentile
from bench.setup import base_model_path, sentiment_sets
from bench.tables import Table, emit
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.config import Config, parse_config
from tuneloop.keys import create_key
from tuneloop.ports import free_port
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

TWEETS = ["@united where is my bag", "@JetBlue great crew today", "@SouthwestAir delayed again",
          "@AmericanAir thanks for the upgrade"]


async def _clients(url: str, key: str, clients: int, each: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    ids: list[str] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients * 2)) as http:
        async def client(number: int) -> None:
            for i in range(each):
                body = {"model": "sentiment", "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "user", "content": f"{TWEETS[(number + i) % 4]} #{number}-{i}"}]}
                started = time.perf_counter()
                try:
                    response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                except httpx.HTTPError as exc:
                    statuses[f"no answer ({exc.__class__.__name__})"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    ids.append(response.headers["x-request-id"])

        started = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(clients)))
        seconds = time.perf_counter() - started
    return {"statuses": statuses, "latencies": latencies, "ids": ids, "seconds": seconds}


def _captured(store: Store, ids: list[str]) -> Counter[str]:
    found: Counter[str] = Counter()
    with store.session() as session:
        for start in range(0, len(ids), 500):
            found.update(session.scalars(select(TrafficRow.request_id).where(
                TrafficRow.request_id.in_(ids[start:start + 500]))))
    return found


def _traffic_rows(store: Store) -> int:
    with store.session() as session:
        return int(session.scalar(select(func.count()).select_from(TrafficRow)) or 0)


def _attacks(key: str) -> dict[str, tuple[dict[str, str], bytes]]:
    auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}

    def chat(content: str, **extra: Any) -> bytes:
        return json.dumps({"model": "sentiment", "messages": [{"role": "user", "content": content}], **extra}).encode()

    return {
        "1.9 MB prompt (over max_prompt_chars)": (auth, chat("a" * 1_900_000)),
        "body over the 2 MB limit": (auth, chat("a" * 2_100_000)),
        "90,000 characters without @ (the old quadratic e-mail pattern)": (auth, chat("a" * 90_000)),
        "JSON nested 100,000 deep": (auth, b'{"model":"sentiment","messages":[],"x":' + b"[" * 100_000
                                     + b"]" * 100_000 + b"}"),
        "NaN, a lone surrogate, an unknown field": (auth, b'{"model":"sentiment","messages":[{"role":"user",'
                                                    b'"content":"\\ud800"}],"temperature":NaN,"x":1}'),
        "n=64, max_tokens=-1": (auth, chat("hi", n=64, max_tokens=-1)),
        "model sentiment@\u00b2": (auth, json.dumps({"model": "sentiment@\u00b2", "messages": [
            {"role": "user", "content": "hi"}]}).encode()),
        "no key / a forged key": ({"content-type": "application/json", "Authorization": "Bearer tl_000000000000_"
                                   + "x" * 43}, chat("hi")),
        "SQL- and HTML-looking text (answered, stored as text)": (auth, chat(
            "'; DROP TABLE traffic; -- <script>alert(1)</script> {{7*7}} ${jndi:ldap://x}", max_tokens=2)),
    }


def _attack(url: str, headers: dict[str, str], body: bytes, store: Store) -> list[Any]:
    before = _traffic_rows(store)
    statuses: Counter[str] = Counter()
    health: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    http.get(f"{url}/healthz")
                    health.append(time.perf_counter() - started)
                except httpx.HTTPError:
                    health.append(30.0)
                stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()

    async def send() -> None:
        semaphore = asyncio.Semaphore(4)
        async with httpx.AsyncClient(timeout=600) as http:
            async def one() -> None:
                async with semaphore:
                    try:
                        statuses[str((await http.post(f"{url}/v1/chat/completions", content=body,
                                                      headers=headers)).status_code)] += 1
                    except httpx.HTTPError as exc:
                        statuses[f"no answer ({exc.__class__.__name__})"] += 1

            await asyncio.gather(*(one() for _ in range(20)))

    asyncio.run(send())
    time.sleep(1.5)  # the capture writer flushes every 0.5 s
    stop.set()
    poller.join(5)
    bad = sum(n for s, n in statuses.items() if not s.isdigit() or (int(s) >= 500 and s != "503"))
    return [", ".join(f"{s} x{n}" for s, n in sorted(statuses.items())), bad,
            f"{max(health) * 1000:.0f}" if health else "-", _traffic_rows(store) - before]


def _load_rows(url: str, key: str, store: Store, backend: str, levels: list[int], each: int) -> list[list[object]]:
    rows: list[list[object]] = []
    asyncio.run(_clients(url, key, 2, 2))  # warm-up
    for clients in levels:
        result = asyncio.run(_clients(url, key, clients, each))
        deadline = time.monotonic() + 30
        found = _captured(store, result["ids"])
        while len(found) < len(result["ids"]) and time.monotonic() < deadline:
            time.sleep(0.5)
            found = _captured(store, result["ids"])
        statuses: Counter[str] = result["statuses"]
        answered = statuses.get("200", 0)
        refused = sum(n for s, n in statuses.items() if s.isdigit() and s != "200" and (int(s) < 500 or s == "503"))
        failed = clients * each - answered - refused
        once = sum(1 for i in result["ids"] if found[i] == 1)
        rows.append([backend, clients, clients * each, answered, refused, failed, once,
                     len(result["ids"]) - len(found), sum(1 for n in found.values() if n > 1),
                     f"{percentile(result['latencies'], 0.5) * 1000:.0f}",
                     f"{percentile(result['latencies'], 0.99) * 1000:.0f}",
                     f"{clients * each / result['seconds']:.1f}"])
    return rows


CONFIG_FILE = "tuneloop.yaml"


def prepared(root: Path, *, database_url: str | None = None, extra_tasks: str = "",
             jobs: str = "") -> tuple[Config, Store, str]:
    """A config for a gateway that needs keys (also written to root/tuneloop.yaml), its store with a 2-step
    sentiment champion, and an inference key. `extra_tasks` are more entries under `tasks:`, `jobs` the `jobs:`
    section's body; the sentiment task schedules nothing (a `tuneloop run` under load runs only what the bench
    starts)."""
    from tuneloop.retrain.finetune import finetune

    database = f"database_url: {database_url}\n" if database_url else ""
    text = (f"data_dir: data\n{database}base_model:\n  path: {base_model_path()}\nserving:\n"
            f"  gateway_port: {free_port()}\n  vllm_port: {free_port()}\n  max_model_len: 512\n  kv_cache_gib: 2\n"
            "  admin_token: bench\n  require_api_key: true\n" + (f"jobs:\n{jobs}" if jobs else "") +
            "tasks:\n  sentiment:\n    schedule: {eval: null, drift: null}\n"
            "    train:\n      batch_size: 4\n      validation_examples: 2\n" + extra_tasks)
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(text)  # for a `tuneloop --config` process (bench/bench_faults.py)
    config = parse_config(text, config_dir=root)
    store = Store(config.resolved_database_url)
    add_dataset(store, config.data_path, sentiment_sets()["train"][:64], task="sentiment", name="bench",
                kind="train", source="bench", check_leakage=False)
    finetune(config, store, "sentiment", max_steps=2, dataset="sentiment/bench", progress=False)
    _, key = create_key(store, "bench", ["inference"])
    return config, store, key


def run(*, quick: bool = False) -> list[Table]:
    from bench.postgres import throwaway_postgres
    from tuneloop.serving.server import running_server

    levels, each = ([8, 32], 2) if quick else ([8, 32, 128], 4)
    load_rows: list[list[object]] = []
    attack_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config, store, key = prepared(Path(tmp) / "sqlite")
        with running_server(config, store, seed=0) as running:
            load_rows += _load_rows(running.url, key, store, "SQLite", levels, each)
            for name, (headers, body) in _attacks(key).items():
                attack_rows.append([name, *_attack(running.url, headers, body, store)])
        store.close()
        with throwaway_postgres() as postgres:
            config, store, key = prepared(Path(tmp) / "postgres", database_url=postgres.url)
            with running_server(config, store, seed=0) as running:
                load_rows += _load_rows(running.url, key, store, "Postgres 15", levels, each)
            store.close()
    return [
        emit("Concurrent clients through the gateway (SQLite and Postgres, real vLLM, 1-4 token answers)",
             ["store", "clients", "requests", "answered", "refused (4xx/503)", "failed", "captured exactly once",
              "lost (answered, not captured)", "captured twice", "p50 ms", "p99 ms", "requests/s"], load_rows,
             notes=f"Each client sends {each} requests one after another with an inference key; the store is read "
                   "back by the X-Request-Id each answer carried. 2 CPU cores run vLLM and the gateway together "
                   "(and the Postgres server, on its rows).",
             key="reliability-load"),
        emit("Hostile input: 20 requests per attack, 4 in flight, /healthz polled every 50 ms",
             ["attack", "statuses", "5xx other than 503", "slowest /healthz ms", "traffic rows added"],
             attack_rows, notes="A request the gateway refuses never reaches vLLM or the store. One vLLM refuses "
                                "(90,000 characters are longer than its context) is captured with vLLM's status, "
                                "redacted in the capture thread; the SQL- and HTML-looking request is answered and "
                                "stored as the text it is.", key="reliability-hostile"),
    ]
