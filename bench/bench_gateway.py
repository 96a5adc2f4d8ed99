"""What the gateway itself adds to a request, with the engine's time taken out of the way.

`bench serving` compares the gateway with vLLM direct, where a 1-token reply takes ≈270 ms on 2 cores and the
engine's own variance (tens of ms) hides a millisecond. Here the upstream answers at once (bench/stub_upstream.py:
uvicorn + httptools + uvloop, parsing the body as an engine would), so the difference between a request sent to it
directly and one sent through the real gateway (bench/stub_gateway.py with that upstream: keys, limits, routing,
system prompt, label constraint, proxying over loopback HTTP, metrics, capture into SQLite) is the gateway's cost:

- added latency at 1 in flight, per-pair differences with paths alternating first, for JSON answers and for the
  time to the first streamed event;
- the gateway process's CPU time per request at 1, 8 and 32 in flight (from /proc): on a CPU-served model every
  gateway core-millisecond is one the engine does not get, which is what a throughput ratio against vLLM measures
  under load.

The client is aiohttp (lighter per request than httpx), in this process; it, the stub and the gateway share the
machine's cores, as a gateway and vLLM do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_faults import wait_ready
from bench.bench_reliability import prepared
from bench.load import percentile
from bench.tables import Table, emit
from tuneloop.ports import free_port
from tuneloop.serving.constraints import constrain_to_labels

USER_TEXT = "@united my bag never arrived and nobody at the desk would tell me where it went"


def run(*, quick: bool = False) -> list[Table]:
    import aiohttp  # noqa: F401 - fail early when missing

    pairs = 60 if quick else 400
    per_level = 100 if quick else 1500
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, store, key = prepared(root)
        store.close()
        task = config.tasks["sentiment"]
        direct_body: dict[str, Any] = {"model": "sentiment@1", "max_tokens": 4, "messages": [
            {"role": "system", "content": task.system_prompt}, {"role": "user", "content": USER_TEXT}]}
        constrain_to_labels(direct_body, task)  # the body the gateway forwards: both paths send the same upstream
        gateway_body = {"model": "sentiment", "max_tokens": 4, "messages": [{"role": "user", "content": USER_TEXT}]}
        upstream_port = free_port()
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        processes = [subprocess.Popen([sys.executable, "-m", "bench.stub_upstream", str(upstream_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
        gateway_url = f"http://127.0.0.1:{config.serving.gateway_port}"
        # the same gateway with the label signal off (issue 26), for its cost side by side
        quiet_port = free_port()
        quiet_config = root / "tuneloop-no-signal.yaml"
        quiet_config.write_text((root / "tuneloop.yaml").read_text()
                                .replace(f"gateway_port: {config.serving.gateway_port}", f"gateway_port: {quiet_port}")
                                .replace("  sentiment:\n", "  sentiment:\n    estimate: {signal: false}\n", 1))
        quiet_url = f"http://127.0.0.1:{quiet_port}"
        log = open(root / "gateway.log", "wb")  # noqa: SIM115 - closed in finally
        for config_file in (root / "tuneloop.yaml", quiet_config):
            processes.append(subprocess.Popen([sys.executable, "-m", "bench.stub_gateway", str(config_file),
                                               upstream_url], stdout=log, stderr=subprocess.STDOUT))
        try:
            for url, process in ((gateway_url, processes[1]), (quiet_url, processes[2])):
                if not wait_ready(url, 120, process=process):
                    raise RuntimeError(f"a stub gateway did not start; see {root / 'gateway.log'}")
            headers = {"Authorization": f"Bearer {key}"}
            result = asyncio.run(_measure(upstream_url, gateway_url, direct_body, gateway_body, headers,
                                          processes[1].pid, pairs, per_level))
            result["signal"] = asyncio.run(_signal_cost(gateway_url, quiet_url, gateway_body, headers,
                                                        (processes[1].pid, processes[2].pid), pairs, per_level))
            result["clients"] = asyncio.run(_clients(upstream_url, direct_body, 200 if quick else 1000))
            result["codecs"] = _json_codecs(direct_body, 2000 if quick else 20000)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
            log.close()
    return _tables(result, pairs)


async def _measure(upstream: str, gateway: str, direct_body: dict[str, Any], gateway_body: dict[str, Any],
                   headers: dict[str, str], gateway_pid: int, pairs: int, per_level: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sides = {"direct": (f"{upstream}/v1/chat/completions", direct_body, {}),
                 "gateway": (f"{gateway}/v1/chat/completions", gateway_body, headers)}
        for _ in range(50):  # warm connections, caches and the key lookup on both paths
            for url, body, head in sides.values():
                await _one(http, url, body, head, stream=False)
        out: dict[str, Any] = {}
        for stream in (False, True):
            timings: dict[str, list[float]] = {"direct": [], "gateway": []}
            for i in range(pairs):
                order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
                for name in order:
                    url, body, head = sides[name]
                    timings[name].append(await _one(http, url, body, head, stream=stream))
            out["stream" if stream else "json"] = timings
        levels = []
        for concurrency in (1, 8, 32):
            rates: dict[str, float] = {}
            cpu_ms = 0.0
            for name in ("direct", "gateway", "gateway", "direct"):  # ABBA
                url, body, head = sides[name]
                cpu_before = _cpu_seconds(gateway_pid)
                started = time.perf_counter()
                await _load(http, url, body, head, concurrency, per_level // 2)
                seconds = time.perf_counter() - started
                rates[name] = rates.get(name, 0.0) + seconds
                if name == "gateway":
                    cpu_ms += (_cpu_seconds(gateway_pid) - cpu_before) * 1000
            levels.append({"concurrency": concurrency, "direct_rps": per_level / rates["direct"],
                           "gateway_rps": per_level / rates["gateway"], "gateway_cpu_ms": cpu_ms / per_level})
        out["levels"] = levels
    return out


async def _signal_cost(with_signal: str, without: str, body: dict[str, Any], headers: dict[str, str],
                       pids: tuple[int, int], pairs: int, per_level: int) -> dict[str, Any]:
    """The same gateway with the label signal on and off: per-pair latency at 1 in flight (alternating first),
    and CPU per request at 8 in flight in ABBA rounds."""
    import aiohttp

    urls = {"on": f"{with_signal}/v1/chat/completions", "off": f"{without}/v1/chat/completions"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(50):
            for url in urls.values():
                await _one(http, url, body, headers, stream=False)
        timings: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(pairs):
            for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                timings[name].append(await _one(http, urls[name], body, headers, stream=False))
        cpu_ms = {"on": 0.0, "off": 0.0}
        for name in ("on", "off", "off", "on"):
            pid = pids[0] if name == "on" else pids[1]
            before = _cpu_seconds(pid)
            await _load(http, urls[name], body, headers, 8, per_level // 2)
            cpu_ms[name] += (_cpu_seconds(pid) - before) * 1000 / per_level
    return {"timings": timings, "cpu_ms": cpu_ms}


async def _one(http: Any, url: str, body: dict[str, Any], headers: dict[str, str], *, stream: bool) -> float:
    """Milliseconds to the whole JSON answer, or to the first streamed event."""
    payload = dict(body, stream=True, stream_options={"include_usage": True}) if stream else body
    started = time.perf_counter()
    async with http.post(url, json=payload, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        if stream:
            first = await response.content.readuntil(b"\n\n")
            elapsed = time.perf_counter() - started
            assert first.startswith(b"data: "), first
            await response.read()
            return elapsed * 1000
        await response.read()
    return (time.perf_counter() - started) * 1000


async def _load(http: Any, url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int,
                total: int) -> None:
    remaining = iter(range(total))

    async def worker() -> None:
        for _ in remaining:
            await _one(http, url, body, headers, stream=False)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _clients(upstream: str, body: dict[str, Any], requests: int) -> dict[str, float]:
    """µs per request, one at a time, for the gateway's upstream client and the one it replaced, on the same
    upstream in alternating rounds (best of 6 rounds)."""
    import httpx

    from tuneloop.serving.proxy import encode
    from tuneloop.serving.upstream import AiohttpUpstream

    payload = encode(body)
    new = AiohttpUpstream(upstream, {}, timeout_s=30)
    old = httpx.AsyncClient(base_url=upstream, limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def with_aiohttp() -> None:
        response = await new.open("/v1/chat/completions", payload)
        await response.read()
        await response.close()

    async def with_httpx() -> None:
        response = await old.send(old.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        await response.aread()
        await response.aclose()

    calls = {"aiohttp (serving/upstream.py)": with_aiohttp, "httpx AsyncClient (before)": with_httpx}
    best: dict[str, float] = {name: float("inf") for name in calls}
    for call in calls.values():  # warm both connection pools
        for _ in range(50):
            await call()
    for round_ in range(6):
        for name in (list(calls) if round_ % 2 == 0 else list(calls)[::-1]):
            started = time.perf_counter()
            for _ in range(requests // 6):
                await calls[name]()
            best[name] = min(best[name], (time.perf_counter() - started) / (requests // 6) * 1e6)
    await new.close()
    await old.aclose()
    return best


def _json_codecs(body: dict[str, Any], repeats: int) -> dict[str, float]:
    """µs to decode a request body and encode the upstream one, stdlib json (what the gateway uses) vs msgspec."""
    import json

    import msgspec

    raw = json.dumps(body).encode()

    def stdlib() -> bytes:
        return json.dumps(json.loads(raw)).encode()

    def with_msgspec() -> bytes:
        encoded: bytes = msgspec.json.encode(msgspec.json.decode(raw))
        return encoded

    timings = {}
    for name, round_trip in (("stdlib json", stdlib), ("msgspec", with_msgspec)):
        started = time.perf_counter()
        for _ in range(repeats):
            round_trip()
        timings[name] = (time.perf_counter() - started) / repeats * 1e6
    return timings


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _tables(result: dict[str, Any], pairs: int) -> list[Table]:
    rows = []
    for kind, label in (("json", "JSON answer"), ("stream", "first streamed event")):
        direct, via = np.array(result[kind]["direct"]), np.array(result[kind]["gateway"])
        differences = via - direct
        rng = np.random.default_rng(12345)
        medians = np.median(differences[rng.integers(0, len(differences), (2000, len(differences)))], axis=1)
        low, high = np.quantile(medians, [0.025, 0.975])
        rows.append([label, pairs, f"{np.median(direct):.2f}", f"{np.median(via):.2f}",
                     f"{percentile(list(direct), 0.9):.2f}", f"{percentile(list(via), 0.9):.2f}",
                     f"{np.median(differences):+.2f} [{low:+.2f}, {high:+.2f}]"])
    tables = [emit("Gateway latency over an instant upstream, 1 in flight (ms)",
                   ["measured to", "pairs", "direct p50", "gateway p50", "direct p90", "gateway p90",
                    "added: median of per-pair differences [95 % CI]"], rows, key="gateway-added",
                   notes="Same upstream body on both paths; within a pair the path that goes first alternates. "
                         "Target: at most 1 ms added at p50, and the first streamed event within 1 ms of direct.")]
    level_rows = [[level["concurrency"], f"{level['direct_rps']:,.0f}", f"{level['gateway_rps']:,.0f}",
                   f"{level['gateway_rps'] / level['direct_rps']:.2f}", f"{level['gateway_cpu_ms']:.2f}"]
                  for level in result["levels"]]
    tables.append(emit("Gateway CPU per request over an instant upstream", [
        "in flight", "direct requests/s", "gateway requests/s", "gateway / direct", "gateway CPU ms per request"],
        level_rows, key="gateway-cpu",
        notes="ABBA rounds per level. With an upstream that answers at once the requests/s ratio is not the serving "
              "target (the gateway doubles the HTTP work on shared cores); the CPU per request is what the gateway "
              "takes from a CPU-served engine. bench serving has the ratio against vLLM."))
    signal_cost = result["signal"]
    on, off = np.array(signal_cost["timings"]["on"]), np.array(signal_cost["timings"]["off"])
    differences = on - off
    rng = np.random.default_rng(54321)
    medians = np.median(differences[rng.integers(0, len(differences), (2000, len(differences)))], axis=1)
    low, high = np.quantile(medians, [0.025, 0.975])
    tables.append(emit("What the label signal costs the gateway (same gateway, signal on vs off)", [
        "pairs", "signal off p50 (ms)", "signal on p50 (ms)", "added: median of per-pair differences [95 % CI]",
        "CPU ms per request at 8 in flight, off", "CPU ms per request at 8 in flight, on"],
        [[pairs, f"{np.median(off):.2f}", f"{np.median(on):.2f}",
          f"{np.median(differences):+.3f} [{low:+.3f}, {high:+.3f}]", f"{signal_cost['cpu_ms']['off']:.2f}",
          f"{signal_cost['cpu_ms']['on']:.2f}"]], key="gateway-signal",
        notes="Two gateway processes on the same stub upstream, one with tasks.sentiment.estimate.signal off. With it "
              "on, the gateway asks for the first token's top 20 log-probabilities, the upstream answers with them "
              "(vLLM's shape, 20 candidates), and the gateway keeps the labels' for capture and takes them out of "
              "the answer. What vLLM spends computing them is not in this table (bench serving runs vLLM)."))
    clients = result["clients"]
    json_rows = result["codecs"]
    tables.append(emit("The parts chosen by measurement (µs per request, one at a time)", [
        "part", "choice", "µs, choice", "alternative", "µs, alternative"], [
        ["client to the engine", "aiohttp (serving/upstream.py)", f"{clients['aiohttp (serving/upstream.py)']:.0f}",
         "httpx AsyncClient (before)", f"{clients['httpx AsyncClient (before)']:.0f}"],
        ["request JSON decode + upstream encode", "stdlib json", f"{json_rows['stdlib json']:.1f}", "msgspec",
         f"{json_rows['msgspec']:.1f}"]], key="gateway-parts",
        notes="Clients: the same upstream request to the stub upstream, best of 6 alternating rounds, including the "
              "upstream's own time. JSON: the bench's request body decoded and re-encoded. msgspec is faster but the "
              "difference is a few µs of a request's cost, so the gateway keeps the standard library."))
    return tables
