"""Scale-out on one 2-core machine, each scaled-out figure beside its single-machine baseline in the same run.

1. Retraining jobs through the Ray runner (a throwaway Ray head and a worker node on 127.0.0.1) vs the local
   runner, in the order local, Ray, Ray, local: seconds from submission until the worker's first stage, seconds
   from submission to the gate's decision, and the jobs per hour that makes (one job at a time per task). The job
   is the colours task's (bench/colours.py), a few steps, judged through one real gateway.
2. Engine replicas on Ray Serve vs the single supervised vLLM: requests per second and p50/p95 latency through the
   gateway at 8 clients for the local engine, 1 replica and 2 replicas (in the order local, 1, 2, 2, 1, local is not
   affordable here: each engine start takes minutes, so each is measured twice in a row, before and after the
   other); promotion time with 1 and 2 replicas; one replica SIGKILLed under load: requests failed and seconds until
   both replicas serve again.
3. Capture into one Postgres from 1 vs 2 gateways: the captured rows per second and the latency each gateway
   adds, at 16 clients per gateway, with a stub engine that answers at once, so the gateway and the database are
   what is measured.

What 2 cores can and cannot show: replicas and jobs share the same two cores, so a second replica cannot add
throughput here (it competes with the first), and a Ray job's placement on "another node" is placement on the
same CPU; the figures show the overheads (submission, proxy hop, config roll-out) and the failure behaviour, not
the speed-up of more machines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.bench_faults import wait_ready
from bench.bench_reliability import _traffic_rows, prepared
from bench.colours import COLOURS_TASK, TASK, add_colours_sets
from bench.load import percentile
from bench.ray_cluster import ThrowawayRay, throwaway_ray
from bench.tables import Table, emit
from tuneloop.conductor.loop import Loop
from tuneloop.config import Config
from tuneloop.ports import free_port
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import Job, ManualTrigger
from tuneloop.serving.replicated_engine import ReplicatedEngine
from tuneloop.store import Store

JOB_STEPS = 3


def _run_job(loop: Loop, store: Store, key: str, timeout_s: float = 1800) -> Job:
    job = loop.request_retrain(TASK, ManualTrigger(key=key, reason="bench scale")).job
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loop.reap_jobs()
        current = JobStore(store).get(job.id)
        if not current.active:
            return current
        time.sleep(0.5)
    raise RuntimeError(f"job {job.id} did not end within {timeout_s:.0f} s")


def _job_row(runner: str, job: Job) -> list[object]:
    first = min((s.started_at for s in job.stages.values()), default=None)
    to_running = (first - job.created_at).total_seconds() if first else float("nan")
    assert job.finished_at is not None
    total = (job.finished_at - job.created_at).total_seconds()
    return [runner, job.state, f"{to_running:.1f}", f"{total:.0f}", f"{3600 / total:.1f}"]


def _jobs(root: Path) -> list[list[object]]:
    from tuneloop.conductor.process import WORKER_MODULE, assemble_loop, running
    from tuneloop.retrain.finetune import finetune
    from tuneloop.retrain.ray_runner import RayRunner
    from tuneloop.retrain.runner import LocalRunner

    task = COLOURS_TASK.replace("retrain: {", f"retrain: {{max_steps: {JOB_STEPS}, ")
    config, store, _ = prepared(root, extra_tasks=task, jobs="  heartbeat_s: 1\n  stale_after_s: 60\n")
    add_colours_sets(store, config.data_path)
    finetune(config, store, TASK, dataset=f"{TASK}/poisoned", progress=False)
    rows: list[list[object]] = []
    with running(config, store) as stack, throwaway_ray() as ray:
        ray.add_node("trainer", cpus=1, resources={"tuneloop_trainer": 1.0})
        ray_config: Config = config.model_copy(deep=True)
        ray_config.jobs.runner, ray_config.jobs.ray_address = "ray", ray.address
        ray_config.jobs.retrain.resources = {"tuneloop_trainer": 1.0}
        loops = {"local": assemble_loop(config, store, runner=LocalRunner(config, worker_module=WORKER_MODULE)),
                 "ray": assemble_loop(ray_config, store, runner=RayRunner(ray_config, worker_module=WORKER_MODULE))}
        for n, runner in enumerate(("local", "ray", "ray", "local")):
            stack.server.ctx.swapper.promote(f"{TASK}@1")  # every job starts from the same poisoned champion
            job = _run_job(loops[runner], store, f"bench-scale-{n}")
            rows.append(_job_row(runner, job))
            print(rows[-1], flush=True)
    store.close()
    return rows


def _summary(rows: list[list[object]]) -> list[list[object]]:
    out: list[list[object]] = []
    for runner in ("local", "ray"):
        mine = [r for r in rows if r[0] == runner]
        running_s = statistics.mean(float(str(r[2])) for r in mine)
        total_s = statistics.mean(float(str(r[3])) for r in mine)
        out.append([runner, len(mine), f"{running_s:.1f}", f"{total_s:.0f}", f"{3600 / total_s:.1f}"])
    local, ray = out
    out.append(["ray / local", "", *(f"{float(str(ray[i])) / float(str(local[i])):.2f}x" for i in (2, 3, 4))])
    return out


# 2. replicas ---------------------------------------------------------------------------------------------------

LOAD_CLIENTS = 8


def _load(url: str, key: str, each: int) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p95 ms, non-200 answers) for LOAD_CLIENTS clients sending `each` requests apiece."""
    from bench.bench_reliability import _clients

    result = asyncio.run(_clients(url, key, LOAD_CLIENTS, each))
    bad = sum(n for status, n in result["statuses"].items() if status != "200")
    return (LOAD_CLIENTS * each / result["seconds"], percentile(result["latencies"], 0.5) * 1000,
            percentile(result["latencies"], 0.95) * 1000, bad)


def _promote_s(url: str, version: str) -> float:
    started = time.monotonic()
    response = httpx.post(f"{url}/admin/promote", json={"version": version}, timeout=1800,
                          headers={"Authorization": "Bearer bench"})
    response.raise_for_status()
    return time.monotonic() - started


def _failover(url: str, key: str, engine: ReplicatedEngine) -> tuple[int, int, float]:
    """(requests answered, requests failed, seconds from the kill until every replica runs again) with one of
    two replicas SIGKILLed under load."""
    statuses: Counter[str] = Counter()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
            while not stop.is_set():
                try:
                    response = http.post(f"{url}/v1/chat/completions", json={
                        "model": "sentiment", "max_tokens": 2, "temperature": 0,
                        "messages": [{"role": "user", "content": "@united where is my bag"}]})
                    statuses[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    victim = next(r for r in engine.app.deployment()["replicas"] if r.get("state") == "RUNNING")
    os.kill(int(victim["pid"]), signal.SIGKILL)
    killed = time.monotonic()
    back = float("nan")
    while time.monotonic() - killed < 900:
        running = [r for r in engine.app.deployment().get("replicas", []) if r.get("state") == "RUNNING"]
        if len(running) >= 2 and all(r["replica_id"] != victim["replica_id"] for r in running):
            back = time.monotonic() - killed
            break
        time.sleep(1)
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(180)
    return statuses["200"], sum(n for s, n in statuses.items() if s != "200"), back


def _replicas(root: Path, each: int) -> tuple[list[list[object]], list[object]]:
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.server import running_server

    config, store, key = prepared(root)
    for _ in range(5):  # sentiment@2..6: each promotion below rolls out a version no replica holds yet
        finetune(config, store, "sentiment", max_steps=1, dataset="sentiment/bench", progress=False)
    rows: list[list[object]] = []
    failover: list[object] = []
    versions = iter(f"sentiment@{n}" for n in range(2, 7))
    with throwaway_ray(head_cpus=3) as ray:
        for setting in ("local engine", "1 replica", "2 replicas", "1 replica", "local engine"):
            if setting == "local engine":
                _serve_shutdown(ray.address)  # no replica left running beside the local engine
            config.serving.replicas.engine = "local" if setting == "local engine" else "ray-serve"
            config.serving.replicas.count = 2 if setting == "2 replicas" else 1
            config.serving.replicas.ray_address = ray.address
            config.serving.replicas.http_port = ray_http_port(ray)
            started = time.monotonic()
            with running_server(config, store) as server:
                ready_s = time.monotonic() - started
                _load(server.url, key, 1)  # warm-up
                rps, p50, p95, bad = _load(server.url, key, each)
                promote_s = _promote_s(server.url, next(versions))
                rows.append([setting, f"{ready_s:.0f}", f"{rps:.1f}", f"{p50:.0f}", f"{p95:.0f}", bad,
                             f"{promote_s:.1f}"])
                print(rows[-1], flush=True)
                if setting == "2 replicas" and not failover:
                    assert isinstance(server.engine, ReplicatedEngine)
                    answered, failed, back_s = _failover(server.url, key, server.engine)
                    failover = ["2 replicas, one SIGKILLed", answered, failed, f"{back_s:.0f}"]
                    print(failover, flush=True)
    store.close()
    return rows, failover


def _serve_shutdown(address: str) -> None:
    """Delete every Serve application on the cluster and wait until none is left."""
    httpx.delete(f"{address}/api/serve/applications/", timeout=60).raise_for_status()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        apps = httpx.get(f"{address}/api/serve/applications/", timeout=30).json().get("applications") or {}
        if not apps:
            return
        time.sleep(1)
    raise RuntimeError("Serve's applications were not deleted within 300 s")


def ray_http_port(ray: ThrowawayRay) -> int:
    """Serve's proxy port on this cluster (fixed at its first deployment: later ones must name the same)."""
    if ray.serve_port is None:
        ray.serve_port = free_port()
    return ray.serve_port


# 3. capture into Postgres from 1 and 2 gateways ------------------------------------------------------------------

CAPTURE_CLIENTS = 16


def _capture(root: Path, seconds: float) -> list[list[object]]:
    from bench.postgres import throwaway_postgres

    rows: list[list[object]] = []
    with throwaway_postgres() as postgres:
        config, store, key = prepared(root, database_url=postgres.url)
        base = (root / "tuneloop.yaml").read_text()
        for gateways in (1, 2, 2, 1):
            processes, urls = [], []
            for n in range(gateways):
                port = free_port()
                path = root / f"stub-{gateways}-{n}.yaml"
                path.write_text(base.replace(f"gateway_port: {config.serving.gateway_port}", f"gateway_port: {port}"))
                log = open(root / f"stub-{gateways}-{n}.log", "wb")  # noqa: SIM115 - closed with the process
                processes.append((subprocess.Popen([sys.executable, "-m", "bench.stub_gateway", str(path)],
                                                   stdout=log, stderr=subprocess.STDOUT), log))
                urls.append(f"http://127.0.0.1:{port}")
            try:
                for url in urls:
                    if not wait_ready(url, 120):
                        raise RuntimeError(f"stub gateway at {url} did not start; see {root}")
                before = _traffic_rows(store)
                result = asyncio.run(_capture_load(urls, key, seconds))
                time.sleep(3)  # the capture writers flush every 0.5 s
                stored = _traffic_rows(store) - before
                latencies = result["latencies"]
                rows.append([gateways, CAPTURE_CLIENTS * gateways, result["answered"], stored,
                             f"{stored / seconds:.0f}", f"{percentile(latencies, 0.5) * 1000:.1f}",
                             f"{percentile(latencies, 0.99) * 1000:.1f}"])
                print(rows[-1], flush=True)
            finally:
                for process, log in processes:
                    process.send_signal(signal.SIGTERM)
                    process.wait(60)
                    log.close()
        store.close()
    return rows


async def _capture_load(urls: list[str], key: str, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    answered = 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, url: str, number: int) -> None:
        nonlocal answered
        i = 0
        while time.monotonic() < deadline:
            i += 1
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                       json={"model": "sentiment", "max_tokens": 4, "messages": [
                                           {"role": "user", "content": f"@united bag {number}-{i}"}]})
            if response.status_code == 200:
                answered += 1
                latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=512)) as http:
        await asyncio.gather(*(client(http, url, n) for url in urls for n in range(CAPTURE_CLIENTS)))
    return {"latencies": latencies, "answered": answered}


def run(*, quick: bool = False) -> list[Table]:
    with tempfile.TemporaryDirectory() as tmp:
        job_rows = _jobs(Path(tmp) / "jobs")
        replica_rows, failover = _replicas(Path(tmp) / "replicas", 4 if quick else 16)
        capture_rows = _capture(Path(tmp) / "capture", 10.0 if quick else 30.0)
    return [emit("Retraining jobs: the Ray runner vs the local runner (runs in the order local, Ray, Ray, local)",
                 ["runner", "jobs", "submission to first stage s", "submission to decision s", "jobs per hour"],
                 _summary(job_rows),
                 notes=f"One colours job at a time ({JOB_STEPS} training steps, the gate on 40 examples per set "
                       "through one real gateway, promotion), each from the same poisoned champion. The Ray job runs "
                       "on a worker node started on the same machine (1 CPU, the resource the jobs ask for). Per "
                       "run: " + "; ".join(
                           f"{r[0]} {r[2]} s / {r[3]} s ({r[1]})" for r in job_rows) + ".",
                 key="scale-jobs"),
            emit(f"Engine replicas on Ray Serve vs the single supervised vLLM ({LOAD_CLIENTS} clients through the "
                 "gateway, in the order shown)",
                 ["engine", "ready s", "requests/s", "p50 ms", "p95 ms", "non-200", "promotion s"], replica_rows,
                 notes="Each row starts the gateway with that engine, sends a warm-up, then the load, then promotes "
                       "a sentiment version no engine has loaded yet (the call returns once every replica serves it). "
                       "On 2 cores a "
                       "second replica competes with the first for the same cores: these rows show the proxy hop's "
                       "and the roll-out's cost, not what a second machine would add.",
                 key="scale-replicas"),
            emit("One of two replicas SIGKILLed under load",
                 ["setting", "answered", "failed (in flight on the dead replica)", "s until both replicas run"],
                 [failover] if failover else [],
                 notes=f"{LOAD_CLIENTS} clients; Serve replaces the replica (a new vLLM, configured with the "
                       "current adapter set before it takes requests).", key="scale-failover"),
            emit(f"Capture into one Postgres from 1 and 2 gateways ({CAPTURE_CLIENTS} clients per gateway, an "
                 "engine that answers at once)",
                 ["gateways", "clients", "answered", "rows stored", "rows/s", "p50 ms", "p99 ms"], capture_rows,
                 notes="The gateways are separate processes over one throwaway Postgres 15 on the same 2 cores "
                       "(bench/stub_gateway.py); the latency is the whole request as the client sees it, which with "
                       "an instant engine is what the gateway and its capture add. Order: 1, 2, 2, 1.",
                 key="scale-capture")]
