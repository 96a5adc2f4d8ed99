"""Faults under load: `tuneloop serve` as its own process (a real vLLM, a real SQLite store), 8 clients sending
requests one after another through the gateway with an inference key, and one fault injected mid-load:

- vLLM's API server SIGKILLed: the supervisor ends the dead engine's whole process group and restarts it; clients
  get 503 (Retry-After) meanwhile. Measured: seconds until /healthz is ready again, processes of the dead engine
  still alive afterwards.
- the SQLite database locked for 30 s (quick: 10 s) by another connection holding an exclusive transaction: the
  capture writer cannot insert, spills to disk, and replays once the lock is gone. Measured: whether answering
  went on, and that every answered request is stored once the lock is released.
- the gateway SIGKILLed: what it had answered but not yet stored (its in-memory capture queue) is lost, within
  the bound `serving.capture_queue_size` / `capture_queue_mib`; vLLM gets SIGTERM from the kernel (PDEATHSIG) and
  exits with it. The gateway is started again, replays its spill file, and the store is read back.

Each row: requests sent, answered (200), refused explicitly (503/4xx), failed (no HTTP answer or another 5xx),
and of the answered ones how many are stored exactly once, missing, or stored twice, read back by X-Request-Id.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.bench_reliability import TWEETS, _captured
from bench.load import free_port
from bench.setup import base_model_path, sentiment_sets
from bench.tables import Table, emit
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.config import parse_config
from tuneloop.keys import create_key
from tuneloop.serving.engine import process_group_members
from tuneloop.store import Store

CLIENTS = 8


@dataclass
class LoadRecord:
    statuses: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


class Load:
    """CLIENTS clients sending one request after another until stopped, on a thread with its own event loop."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.record = LoadRecord()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        async with httpx.AsyncClient(timeout=60) as http:
            async def client(number: int) -> None:
                i = 0
                while not self._stop.is_set():
                    i += 1
                    body = {"model": "sentiment", "max_tokens": 4, "temperature": 0, "messages": [
                        {"role": "user", "content": f"{TWEETS[(number + i) % 4]} #{number}-{i}"}]}
                    try:
                        response = await http.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)
                    except httpx.HTTPError as exc:
                        self.record.statuses[f"no answer ({exc.__class__.__name__})"] += 1
                        await asyncio.sleep(0.2)
                        continue
                    self.record.statuses[str(response.status_code)] += 1
                    if response.status_code == 200:
                        self.record.ids.append(response.headers["x-request-id"])
                    elif response.status_code == 503:
                        await asyncio.sleep(0.5)

            await asyncio.gather(*(client(n) for n in range(CLIENTS)))


class ServeProcess:
    """`python -m tuneloop --config C serve` in its own session, as an operator runs it."""

    def __init__(self, config_path: Path, url: str, log_path: Path) -> None:
        self.config_path, self.url, self.log_path = config_path, url, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 900) -> float:
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tuneloop", "--config", str(self.config_path),
                                             "serve"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_ready(self.url, timeout_s, process=self.process):
            raise RuntimeError(f"tuneloop serve did not become ready; see {self.log_path}")
        return time.monotonic() - started

    def vllm_pid(self) -> int:
        assert self.process is not None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid and b"vllm" in cmdline:
                return int(stat.parent.name)
        raise RuntimeError("no vLLM child of tuneloop serve")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()


def wait_ready(url: str, timeout_s: float, *, process: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _stored(store: Store, record: LoadRecord, *, wait_s: float = 30) -> tuple[int, int, int]:
    """(stored exactly once, missing, stored twice) of the answered requests, waiting up to `wait_s` for replay."""
    deadline = time.monotonic() + wait_s
    found = _captured(store, record.ids)
    while len(found) < len(set(record.ids)) and time.monotonic() < deadline:
        time.sleep(1)
        found = _captured(store, record.ids)
    once = sum(1 for i in record.ids if found[i] == 1)
    return once, len(set(record.ids)) - len(found), sum(1 for n in found.values() if n > 1)


def _row(fault: str, record: LoadRecord, stored: tuple[int, int, int], after: str) -> list[object]:
    answered = record.statuses.get("200", 0)
    refused = sum(n for s, n in record.statuses.items() if s.isdigit() and s != "200" and (int(s) < 500 or s == "503"))
    return [fault, record.sent, answered, refused, record.sent - answered - refused, *stored, after]


def _hold_exclusive_lock(database: Path, seconds: float) -> None:
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        connection.execute("COMMIT")
    finally:
        connection.close()


def run(*, quick: bool = False) -> list[Table]:
    from tuneloop.retrain.finetune import finetune

    steady_s, lock_s = (5, 10) if quick else (15, 30)
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        config_text = (f"data_dir: data\nbase_model:\n  path: {base_model_path()}\nserving:\n  gateway_port: {port}\n"
                       f"  vllm_port: {free_port()}\n  max_model_len: 512\n  kv_cache_gib: 2\n  admin_token: bench\n"
                       "  require_api_key: true\n"
                       "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n")
        config_path = root / "tuneloop.yaml"
        config_path.write_text(config_text)
        config = parse_config(config_text, config_dir=root)
        store = Store(config.resolved_database_url)
        add_dataset(store, config.data_path, sentiment_sets()["train"][:64], task="sentiment", name="bench",
                    kind="train", source="bench", check_leakage=False)
        finetune(config, store, "sentiment", max_steps=2, dataset="sentiment/bench", progress=False)
        _, key = create_key(store, "bench", ["inference"])
        url = f"http://127.0.0.1:{port}"
        serve = ServeProcess(config_path, url, root / "serve.log")
        database = Path(config.resolved_database_url.removeprefix("sqlite:///"))
        try:
            serve.start()
            # 1. vLLM SIGKILLed under load
            with Load(url, key) as load:
                time.sleep(steady_s)
                dead = serve.vllm_pid()
                os.kill(dead, signal.SIGKILL)
                killed_at = time.monotonic()
                time.sleep(2)
                ready = wait_ready(url, 900)
                back_s = time.monotonic() - killed_at
                time.sleep(steady_s)
            left = process_group_members(dead)
            rows.append(_row("vLLM API server SIGKILLed", load.record, _stored(store, load.record),
                             f"ready again after {back_s:.0f} s" if ready else "not ready after 900 s")
                        + [len(left)])
            # 2. SQLite locked
            with Load(url, key) as load:
                time.sleep(steady_s)
                locker = threading.Thread(target=_hold_exclusive_lock, args=(database, lock_s))
                locker.start()
                locker.join()
                time.sleep(steady_s)
            answered_during = load.record.statuses.get("200", 0)
            rows.append(_row(f"SQLite locked for {lock_s} s", load.record, _stored(store, load.record, wait_s=60),
                             f"{answered_during} answered in all; the spill was replayed") + ["-"])
            # 3. the gateway SIGKILLed
            engine = serve.vllm_pid()
            with Load(url, key) as load:
                time.sleep(steady_s)
                serve.signal(signal.SIGKILL)
                time.sleep(2)
            time.sleep(10)  # vLLM's orderly exit after PDEATHSIG's SIGTERM
            orphans = process_group_members(engine)
            restart_s = serve.start()
            once, missing, twice = _stored(store, load.record)
            rows.append(_row("gateway SIGKILLed", load.record, (once, missing, twice),
                             f"restarted in {restart_s:.0f} s; {missing} answered requests lost "
                             f"(bound: {config.serving.capture_queue_size} records)") + [len(orphans)])
        finally:
            serve.stop()
            store.close()
    return [emit(f"Faults under load: {CLIENTS} clients through `tuneloop serve` (SQLite, real vLLM)",
                 ["fault", "sent", "answered", "refused (4xx/503)", "failed", "stored exactly once",
                  "answered, not stored", "stored twice", "after", "engine processes left behind"], rows,
                 notes=f"{steady_s} s of load before each fault and after it. A refused request got 503 with "
                       "Retry-After (engine restarting) and may be retried; 'failed' is a request that got no HTTP "
                       "answer (the gateway itself was killed) or a 5xx other than 503.",
                 key="reliability-faults")]
