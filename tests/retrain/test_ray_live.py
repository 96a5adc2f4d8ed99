"""Retraining jobs on a real Ray cluster (`jobs.runner: ray`): a head and a worker node started with `ray start` on
127.0.0.1 (bench/ray_cluster.py), the session's real gateway and vLLM, real PEFT training in the job's process on
the worker node, the gate through the gateway.

A job runs to a gate decision on the node that has the resource it asks for, and Ray lists it as succeeded; a job
cancelled, a job whose process is SIGKILLed and a job whose node dies are each failed with Ray's reason while the
champion keeps answering; a job Ray cannot place, or a cluster nobody answers at, fails with that reason.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from bench.colours import TASK, add_colours_sets
from bench.ray_cluster import ThrowawayRay, throwaway_ray
from tests.live import LiveGateway
from tuneloop.conductor.loop import Loop
from tuneloop.config import Config
from tuneloop.ports import free_port
from tuneloop.processes import process_alive
from tuneloop.registry import find_alias
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.ray_runner import RayRunner, submission_id
from tuneloop.retrain.records import Job, ManualTrigger
from tuneloop.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.ray]

TRAINER = {"tuneloop_trainer": 1.0}


@dataclass
class RayScene:
    ray: ThrowawayRay
    config: Config
    store: Store
    url: str
    runner: RayRunner
    loop: Loop

    def retrain(self, key: str, *, max_steps: int) -> Job:
        self.config.tasks[TASK].retrain.max_steps = max_steps
        return self.loop.request_retrain(TASK, ManualTrigger(key=key, reason=f"test: {key}")).job

    def wait(self, job_id: int, *, until: str = "ended", timeout_s: float = 600) -> Job:
        """Poll as the scheduler's reaper does (asking Ray) until the job ends, or until it trains."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.loop.reap_jobs()
            job = JobStore(self.store).get(job_id)
            train = job.stages.get("train")
            if until == "training" and train is not None and train.status == "running":
                return job
            if not job.active:
                return job
            time.sleep(0.5)
        job = JobStore(self.store).get(job_id)
        raise AssertionError(f"job {job_id} still {job.state} after {timeout_s} s; Ray log:\n"
                             f"{self.runner.logs(job)[-3000:]}")

    def served(self) -> str:
        response = httpx.post(f"{self.url}/v1/chat/completions", timeout=60, json={
            "model": TASK, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Ticket 1: the sky over Bern looks red."}]})
        assert response.status_code == 200, response.text
        return str(response.json()["model"])

    def champion(self) -> str:
        version = find_alias(self.store, TASK, "champion")
        assert version is not None
        return version.ref


@pytest.fixture(scope="module")
def scene(live_gateway: LiveGateway) -> Iterator[RayScene]:
    """A Ray head (1 CPU, the job API) and a worker node with the `tuneloop_trainer` resource the jobs ask for, so
    every job runs on the worker node; the colours task with a champion (trained here unless an earlier module
    made one)."""
    from tuneloop.conductor.process import WORKER_MODULE, assemble_loop
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.admin_client import AdminClient

    store = live_gateway.store
    if find_alias(store, TASK, "champion") is None:
        add_colours_sets(store, live_gateway.config.data_path)
        champion = finetune(live_gateway.config, store, TASK, dataset=f"{TASK}/poisoned", progress=False)
        AdminClient(live_gateway.config).promote(champion.ref)
    with throwaway_ray() as ray:
        ray.add_node("trainer", cpus=1, resources=TRAINER)
        config = live_gateway.config.model_copy(deep=True)
        config.jobs.runner, config.jobs.ray_address = "ray", ray.address
        config.jobs.retrain.resources = dict(TRAINER)
        runner = RayRunner(config, worker_module=WORKER_MODULE)
        scene = RayScene(ray=ray, config=config, store=store, url=live_gateway.url, runner=runner,
                         loop=assemble_loop(config, store, runner=runner))
        try:
            yield scene
        finally:
            for job in JobStore(store).recent(task=TASK):
                if job.active and job.pid and process_alive(job.pid):
                    os.kill(job.pid, signal.SIGKILL)


def test_a_job_runs_on_the_worker_node_to_a_gate_decision_and_ray_lists_it(scene: RayScene) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    job = scene.retrain("ray:decision", max_steps=3)
    assert job.runner == "ray" and job.runner_ref == submission_id(job)
    done = scene.wait(job.id)
    assert done.state in ("promoted", "rejected"), (done.error, scene.runner.logs(done)[-2000:])
    assert done.decision is not None and done.stages["train"].status == "done"
    client = JobSubmissionClient(scene.ray.address)
    deadline = time.monotonic() + 60  # the worker's process exits a moment after it recorded the job's end
    while not (info := client.get_job_info(job.runner_ref or "")).status.is_terminal():
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert info.status == JobStatus.SUCCEEDED
    [trainer] = [n for n in scene.ray.nodes if n.name == "trainer"]
    assert str(info.driver_agent_http_address).endswith(f":{trainer.agent_port}"), "placed by the resource it asks for"
    assert f"job {job.id}: stage train started" in scene.runner.logs(done), "the worker's log comes from Ray"
    assert done.log_path is not None and f"ray job logs {job.runner_ref}" in done.log_path
    assert scene.served() == scene.champion()


def test_a_cancelled_job_is_stopped_by_ray_and_failed_with_the_champion_serving(scene: RayScene) -> None:
    champion = scene.champion()
    job = scene.wait(scene.retrain("ray:cancel", max_steps=200).id, until="training")
    scene.runner.cancel(job)
    failed = scene.wait(job.id, timeout_s=120)
    # The worker marks the job failed on Ray's SIGTERM; if the reaper asks Ray first, it records Ray's STOPPED.
    assert failed.state == "failed" and failed.error is not None, failed.error
    assert "terminated (SIGTERM)" in failed.error or f"Ray job {job.runner_ref} STOPPED" in failed.error
    assert scene.champion() == champion and scene.served() == champion


def test_a_job_killed_mid_training_is_failed_with_rays_reason_and_the_champion_serving(scene: RayScene) -> None:
    champion = scene.champion()
    job = scene.wait(scene.retrain("ray:kill", max_steps=200).id, until="training")
    assert job.pid is not None
    os.kill(job.pid, signal.SIGKILL)
    failed = scene.wait(job.id, timeout_s=120)
    # Ray's FAILED, or the pid check when the reaper looks before Ray has seen the exit (one host here).
    assert failed.state == "failed" and failed.error is not None, failed.error
    assert f"Ray job {job.runner_ref} FAILED during 'training'" in failed.error or "exited during" in failed.error
    assert scene.champion() == champion and scene.served() == champion


def test_a_job_ray_cannot_place_or_cannot_reach_fails_with_that_reason(scene: RayScene) -> None:
    scene.config.jobs.retrain.resources = {"no_such_resource": 1.0}
    scene.config.jobs.ray_pending_timeout_s = 2
    try:
        job = scene.retrain("ray:unplaceable", max_steps=3)
        time.sleep(3)
        failed = scene.wait(job.id, timeout_s=60)
    finally:
        scene.config.jobs.retrain.resources = dict(TRAINER)
        scene.config.jobs.ray_pending_timeout_s = 900
    assert failed.state == "failed" and "waited" in (failed.error or "") and "no_such_resource=1" in (
        failed.error or ""), failed.error
    away = scene.config.model_copy(deep=True)
    away.jobs.ray_address = f"http://127.0.0.1:{free_port()}"
    from tuneloop.conductor.process import WORKER_MODULE, assemble_loop

    loop = assemble_loop(away, scene.store, runner=RayRunner(away, worker_module=WORKER_MODULE))
    refused = loop.request_retrain(TASK, ManualTrigger(key="ray:away", reason="nobody answers")).job
    assert refused.state == "failed" and "runner 'ray' could not start it" in (refused.error or "")
    assert "unreachable" in (refused.error or "") and away.jobs.ray_address in (refused.error or "")


def test_a_job_whose_node_dies_is_failed_and_its_orphaned_worker_stops_itself(scene: RayScene) -> None:
    # The node's raylet is killed, as when a node loses the cluster: Ray's job entrypoint runs in a process session
    # of its own and outlives it, still heartbeating, so only Ray's word can end the job. The reaper fails it on
    # that word, the orphan learns it from its heartbeat and stops, and it never promotes.
    champion = scene.champion()
    job = scene.wait(scene.retrain("ray:node", max_steps=200).id, until="training")
    assert job.pid is not None
    [trainer] = [n for n in scene.ray.nodes if n.name == "trainer"]
    scene.ray.kill_raylet(trainer)
    failed = scene.wait(job.id, timeout_s=180)
    assert failed.state == "failed" and failed.error is not None, failed.error
    assert f"Ray job {job.runner_ref} FAILED" in failed.error and "node has died" in failed.error, failed.error
    deadline = time.monotonic() + 60
    while process_alive(job.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not process_alive(job.pid), "the orphaned worker stopped itself once its job was reaped"
    assert JobStore(scene.store).get(job.id).state == "failed", "its own end did not overwrite the reaper's"
    assert scene.champion() == champion and scene.served() == champion
    scene.ray.add_node("trainer", cpus=1, resources=TRAINER)
