"""Faults under load: `tuneloop serve` as its own process (a real vLLM; SQLite, or Postgres 15), 8 clients sending
requests one after another through the gateway with an inference key, and one fault injected mid-load:

- vLLM's API server SIGKILLed: the supervisor ends the dead engine's whole process group and restarts it; clients
  get 503 (Retry-After) meanwhile. Measured: seconds until /healthz is ready again, processes of the dead engine
  still alive afterwards.
- the SQLite database locked for 30 s (quick: 10 s) by another connection holding an exclusive transaction: the
  capture writer's inserts wait (SQLite's busy timeout is 30 s) and, if refused, spill to disk and are replayed.
  Measured: requests answered while the lock was held, what capture spilled and replayed (the gateway's own
  counters), and that every answered request is stored afterwards.
- Postgres stopped for 30 s (quick: 10 s) and started again: connections fail within seconds (connect timeout),
  capture spills and replays, and keys seen in the last 5 minutes keep working (serving/auth.py).
- the gateway SIGKILLed: what it had answered but not yet stored (its in-memory capture queue) is lost, within
  the bound `serving.capture_queue_size` / `capture_queue_mib`; vLLM gets SIGTERM from the kernel (PDEATHSIG) and
  exits with it. The gateway is started again, replays its spill file, and the store is read back.

- two gateways, each with its own vLLM, on one Postgres and one data dir, both under load: each captures its own
  requests exactly once, and a promotion through the first is polled for on the second until it routes to it.

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

from bench.bench_reliability import CONFIG_FILE, TWEETS, _captured, prepared
from bench.tables import Table, emit
from tuneloop.config import Config
from tuneloop.ports import free_port
from tuneloop.serving.engine import process_group_members
from tuneloop.store import Store

CLIENTS = 8


@dataclass
class LoadRecord:
    statuses: Counter[str] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # time.monotonic() of each 200

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def answered_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.answered_at if start <= t < end)


class Load:
    """`clients` clients sending one request after another until stopped, on a thread with its own event loop."""

    def __init__(self, url: str, key: str, clients: int = CLIENTS) -> None:
        self.url, self.key, self.clients = url, key, clients
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
                        self.record.answered_at.append(time.monotonic())
                    elif response.status_code == 503:
                        await asyncio.sleep(0.5)

            await asyncio.gather(*(client(n) for n in range(self.clients)))


class ServeProcess:
    """`python -m tuneloop --config C serve` (or `run`: with the scheduler and the job reaper) in its own session,
    as an operator runs it."""

    def __init__(self, config_path: Path, url: str, log_path: Path, *, command: str = "serve") -> None:
        self.config_path, self.url, self.log_path, self.command = config_path, url, log_path, command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 900, *, env: dict[str, str] | None = None) -> float:
        """Start it (with `env` added to this process's environment) and wait until /healthz is ready."""
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tuneloop", "--config", str(self.config_path),
                                             self.command], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env={**os.environ, **(env or {})})
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


def _row(backend: str, fault: str, record: LoadRecord, stored: tuple[int, int, int], after: str) -> list[object]:
    answered = record.statuses.get("200", 0)
    refused = sum(n for s, n in record.statuses.items() if s.isdigit() and s != "200" and (int(s) < 500 or s == "503"))
    return [backend, fault, record.sent, answered, refused, record.sent - answered - refused, *stored, after]


def _capture_counts(url: str) -> Counter[str]:
    """The gateway's capture outcomes (tuneloop_capture_records_total by outcome), from its /metrics."""
    counts: Counter[str] = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("tuneloop_capture_records_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def _hold_exclusive_lock(database: Path, seconds: float) -> None:
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        connection.execute("COMMIT")
    finally:
        connection.close()


def _serve(root: Path, config: Config) -> ServeProcess:
    url = f"http://{config.serving.gateway_host}:{config.serving.gateway_port}"
    return ServeProcess(root / CONFIG_FILE, url, root / "serve.log")


def _sqlite_faults(root: Path, steady_s: float, lock_s: float) -> list[list[object]]:
    config, store, key = prepared(root)
    serve = _serve(root, config)
    url = serve.url
    database = Path(config.resolved_database_url.removeprefix("sqlite:///"))
    rows: list[list[object]] = []
    try:
        serve.start()
        # vLLM SIGKILLed under load
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
        rows.append(_row("SQLite", "vLLM API server SIGKILLed", load.record, _stored(store, load.record),
                         f"ready again after {back_s:.0f} s" if ready else "not ready after 900 s") + [len(left)])
        # the database locked
        before = _capture_counts(url)
        with Load(url, key) as load:
            time.sleep(steady_s)
            locked_at = time.monotonic()
            locker = threading.Thread(target=_hold_exclusive_lock, args=(database, lock_s))
            locker.start()
            locker.join()
            unlocked_at = time.monotonic()
            time.sleep(steady_s)
        stored = _stored(store, load.record, wait_s=60)
        moved = _capture_counts(url) - before
        rows.append(_row("SQLite", f"database locked for {lock_s:.0f} s", load.record, stored,
                         f"{load.record.answered_between(locked_at, unlocked_at)} answered while locked; capture: "
                         f"{moved['spilled_database_error']} spilled, {moved['replayed']} replayed") + ["-"])
        # the gateway SIGKILLed
        engine = serve.vllm_pid()
        with Load(url, key) as load:
            time.sleep(steady_s)
            serve.signal(signal.SIGKILL)
            time.sleep(2)
        time.sleep(10)  # vLLM's orderly exit after PDEATHSIG's SIGTERM
        orphans = process_group_members(engine)
        restart_s = serve.start()
        once, missing, twice = _stored(store, load.record)
        rows.append(_row("SQLite", "gateway SIGKILLed", load.record, (once, missing, twice),
                         f"restarted in {restart_s:.0f} s; {missing} answered requests lost "
                         f"(bound: {config.serving.capture_queue_size} records)") + [len(orphans)])
    finally:
        serve.stop()
        store.close()
    return rows


def _postgres_faults(root: Path, steady_s: float, down_s: float) -> list[list[object]]:
    from bench.postgres import throwaway_postgres

    with throwaway_postgres() as postgres:
        config, store, key = prepared(root, database_url=postgres.url)
        serve = _serve(root, config)
        try:
            serve.start()
            before = _capture_counts(serve.url)
            with Load(serve.url, key) as load:
                time.sleep(steady_s)
                stopped_at = time.monotonic()
                postgres.stop()
                time.sleep(down_s)
                postgres.start()
                started_at = time.monotonic()
                time.sleep(steady_s)
            stored = _stored(store, load.record, wait_s=60)
            moved = _capture_counts(serve.url) - before
            return [_row("Postgres 15", f"database stopped for {down_s:.0f} s", load.record, stored,
                         f"{load.record.answered_between(stopped_at, started_at)} answered while it was down; "
                         f"capture: {moved['spilled_database_error']} spilled, {moved['replayed']} replayed")
                    + ["-"]]
        finally:
            serve.stop()
            store.close()


def _served_by(url: str, key: str, model: str = "sentiment") -> str | None:
    """Which adapter a gateway routes the task to now (vLLM names it in the answer); None if it did not answer."""
    try:
        response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                              json={"model": model, "max_tokens": 1, "messages": [
                                  {"role": "user", "content": "which adapter?"}]})
        return str(response.json().get("model")) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _two_gateways(root: Path, steady_s: float) -> tuple[list[list[object]], str]:
    """Two `tuneloop serve` processes, each with its own vLLM, on one Postgres and one data dir, both under load;
    sentiment@2 is promoted through the first, and the second is polled until it routes to it."""
    from bench.postgres import throwaway_postgres
    from tuneloop.retrain.finetune import finetune

    with throwaway_postgres() as postgres:
        config, store, key = prepared(root, database_url=postgres.url)
        finetune(config, store, "sentiment", max_steps=2, dataset="sentiment/bench", progress=False)  # sentiment@2
        first = _serve(root, config)
        text = (root / CONFIG_FILE).read_text()
        second_port = free_port()
        text = text.replace(f"gateway_port: {config.serving.gateway_port}", f"gateway_port: {second_port}")
        text = text.replace(f"vllm_port: {config.serving.vllm_port}", f"vllm_port: {free_port()}")
        (root / "second.yaml").write_text(text)
        second = ServeProcess(root / "second.yaml", f"http://127.0.0.1:{second_port}", root / "second.log")
        try:
            first.start()
            second.start()
            before = _served_by(second.url, key)
            with Load(first.url, key) as on_first, Load(second.url, key) as on_second:
                time.sleep(steady_s)
                promoted_at = time.monotonic()
                answer = httpx.post(f"{first.url}/admin/promote", json={"version": "sentiment@2"}, timeout=120,
                                    headers={"Authorization": "Bearer bench"})
                answer.raise_for_status()
                first_s = time.monotonic() - promoted_at
                while _served_by(second.url, key) != "sentiment@2" and time.monotonic() - promoted_at < 120:
                    time.sleep(0.1)
                second_s = time.monotonic() - promoted_at
                time.sleep(steady_s)
            rows = [_row("Postgres 15", name, load.record, _stored(store, load.record), after)
                    for name, load, after in (
                        ("gateway 1 of 2 (promotes)", on_first, f"routes sentiment@2 {first_s:.1f} s after the call"),
                        ("gateway 2 of 2 (follows)", on_second,
                         f"routed {before} before; routes sentiment@2 {second_s:.1f} s after the call"))]
            return rows, f"{second_s:.1f}"
        finally:
            first.stop()
            second.stop()
            store.close()


def run(*, quick: bool = False) -> list[Table]:
    steady_s, fault_s = (5.0, 10.0) if quick else (15.0, 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _sqlite_faults(Path(tmp) / "sqlite", steady_s, fault_s)
        rows += _postgres_faults(Path(tmp) / "postgres", steady_s, fault_s)
        pair, _ = _two_gateways(Path(tmp) / "pair", steady_s)
    return [emit("Two gateways on one Postgres and one data dir, both under load, a promotion through the first",
                 ["store", "gateway", "sent", "answered", "refused (4xx/503)", "failed", "stored exactly once",
                  "answered, not stored", "stored twice", "after"], pair,
                 notes=f"{CLIENTS} clients on each gateway, each gateway with a vLLM of its own on the same 2 cores. "
                       "The second gateway learns of the promotion by polling the registry every "
                       "serving.alias_poll_s (2 s) and loads the adapter into its engine before routing to it.",
                 key="reliability-two-gateways"),
            emit(f"Faults under load: {CLIENTS} clients through `tuneloop serve` (real vLLM)",
                 ["store", "fault", "sent", "answered", "refused (4xx/503)", "failed", "stored exactly once",
                  "answered, not stored", "stored twice", "after", "engine processes left behind"], rows,
                 notes=f"{steady_s:.0f} s of load before each fault and after it. A refused request got 503 with "
                       "Retry-After (engine restarting, database away for a key not seen before) and may be "
                       "retried; 'failed' is a request that got no HTTP answer (the gateway itself was killed) or a "
                       "5xx other than 503.", key="reliability-faults")]
