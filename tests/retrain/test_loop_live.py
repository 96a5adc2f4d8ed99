"""The closed loop with every real part: vLLM serving LoRA adapters behind the gateway, real PEFT training in the
detached worker process, real paired statistics, hot-swap through the admin API. (Drift with real Evidently
opening the incident that starts a job is exercised by tests/tuneloop/test_demo_live.py on the embedded data.)

A synthetic task makes right and wrong unmistakable in a few training steps: a sentence names a colour, and the
label is a fixed function of the colour. The champion is trained on the *wrong* mapping (poisoned labels); the
held-out and challenger sets carry the right one. 20 steps at lr 6e-3 learn a mapping perfectly (measured:
accuracy 1.0 on 60 unseen sentences), so a retrained candidate is far better, and one retrained on poisoned
feedback is far worse, on 40 examples.

The tests are the phases of one scenario and run in file order, on the session's gateway (tests/conftest.py), where
the task is configured as `colours` beside the serving tests' sentiment and chat.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.colours import TASK, WRONG, add_colours_sets, colours
from tests.live import ADMIN_TOKEN, LiveGateway
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.conductor.loop import Loop
from tuneloop.config import Config
from tuneloop.events import list_events
from tuneloop.processes import process_alive
from tuneloop.registry import find_alias, list_adapters
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import AlertTrigger, IncidentTrigger, Job, ManualTrigger, WatchState
from tuneloop.serving.engine import EngineSupervisor
from tuneloop.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

@dataclass
class Scenario:
    url: str
    config: Config
    store: Store
    engine: EngineSupervisor
    loop: Loop

    def ask(self, text: str, model: str = "colours") -> dict[str, Any]:
        response = httpx.post(f"{self.url}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def wait(self, job_id: int, timeout: float = 600) -> Job:
        jobs = JobStore(self.store)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs.reap(stale_after_s=self.config.jobs.stale_after_s, data_dir=self.config.data_path)
            current = jobs.get(job_id)
            if not current.active:
                return current
            time.sleep(1)
        job = jobs.get(job_id)
        log = Path(job.log_path).read_text()[-3000:] if job.log_path else ""
        raise AssertionError(f"job {job_id} still {job.state} after {timeout} s; log:\n{log}")


@pytest.fixture(scope="module")
def loop(live_gateway: LiveGateway) -> Iterator[Scenario]:
    """The session's gateway (assembled by the conductor as `tuneloop serve` is) and the `colours` task configured
    with it: a champion trained on the poisoned mapping, hot-swapped in; retraining jobs run in real worker
    processes, which get the config, admin token included, as a snapshot. The webhook's runner hands its jobs to the
    same local runner while this module runs."""
    from tuneloop.conductor.process import WORKER_MODULE, assemble_loop
    from tuneloop.retrain.finetune import finetune
    from tuneloop.retrain.runner import LocalRunner
    from tuneloop.serving.admin_client import AdminClient

    config, store = live_gateway.config, live_gateway.store
    data = config.data_path
    add_colours_sets(store, data)
    champion = finetune(config, store, TASK, dataset=f"{TASK}/poisoned", progress=False)
    assert champion.aliases == ["champion"] and champion.version == 1
    AdminClient(config).promote(champion.ref)  # loads it into the running engine and routes the task to it
    runner = LocalRunner(config, worker_module=WORKER_MODULE)
    live_gateway.runner.delegate = runner
    try:
        yield Scenario(url=live_gateway.url, config=config, store=store, engine=live_gateway.engine,
                       loop=assemble_loop(config, store, runner=runner))
    finally:
        live_gateway.runner.delegate = None
        for job in JobStore(store).recent(task=TASK):
            if job.pid and process_alive(job.pid):
                os.kill(job.pid, signal.SIGKILL)


def test_a_quality_breach_starts_exactly_one_job_and_a_second_trigger_joins_it(loop: Scenario) -> None:
    # the scheduled eval, as the scheduler runs it: the poisoned champion fails the floor on colours-new, the
    # policy opens an incident, the incident starts a job (the real worker process)
    outcome = loop.loop.run_scheduled("eval", TASK)
    assert outcome.status == "ok", outcome.error
    jobs = JobStore(loop.store).recent(task=TASK)
    assert len(jobs) == 1
    incident = jobs[0].triggers[0].trigger
    assert isinstance(incident, IncidentTrigger) and incident.rule == "floor:macro_f1:colours-new"
    assert incident.datasets == ["colours-new"], "the rule names the set the job learns from"
    alert = {"version": "4", "status": "firing", "receiver": "tuneloop", "groupKey": "g", "alerts": [
        {"status": "firing", "labels": {"alertname": "TuneloopQualityBreach", "task": TASK},
         "annotations": {}, "startsAt": "2026-11-27T09:00:00Z", "fingerprint": "first"}]}
    joined = httpx.post(f"{loop.url}/v1/hooks/alertmanager", json=alert, timeout=30,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert joined["triggers"][0]["outcome"] == "attached" and joined["triggers"][0]["job"] == jobs[0].id
    assert len(JobStore(loop.store).recent(task=TASK)) == 1, "the alert joined the running job, queued no other"
    received = [t.trigger for t in JobStore(loop.store).get(jobs[0].id).triggers]
    assert isinstance(received[0], IncidentTrigger) and isinstance(received[1], AlertTrigger)


def test_the_better_candidate_is_promoted_and_served_without_a_restart(loop: Scenario) -> None:
    [job] = JobStore(loop.store).recent(task=TASK)
    engine = loop.engine.process
    assert engine is not None
    engine_pid = engine.pid
    done = loop.wait(job.id)
    assert done.decision is not None, done.error
    assert done.state == "promoted", (done.error, done.decision.reasons)
    assert set(done.stages) == {"assemble", "train", "evaluate", "promote"}
    assert all(s.status == "done" for s in done.stages.values())
    held, new = done.decision.checks
    assert held.comparison is not None and new.comparison is not None
    assert held.role == "heldout" and held.passed and held.comparison.ci_low > -0.3
    assert new.dataset.startswith("colours/colours-new-gate@") and new.comparison.delta > 0.5
    assert new.comparison.p_value < 0.05
    champion = find_alias(loop.store, TASK, "champion")
    assert champion is not None and champion.version == done.candidate_version == 2
    reply = loop.ask("Ticket 9999: the sky over Oslo looks blue.")
    assert reply["model"] == "colours@2" and reply["choices"][0]["message"]["content"] == "positive"
    assert loop.engine.process is not None and loop.engine.process.pid == engine_pid, "hot-swapped: no restart"
    assert done.watch is not None and done.watch.status == "watching" and done.watch.previous_version == 1
    assert done.watch.through_gateway, "the worker promoted through the gateway's admin API"
    recipe = done.dataset_ref
    assert recipe is not None and recipe.startswith("colours/retrain-job")
    metrics = httpx.get(f"{loop.url}/metrics", timeout=10).text
    assert 'tuneloop_retrain_jobs{state="promoted",task="colours"} 1.0' in metrics
    assert 'tuneloop_gate_promoted{task="colours"} 1.0' in metrics
    assert 'tuneloop_retrain_stage_seconds{stage="train",task="colours"}' in metrics
    assert 'tuneloop_gate_delta{bound="lower",dataset="colours-new-gate",role="challenger",task="colours"}' in metrics


def test_a_worse_candidate_is_rejected_with_reasons_and_stays_unrouted(loop: Scenario) -> None:
    # poisoned feedback: labelled "traffic" with the wrong mapping outweighs the right new data (and no replay)
    add_dataset(loop.store, loop.config.data_path, colours(WRONG, 5000, 300, 5), task=TASK,
                name="feedback", kind="challenger", source="traffic:colours:test")
    settings = loop.config.tasks[TASK].retrain
    settings.replay_ratio, settings.max_steps = 0.0, 4  # 4 steps: enough not to be better, which is all it takes
    try:
        outcome = loop.loop.request_retrain(TASK, ManualTrigger(key="manual:worse", reason="poisoned feedback"))
    finally:
        settings.replay_ratio, settings.max_steps = 0.5, None
    done = loop.wait(outcome.job.id)
    assert done.state == "rejected" and done.decision is not None, (done.error, done.decision)
    reasons = " ".join(done.decision.reasons)
    assert "not significantly better" in reasons or "may be worse" in reasons
    champion = find_alias(loop.store, TASK, "champion")
    assert champion is not None and champion.version == 2
    rejected = [v for v in list_adapters(loop.store, TASK) if v.version == done.candidate_version]
    assert rejected and rejected[0].aliases == [], "registered, never routed"


def test_the_watch_rolls_back_a_promotion_that_regresses(loop: Scenario) -> None:
    from tuneloop.serving.admin_client import AdminClient

    jobs = JobStore(loop.store)
    rejected = jobs.recent(task=TASK, limit=1)[0]
    # Promote a version known to be worse behind the gate's back, as a hand promotion would: the poisoned first
    # champion, recorded as this job's candidate, watched against colours@2.
    jobs.record_candidate(rejected.id, 1)
    AdminClient(loop.config).promote("colours@1")
    now = datetime.now(UTC)
    jobs.record_watch(rejected.id, WatchState(status="watching", promoted_at=now, until=now + timedelta(hours=1),
                                              previous_version=2, through_gateway=True), state="promoted")
    outcome = loop.loop.check_watch(TASK)
    assert outcome is not None and outcome.status == "rolled_back"
    assert any(s.regression and s.kind == "evaluation" for s in outcome.signals)
    champion = find_alias(loop.store, TASK, "champion")
    assert champion is not None and champion.version == 2
    assert loop.ask("Ticket 9998: the sky over Rome looks red.")["model"] == "colours@2"
    rolled_back = jobs.get(rejected.id)
    assert rolled_back.state == "rolled_back" and rolled_back.watch is not None
    assert rolled_back.watch.status == "rolled_back" and rolled_back.watch.restored == "colours@2"
    kinds = [e.kind for e in list_events(loop.store, task=TASK, limit=20)]
    assert "watch_regression" in kinds and "rollback" in kinds
    metrics = httpx.get(f"{loop.url}/metrics", timeout=10).text
    assert 'tuneloop_rollbacks_total{task="colours"} 1.0' in metrics


def test_killing_the_job_mid_training_leaves_the_champion_serving_and_the_job_failed(loop: Scenario) -> None:
    outcome = loop.loop.request_retrain(TASK, ManualTrigger(key="manual:kill", reason="to be killed"))
    jobs = JobStore(loop.store)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = jobs.get(outcome.job.id)
        train = job.stages.get("train")
        if train is not None and train.status == "running":
            break
        assert job.active, (job.state, job.error)
        time.sleep(0.5)
    time.sleep(3)  # inside the training loop
    versions_before = len(list_adapters(loop.store, TASK))
    assert job.pid is not None
    os.kill(job.pid, signal.SIGKILL)
    failed = loop.wait(job.id, timeout=60)
    assert failed.state == "failed" and "killed or crashed" in (failed.error or "")
    assert len(list_adapters(loop.store, TASK)) == versions_before, "nothing half-registered"
    assert not list((loop.config.data_path / "adapters" / TASK).glob(".training-job*")), "staging removed"
    assert loop.ask("Ticket 9997: the sky over Lima looks green.")["model"] == "colours@2"


def test_the_webhook_refuses_bad_calls_and_a_too_small_gate_set_is_refused_for_its_mde(loop: Scenario) -> None:
    alert = {"version": "4", "status": "firing", "receiver": "tuneloop", "groupKey": "g", "alerts": [
        {"status": "firing", "labels": {"alertname": "TuneloopQualityBreach", "task": TASK},
         "annotations": {}, "startsAt": "2026-11-27T10:00:00Z", "fingerprint": "live"}]}
    url = f"{loop.url}/v1/hooks/alertmanager"
    before = len(JobStore(loop.store).recent(task=TASK))
    assert httpx.post(url, json=alert, timeout=10).status_code == 401
    assert httpx.post(url, json=alert, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.post(url, content=b'{"alerts": ', headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=10).status_code == 400
    assert len(JobStore(loop.store).recent(task=TASK)) == before
    gate = loop.config.tasks[TASK].retrain.gate
    gate.margin = 0.02  # 40 examples cannot resolve 2 points: the worker must refuse before training
    try:
        first = httpx.post(url, json=alert, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).json()
        replay = httpx.post(url, json=alert, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).json()
    finally:
        gate.margin = 0.3
    job_id = first["triggers"][0]["job"]
    assert first["triggers"][0]["outcome"] == "queued" and replay["triggers"][0] == {
        **first["triggers"][0], "outcome": "duplicate", "state": replay["triggers"][0]["state"]}
    done = loop.wait(job_id, timeout=120)
    assert done.state == "rejected" and done.decision is not None and done.decision.preflight
    assert "too small to decide: n=40" in done.decision.reasons[0]
    assert "train" not in done.stages and done.candidate_version is None
    assert len(JobStore(loop.store).recent(task=TASK)) == before + 1
