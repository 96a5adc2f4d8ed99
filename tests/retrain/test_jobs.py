"""Job records on a real SQLite database: one active job per task, triggers attach, replays change nothing, a dead
worker's job is failed by the reaper, and stage timings are kept."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tuneloop.config import RetrainConfig
from tuneloop.evaluators.compare import MetricComparison
from tuneloop.events import list_events
from tuneloop.processes import process_alive
from tuneloop.retrain.jobs import CorruptJobRecord, JobEnded, JobNotFound, JobStore, SubmitOutcome, why_stale
from tuneloop.retrain.records import (
    AlertTrigger,
    ErrorRateSignal,
    GateCheck,
    GateDecision,
    IncidentTrigger,
    JobSettings,
    ManualTrigger,
    Trigger,
    WatchState,
)
from tuneloop.store import Store
from tuneloop.tables import RetrainJobRow, RetrainTriggerRow

SETTINGS = JobSettings(retrain=RetrainConfig())


def trigger(key: str) -> ManualTrigger:
    return ManualTrigger(key=key, reason=f"because {key}")


def submit(jobs: JobStore, task: str, new: Trigger) -> SubmitOutcome:
    return jobs.submit(task, new, runner="test", champion_version=1, settings=SETTINGS)


def simulate_worker(store: Store, job_id: int, *, host: str, heartbeat_at: datetime) -> None:
    """Test setup: a worker on `host` that last beat at `heartbeat_at` (another machine cannot be started here)."""
    with store.session() as session:
        row = session.get(RetrainJobRow, job_id)
        assert row is not None
        row.pid, row.host, row.heartbeat_at, row.state = 1, host, heartbeat_at, "training"


def test_a_second_trigger_joins_the_running_job_and_a_replay_changes_nothing(store: Store) -> None:
    jobs = JobStore(store)
    incident = IncidentTrigger(key="incident:1", reason="incident 1: floor:macro_f1:other-topics", incident=1,
                               rule="floor:macro_f1:other-topics", datasets=["other-topics"])
    alert = AlertTrigger(key="alertmanager:abc:t0", reason="alert Q", alertname="Q", labels={"task": "sentiment"},
                         starts_at="t0")
    first = submit(jobs, "sentiment", incident)
    second = submit(jobs, "sentiment", alert)
    replay = submit(jobs, "sentiment", alert)
    assert first.created and not second.created and not second.duplicate
    assert second.job.id == first.job.id and replay.job.id == first.job.id and replay.duplicate
    stored = jobs.get(first.job.id).triggers
    assert [t.trigger for t in stored] == [incident, alert], "triggers come back as the records that were sent"
    assert len(jobs.recent()) == 1
    other = jobs.submit("chat", trigger("manual:x"), runner="test", champion_version=None, settings=SETTINGS)
    assert other.created and other.job.id != first.job.id, "the lock is per task"
    kinds = [e.kind for e in list_events(store, task="sentiment")]
    assert kinds.count("retrain_started") == 1 and kinds.count("retrain_trigger_attached") == 1


def test_after_a_job_finishes_the_next_trigger_queues_a_new_one(store: Store) -> None:
    jobs = JobStore(store)
    first = submit(jobs, "sentiment", trigger("a")).job
    jobs.finish(first.id, "rejected")
    again = submit(jobs, "sentiment", trigger("a"))
    assert again.duplicate and again.job.id == first.id, "a replayed key still names the old job"
    fresh = submit(jobs, "sentiment", trigger("b"))
    assert fresh.created and fresh.job.id != first.id


def test_concurrent_triggers_make_exactly_one_job(store: Store) -> None:
    jobs = JobStore(store)
    barrier = threading.Barrier(6)
    results: list[SubmitOutcome] = []

    def fire(i: int) -> None:
        barrier.wait()
        results.append(submit(jobs, "sentiment", trigger(f"k{i}")))

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in results if r.created]
    assert len(created) == 1 and len(jobs.recent()) == 1
    assert len(jobs.get(created[0].job.id).triggers) == 6


def test_the_reaper_fails_a_job_whose_worker_died(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("a")).job
    jobs.transition(job.id, "training")
    # A real worker process claims the job (pid, host, heartbeat) and dies without finishing it.
    claim = (f"from tuneloop.retrain.jobs import JobStore; from tuneloop.store import Store; "
             f"JobStore(Store({store.url!r})).claim({job.id}, log_path=None)")
    subprocess.run([sys.executable, "-c", claim], check=True)
    dead = jobs.get(job.id)
    assert dead.pid is not None and not process_alive(dead.pid) and dead.heartbeat_at is not None
    assert jobs.reap(stale_after_s=600) == [job.id]
    failed = jobs.get(job.id)
    assert failed.state == "failed" and "exited during 'training'" in (failed.error or "")
    assert submit(jobs, "sentiment", trigger("b")).created


def test_a_silent_worker_on_another_host_is_failed_after_its_heartbeat_lapses(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("a")).job
    simulate_worker(store, job.id, host="elsewhere", heartbeat_at=datetime.now(UTC) - timedelta(seconds=30))
    assert jobs.reap(stale_after_s=60) == []
    assert jobs.reap(stale_after_s=10) == [job.id]
    assert "no heartbeat" in (jobs.get(job.id).error or "")


def test_stages_record_their_time_and_failures(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("a")).job
    with jobs.stage(job.id, "assemble"):
        pass
    with pytest.raises(RuntimeError), jobs.stage(job.id, "train"):
        raise RuntimeError("boom")
    stages = jobs.get(job.id).stages
    assert stages["assemble"].status == "done" and stages["assemble"].seconds is not None
    assert stages["train"].status == "failed" and stages["train"].finished_at is not None


def test_an_unknown_job_is_a_clear_error(store: Store) -> None:
    with pytest.raises(JobNotFound, match="no retraining job 42"):
        JobStore(store).get(42)


def decision() -> GateDecision:
    comparison = MetricComparison("macro_f1", a=0.4, b=0.5, delta=0.1, ci_low=0.05, ci_high=0.15, p_value=0.001,
                                  method="paired bootstrap", level=0.95, n=400, mde=0.08, paired_mde=0.06)
    return GateDecision(promote=True, metric="macro_f1", level=0.95, margin=0.15, champion="sentiment@1",
                        candidate="sentiment@2", reasons=["every gate set passed"], checks=[
                            GateCheck(dataset="sentiment/other-topics-gate@1", role="challenger", n=400, mde=0.06,
                                      passed=True, reason="better", comparison=comparison, runs=(3, 4))])


def test_the_gate_decision_and_watch_come_back_as_the_records_that_were_stored(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("a")).job
    made = decision()
    jobs.record_decision(job.id, made)
    now = datetime.now(UTC)
    watch = WatchState(status="watching", promoted_at=now, until=now + timedelta(hours=1), previous_version=1,
                       through_gateway=True, signals=[
                           ErrorRateSignal(regression=False, message="too few", old_requests=3, old_errors=0,
                                           new_requests=2, new_errors=0)])
    finished = jobs.finish(job.id, "promoted", watch=watch)
    assert finished.decision == made and finished.watch == watch and not finished.active
    assert finished.decision is not None and finished.decision.checks[0].comparison == made.checks[0].comparison
    counts = jobs.counts()
    assert counts.by_state[("sentiment", "promoted")] == 1 and counts.latest_decision["sentiment"] == made


def test_a_row_the_store_did_not_write_is_a_clear_error_not_a_half_read(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("a")).job
    with store.session() as session:
        row = session.get(RetrainJobRow, job.id)
        assert row is not None
        row.decision = {"promote": "yes please"}
    with pytest.raises(CorruptJobRecord, match=f"retraining job {job.id}: its stored gate decision"):
        jobs.get(job.id)


def test_why_stale_only_reads(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("a")).job
    simulate_worker(store, job.id, host="elsewhere", heartbeat_at=datetime.now(UTC) - timedelta(seconds=300))
    stale = jobs.get(job.id)
    assert "no heartbeat" in (why_stale(stale, stale_after_s=60) or "")
    assert why_stale(stale, stale_after_s=600) is None
    assert jobs.get(job.id).state == "training", "asking why a job is stale changes nothing"


def test_jobs_written_before_the_typed_records_are_migrated_and_read_as_records(tmp_path: Path) -> None:
    """A database at migration 0006 holding a job in the old JSON shapes (flat gate checks, watch signals with
    `facts`, an alert trigger's `startsAt`) reads back as records after the upgrade to 0007."""
    from alembic import command
    from sqlalchemy import create_engine, insert

    from tuneloop.store import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
        now = datetime.now(UTC)
        connection.execute(insert(RetrainJobRow).values(
            id=1, task="sentiment", state="promoted", active_task=None, created_at=now, updated_at=now,
            runner="local", champion_version=1, candidate_version=2, stages={
                "train": {"started_at": now.isoformat(), "status": "done", "seconds": 12.5,
                          "finished_at": now.isoformat()}},
            decision={"promote": True, "metric": "macro_f1", "level": 0.95, "margin": 0.15, "champion": "sentiment@1",
                      "candidate": "sentiment@2", "reasons": ["every gate set passed"], "preflight": False,
                      "checks": [{"dataset": "sentiment/other-topics-gate@1", "role": "challenger",
                                  "metric": "macro_f1", "n": 400, "champion": 0.40, "candidate": 0.48,
                                  "delta": 0.08, "ci_low": 0.03, "ci_high": 0.13, "p_value": 0.002, "mde": 0.06,
                                  "passed": True, "reason": "better", "runs": [5, 6]}]},
            watch={"status": "watching", "promoted_at": now.isoformat(),
                   "until": (now + timedelta(hours=1)).isoformat(), "previous_version": 1, "through_gateway": True,
                   "gate_sets": [{"dataset": "sentiment/other-topics-gate@1", "role": "challenger"}],
                   "checked_at": now.isoformat(), "signals": [
                       {"name": "error_rate", "regression": False, "message": "too few requests",
                        "facts": {"old_requests": 3, "old_errors": 0, "new_requests": 1, "new_errors": 0}},
                       {"name": "eval:sentiment/heldout@1", "regression": False, "message": "ok",
                        "facts": {"delta": 0.0, "runs": [7, 8]}}]},
            settings={"retrain": {}, "challenger_sets": ["sentiment/other-topics"]}))
        connection.execute(insert(RetrainTriggerRow).values(
            job_id=1, task="sentiment", source="alertmanager", key="alertmanager:abc:t0", reason="alert Q",
            detail={"alertname": "Q", "labels": {"task": "sentiment"}, "annotations": {}, "startsAt": "t0",
                    "datasets": []}, created_at=now))
    engine.dispose()
    store = Store(url)  # migrates to head
    job = JobStore(store).get(1)
    assert job.decision is not None and job.watch is not None
    [check] = job.decision.checks
    assert check.comparison is not None and check.comparison.delta == 0.08 and check.comparison.a == 0.40
    assert check.comparison.level == 0.95 and "migrated" in check.comparison.method and check.runs == (5, 6)
    assert [s.kind for s in job.watch.signals] == ["error_rate", "evaluation"]
    error_rate = job.watch.signals[0]
    assert isinstance(error_rate, ErrorRateSignal) and error_rate.old_requests == 3
    assert job.stages["train"].seconds == 12.5
    [received] = job.triggers
    assert isinstance(received.trigger, AlertTrigger) and received.trigger.starts_at == "t0"
    store.close()


def test_a_job_the_reaper_ended_keeps_its_end_and_its_worker_is_told_to_stop(store: Store) -> None:
    # A worker on a Ray node that lost its cluster goes on running after the reaper failed its job: what it writes
    # afterwards must not resurrect or re-end the job, and it must not go on to promote.
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("orphan")).job
    simulate_worker(store, job.id, host="node-b", heartbeat_at=datetime.now(UTC))
    assert jobs.reap(stale_after_s=60, gone=lambda j: "Ray job tuneloop-job-1 FAILED: node died") == [job.id]
    assert jobs.heartbeat(job.id) is False, "the worker learns its job has ended"
    with pytest.raises(JobEnded, match="ended failed \\(Ray job tuneloop-job-1 FAILED: node died\\)"):
        jobs.transition(job.id, "evaluating")
    with pytest.raises(JobEnded):
        jobs.require_active(job.id)
    assert jobs.finish(job.id, "promoted").state == "failed", "a late end changes nothing"
    assert jobs.get(job.id).error == "Ray job tuneloop-job-1 FAILED: node died"


def test_the_runners_reason_comes_first_and_a_job_finished_meanwhile_is_not_reaped(store: Store) -> None:
    jobs = JobStore(store)
    job = submit(jobs, "sentiment", trigger("raced")).job
    simulate_worker(store, job.id, host="node-b", heartbeat_at=datetime.now(UTC) - timedelta(hours=1))
    assert jobs.reap(stale_after_s=60, gone=lambda j: "Ray job X STOPPED") == [job.id]
    assert jobs.get(job.id).error == "Ray job X STOPPED", "the runner names the cause; the lapsed heartbeat is second"
    finished = submit(jobs, "sentiment", trigger("finished")).job
    simulate_worker(store, finished.id, host="node-b", heartbeat_at=datetime.now(UTC))

    def finishes_first(seen: object) -> str:
        jobs.finish(finished.id, "rejected")  # the worker ends the job between the reaper's look and its write
        return "Ray job Y SUCCEEDED without finishing"

    assert jobs.reap(stale_after_s=60, gone=finishes_first) == []
    assert jobs.get(finished.id).state == "rejected" and jobs.get(finished.id).error is None
