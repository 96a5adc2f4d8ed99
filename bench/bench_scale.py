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

import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_reliability import prepared
from bench.colours import COLOURS_TASK, TASK, add_colours_sets
from bench.ray_cluster import throwaway_ray
from bench.tables import Table, emit
from tuneloop.conductor.loop import Loop
from tuneloop.config import Config
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import Job, ManualTrigger
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
    with running(config, store), throwaway_ray() as ray:
        ray.add_node("trainer", cpus=1, resources={"tuneloop_trainer": 1.0})
        ray_config: Config = config.model_copy(deep=True)
        ray_config.jobs.runner, ray_config.jobs.ray_address = "ray", ray.address
        ray_config.jobs.retrain.resources = {"tuneloop_trainer": 1.0}
        loops = {"local": assemble_loop(config, store, runner=LocalRunner(config, worker_module=WORKER_MODULE)),
                 "ray": assemble_loop(ray_config, store, runner=RayRunner(ray_config, worker_module=WORKER_MODULE))}
        for n, runner in enumerate(("local", "ray", "ray", "local")):
            job = _run_job(loops[runner], store, f"bench-scale-{n}")
            rows.append(_job_row(runner, job))
            print(rows[-1], flush=True)
    store.close()
    return rows


def _summary(rows: list[list[object]]) -> list[list[object]]:
    out = []
    for runner in ("local", "ray"):
        mine = [r for r in rows if r[0] == runner]
        running_s = statistics.mean(float(str(r[2])) for r in mine)
        total_s = statistics.mean(float(str(r[3])) for r in mine)
        out.append([runner, len(mine), f"{running_s:.1f}", f"{total_s:.0f}", f"{3600 / total_s:.1f}"])
    local, ray = out
    out.append(["ray / local", "", *(f"{float(str(ray[i])) / float(str(local[i])):.2f}x" for i in (2, 3, 4))])
    return out


def run(*, quick: bool = False) -> list[Table]:
    with tempfile.TemporaryDirectory() as tmp:
        job_rows = _jobs(Path(tmp) / "jobs")
    return [emit("Retraining jobs: the Ray runner vs the local runner (runs in the order local, Ray, Ray, local)",
                 ["runner", "jobs", "submission to first stage s", "submission to decision s", "jobs per hour"],
                 _summary(job_rows),
                 notes=f"One colours job at a time ({JOB_STEPS} training steps, the gate on 40 examples per set "
                       "through one real gateway). The Ray job runs on a worker node started on the same machine "
                       "(1 CPU, the resource the jobs ask for). Per run: " + "; ".join(
                           f"{r[0]} {r[2]} s / {r[3]} s ({r[1]})" for r in job_rows) + ".",
                 key="scale-jobs")]
