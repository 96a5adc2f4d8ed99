"""Recovery: faults in the loop's control plane and on disk, each under load, and the state each leaves behind.

`tuneloop run` (gateway, scheduler, job reaper) or `tuneloop serve` runs as its own process with a real vLLM and
SQLite; 8 clients send sentiment requests through it with an inference key while a retraining job of the synthetic
`colours` task (bench/colours.py: the champion is trained on poisoned labels, so a retrained candidate is certainly
better) is killed, the scheduler is restarted, the gateway dies between the steps of a promotion, or an adapter's
file is corrupted. Crashes that must land between two writes are placed with failpoints
(tuneloop/failpoints.py), the way a signal from outside cannot be.

1. the retrain worker SIGKILLed mid-training: the reaper fails the job; nothing registered; the champion serves.
2. `tuneloop run` restarted (SIGTERM, started again) while a job trains: the detached worker carries on and the
   job reaches its decision.
3. the retrain worker SIGKILLed after promoting (failpoint `worker.after_promote`): the reaper ends the job
   promoted, with its watch started at the promotion.
4. the gateway SIGKILLed after loading a new champion into the engine, before the alias flip
   (`promotion.after_load`), and 5. after the flip, before routing to it (`promotion.after_alias`): restarted, it
   serves what the registry says, and a rollback after 5 finds the event the flip wrote.
6. a version whose adapter file was corrupted is promoted: refused, naming the checksum; nothing changes.
7. the champion's adapter file corrupted and the gateway restarted: its task answers 503 naming the cause (other
   tasks are served), and a rollback serves the previous champion.
8. Postgres stopped for 20 s while the spill directory is a 16 KiB filesystem (root only: it is mounted):
   what does not fit is counted as dropped, what was spilled is replayed.

Each row: requests sent, answered (200), refused explicitly (503/4xx), failed (no HTTP answer while the gateway
was down, or another 5xx); of the answered, how many are stored once, missing or stored twice (by X-Request-Id).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.bench_faults import (
    Load,
    ServeProcess,
    _capture_counts,
    _row,
    _serve,
    _served_by,
    _stored,
)
from bench.bench_reliability import prepared
from bench.colours import COLOURS_TASK, TASK, add_colours_sets
from bench.tables import Table, emit
from tuneloop.config import Config
from tuneloop.failpoints import FAILPOINTS_ENV
from tuneloop.registry import find_alias, list_adapters
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import Job
from tuneloop.serving.engine import process_group_members
from tuneloop.store import Store

ADMIN = {"Authorization": "Bearer bench"}
CLIENTS = 8
STEPS = 10  # a candidate trained 10 steps from the poisoned champion is certainly better on the right labels
JOBS = "  heartbeat_s: 1\n  stale_after_s: 20\n"


class Scene:
    """One store and one gateway process (restarted as the faults need), with the calls the faults make."""

    def __init__(self, root: Path, config: Config, store: Store, key: str, serve: ServeProcess) -> None:
        self.root, self.config, self.store, self.key, self.serve = root, config, store, key, serve
        self.alerts = 0

    @property
    def url(self) -> str:
        return self.serve.url

    def champion(self) -> int | None:
        version = find_alias(self.store, TASK, "champion")
        return version.version if version else None

    def served(self) -> str | None:
        return _served_by(self.url, self.key, TASK)

    def alert(self) -> int:
        """Alertmanager's webhook names the task: a retraining job is queued (each alert a new fingerprint)."""
        self.alerts += 1
        body = {"version": "4", "status": "firing", "receiver": "tuneloop", "groupKey": "g", "alerts": [
            {"status": "firing", "labels": {"alertname": "TuneloopQualityBreach", "task": TASK}, "annotations": {},
             "startsAt": f"2026-12-07T10:{self.alerts:02d}:00Z", "fingerprint": f"recovery-{self.alerts}"}]}
        answer = httpx.post(f"{self.url}/v1/hooks/alertmanager", json=body, headers=ADMIN, timeout=60)
        answer.raise_for_status()
        return int(answer.json()["triggers"][0]["job"])

    def job(self, job_id: int) -> Job:
        return JobStore(self.store).get(job_id)

    def wait_training(self, job_id: int, timeout_s: float = 600) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            train = job.stages.get("train")
            if train is not None and train.status == "running":
                return job
            if not job.active:
                raise RuntimeError(f"job {job_id} ended {job.state} before training: {job.error}")
            time.sleep(0.5)
        raise RuntimeError(f"job {job_id} did not start training in {timeout_s:.0f} s")

    def wait_ended(self, job_id: int, timeout_s: float = 1200) -> Job:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if not job.active:
                return job
            time.sleep(1)
        raise RuntimeError(f"job {job_id} still {self.job(job_id).state} after {timeout_s:.0f} s")

    def admin(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=ADMIN, timeout=300)

    def wait_dead(self, engine: int) -> int:
        """After the gateway process died by itself: wait for it, then for its engine's process group (the engine
        gets SIGTERM from the kernel when its parent dies) to be empty; returns the engine processes left after
        60 s."""
        assert self.serve.process is not None
        self.serve.process.wait(60)
        deadline = time.monotonic() + 60
        while process_group_members(engine) and time.monotonic() < deadline:
            time.sleep(0.5)
        return len(process_group_members(engine))

    def registered(self) -> int:
        return len(list_adapters(self.store, TASK))


def _job_faults(scene: Scene) -> list[list[object]]:
    rows: list[list[object]] = []
    scene.serve.start()
    # 1. the worker SIGKILLed mid-training
    with Load(scene.url, scene.key, CLIENTS) as load:
        versions = scene.registered()
        job = scene.wait_training(scene.alert())
        time.sleep(3)
        assert job.pid is not None
        os.kill(job.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        ended = scene.wait_ended(job.id, 300)
        reaped_s = time.monotonic() - killed_at
        served = scene.served()
    staging = list((scene.config.data_path / "adapters" / TASK).glob(".training-job*"))
    rows.append(_row("SQLite", "retrain worker SIGKILLed mid-training", load.record, _stored(scene.store, load.record),
                     f"job {ended.state} by the reaper {reaped_s:.0f} s later ({(ended.error or '')[:120]}); "
                     f"{scene.registered() - versions} versions registered, {len(staging)} staging folders left; "
                     f"{TASK} answered by {served}"))
    # 2. `tuneloop run` restarted while a job trains
    with Load(scene.url, scene.key, CLIENTS) as load:
        job = scene.wait_training(scene.alert())
        scene.serve.stop()
        restart_s = scene.serve.start(env={FAILPOINTS_ENV: "worker.after_promote=kill"})  # for fault 3's worker
        ended = scene.wait_ended(job.id)
        served = scene.served()
    decision = ended.decision.reasons[0] if ended.decision and ended.decision.reasons else ended.error or ""
    rows.append(_row("SQLite", "`tuneloop run` restarted while a job trained", load.record,
                     _stored(scene.store, load.record),
                     f"back in {restart_s:.0f} s; the job went on and ended {ended.state} ({decision[:60]}); "
                     f"champion {TASK}@{scene.champion()}, answered by {served}"))
    # 3. the worker SIGKILLed after promoting: a poisoned champion again, so the candidate is promoted
    scene.admin("/admin/promote", {"version": f"{TASK}@1"}).raise_for_status()
    with Load(scene.url, scene.key, CLIENTS) as load:
        job_id = scene.alert()
        ended = scene.wait_ended(job_id)
        time.sleep(scene.config.serving.alias_poll_s + 1)
        served = scene.served()
    watch = ended.watch
    rows.append(_row("SQLite", "retrain worker SIGKILLed after promoting (failpoint)", load.record,
                     _stored(scene.store, load.record),
                     f"job {ended.state}, watch {watch.status if watch else 'none'} "
                     f"({(watch.reason or '') if watch else ''}); champion {TASK}@{scene.champion()}, answered by "
                     f"{served}"))
    scene.serve.stop()
    return rows


def _promotion_faults(scene: Scene) -> list[list[object]]:
    rows: list[list[object]] = []
    scene.serve.command = "serve"
    before = scene.champion()
    target = 1 if before != 1 else 2
    scene.serve.start(env={FAILPOINTS_ENV: "promotion.after_load=kill"})
    for point in ("promotion.after_load", "promotion.after_alias"):
        with Load(scene.url, scene.key, CLIENTS) as load:
            time.sleep(5)
            engine = scene.serve.vllm_pid()
            try:
                scene.admin("/admin/promote", {"version": f"{TASK}@{target}"})
                outcome = "the promote call was answered"
            except httpx.HTTPError as exc:
                outcome = f"the promote call got no answer ({exc.__class__.__name__})"
            left = scene.wait_dead(engine)
            following = "promotion.after_alias" if point == "promotion.after_load" else None
            restart_s = scene.serve.start(env={FAILPOINTS_ENV: f"{following}=kill"} if following else None)
            time.sleep(5)
        champion, served = scene.champion(), scene.served()
        after = (f"{outcome}; {left} engine processes left; restarted in {restart_s:.0f} s: champion "
                 f"{TASK}@{champion} (was {TASK}@{before}), answered by {served}")
        if point == "promotion.after_alias":
            rolled = scene.admin("/admin/rollback", {"task": TASK})
            after += (f"; rollback: {rolled.status_code}, champion {TASK}@{scene.champion()}, answered by "
                      f"{scene.served()}")
        rows.append(_row("SQLite", f"gateway SIGKILLed at {point} (failpoint)", load.record,
                         _stored(scene.store, load.record), after))
    return rows


def _corrupt(scene: Scene, version: int) -> None:
    path = next(v.path for v in list_adapters(scene.store, TASK) if v.version == version)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, same header, wrong weights
    weights.write_bytes(bytes(data))


def _adapter_faults(scene: Scene) -> list[list[object]]:
    rows: list[list[object]] = []
    champion = scene.champion()
    spare = next(v.version for v in list_adapters(scene.store, TASK) if v.version not in (champion, 1))
    _corrupt(scene, spare)
    with Load(scene.url, scene.key, CLIENTS) as load:
        time.sleep(5)
        refused = scene.admin("/admin/promote", {"version": f"{TASK}@{spare}"})
        time.sleep(5)
    message = refused.json().get("error", {}).get("message", "") if refused.status_code != 200 else ""
    message = message.replace(str(scene.config.data_path), "<data_dir>")
    rows.append(_row("SQLite", f"promote {TASK}@{spare}, its adapter file corrupted", load.record,
                     _stored(scene.store, load.record),
                     f"refused {refused.status_code}: '{message[:160]}'; champion {TASK}@{scene.champion()}, "
                     f"answered by {scene.served()}"))
    _corrupt(scene, champion or 1)
    with Load(scene.url, scene.key, CLIENTS) as load:
        scene.serve.stop()
        restart_s = scene.serve.start()
        probe = httpx.post(f"{scene.url}/v1/chat/completions", headers={"Authorization": f"Bearer {scene.key}"},
                           json={"model": TASK, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
                           timeout=30)
        rolled = scene.admin("/admin/rollback", {"task": TASK})
        time.sleep(5)
    rows.append(_row("SQLite", f"the champion's adapter file corrupted ({TASK}@{champion}), gateway restarted",
                     load.record, _stored(scene.store, load.record),
                     f"restarted in {restart_s:.0f} s; {TASK} answered {probe.status_code} "
                     f"{probe.json().get('error', {}).get('type', '')}, sentiment served; rollback "
                     f"{rolled.status_code}: champion {TASK}@{scene.champion()}, answered by {scene.served()}"))
    scene.serve.stop()
    return rows


def _full_spill_disk(root: Path, down_s: float) -> list[list[object]]:
    from bench.postgres import throwaway_postgres

    if os.geteuid() != 0:
        return [["Postgres 15", "database stopped, spill disk full", "-", "-", "-", "-", "-", "-", "-",
                 "not run: mounting the small spill filesystem needs root"]]
    with throwaway_postgres() as postgres:
        config, store, key = prepared(root, database_url=postgres.url)
        spill = config.data_path / "spill"
        spill.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(spill)], check=True)
        serve = _serve(root, config)
        try:
            serve.start()
            before = _capture_counts(serve.url)
            with Load(serve.url, key, CLIENTS) as load:
                time.sleep(5)
                postgres.stop()
                time.sleep(down_s)
                postgres.start()
                time.sleep(10)
            stored = _stored(store, load.record, wait_s=60)
            moved = _capture_counts(serve.url) - before
            return [_row("Postgres 15", f"database stopped for {down_s:.0f} s, spill disk a 16 KiB tmpfs",
                         load.record, stored,
                         f"capture: {moved['spilled_database_error']} spilled, {moved['dropped']} counted dropped "
                         f"(disk full), {moved['replayed']} replayed")]
        finally:
            serve.stop()
            store.close()
            subprocess.run(["umount", str(spill)], check=False)


def _colours_scene(root: Path) -> Scene:
    from tuneloop.retrain.finetune import finetune

    task = COLOURS_TASK.replace("retrain: {", f"retrain: {{max_steps: {STEPS}, ")
    assert task != COLOURS_TASK
    config, store, key = prepared(root, extra_tasks=task, jobs=JOBS)
    add_colours_sets(store, config.data_path)
    finetune(config, store, TASK, dataset=f"{TASK}/poisoned", progress=False)  # colours@1, the poisoned champion
    serve = ServeProcess(root / "tuneloop.yaml", f"http://127.0.0.1:{config.serving.gateway_port}",
                         root / "serve.log", command="run")
    return Scene(root, config, store, key, serve)


def _printed(rows: list[list[object]]) -> list[list[object]]:
    for row in rows:
        print(" | ".join(str(cell) for cell in row), flush=True)
    return rows


def run(*, quick: bool = False) -> list[Table]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    scene = _colours_scene(tmp / "sqlite")
    try:
        rows = _printed(_job_faults(scene))
        rows += _printed(_promotion_faults(scene))
        rows += _printed(_adapter_faults(scene))
    except BaseException:
        print(f"recovery bench failed; its workspace (logs, database) is kept in {tmp}", flush=True)
        raise
    finally:
        scene.serve.stop()
        scene.store.close()
    rows += _printed(_full_spill_disk(tmp / "postgres", 10.0 if quick else 20.0))
    shutil.rmtree(tmp, ignore_errors=True)
    return [emit(f"Recovery: faults in jobs, promotion, adapters and the spill disk, under load ({CLIENTS} clients)",
                 ["store", "fault", "sent", "answered", "refused (4xx/503)", "failed", "stored exactly once",
                  "answered, not stored", "stored twice", "state afterwards"], rows,
                 notes="Load is sentiment traffic through the gateway the whole time; the faults hit the colours "
                       "task's retraining job, its promotion and its adapter files. 'failed' counts requests sent "
                       "while the gateway process was down or restarting (no HTTP answer): a client retries them; "
                       "'answered, not stored' is what a killed gateway had answered but not yet written (bounded "
                       "by serving.capture_queue_size) or what a full spill disk could not keep (counted as "
                       "dropped).", key="reliability-recovery")]
