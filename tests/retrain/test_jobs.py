"""Job records on a real SQLite database: one active job per task, triggers attach, replays change nothing, a dead
worker's job is failed by the reaper, and stage timings are kept."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest

from tuneloop.retrain.jobs import JobNotFound, JobStore, Trigger, process_alive
from tuneloop.events import list_events
from tuneloop.store import Store


def trigger(key: str, source: str = "manual") -> Trigger:
    return Trigger(source=source, key=key, reason=f"because {key}", detail={})  # type: ignore[arg-type]


def submit(jobs: JobStore, task: str, key: str) -> object:
    return jobs.submit(task, trigger(key), runner="test", champion_version=1, settings={})


def test_a_second_trigger_joins_the_running_job_and_a_replay_changes_nothing(store: Store) -> None:
    jobs = JobStore(store)
    first = jobs.submit("sentiment", trigger("incident:1", "incident"), runner="test", champion_version=1,
                        settings={})
    second = jobs.submit("sentiment", trigger("alertmanager:abc:t0", "alertmanager"), runner="test",
                         champion_version=1, settings={})
    replay = jobs.submit("sentiment", trigger("alertmanager:abc:t0", "alertmanager"), runner="test",
                         champion_version=1, settings={})
    assert first.created and not second.created and not second.duplicate
    assert second.job.id == first.job.id and replay.job.id == first.job.id and replay.duplicate
    assert [t.source for t in jobs.get(first.job.id).triggers] == ["incident", "alertmanager"]
    assert len(jobs.recent()) == 1
    other = jobs.submit("chat", trigger("manual:x"), runner="test", champion_version=None, settings={})
    assert other.created and other.job.id != first.job.id, "the lock is per task"
    kinds = [e.kind for e in list_events(store, task="sentiment")]
    assert kinds.count("retrain_started") == 1 and kinds.count("retrain_trigger_attached") == 1


def test_after_a_job_finishes_the_next_trigger_queues_a_new_one(store: Store) -> None:
    jobs = JobStore(store)
    first = jobs.submit("sentiment", trigger("a"), runner="test", champion_version=1, settings={}).job
    jobs.finish(first.id, "rejected")
    again = jobs.submit("sentiment", trigger("a"), runner="test", champion_version=1, settings={})
    assert again.duplicate and again.job.id == first.id, "a replayed key still names the old job"
    fresh = jobs.submit("sentiment", trigger("b"), runner="test", champion_version=1, settings={})
    assert fresh.created and fresh.job.id != first.id


def test_concurrent_triggers_make_exactly_one_job(store: Store) -> None:
    jobs = JobStore(store)
    barrier = threading.Barrier(6)
    results: list[object] = []

    def fire(i: int) -> None:
        barrier.wait()
        results.append(jobs.submit("sentiment", trigger(f"k{i}"), runner="test", champion_version=1, settings={}))

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in results if r.created]  # type: ignore[attr-defined]
    assert len(created) == 1 and len(jobs.recent()) == 1
    assert len(jobs.get(created[0].job.id).triggers) == 6  # type: ignore[attr-defined]


def test_the_reaper_fails_a_job_whose_worker_died(store: Store) -> None:
    jobs = JobStore(store)
    job = jobs.submit("sentiment", trigger("a"), runner="test", champion_version=1, settings={}).job
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jobs.update(job.id, pid=dead.pid, host=__import__("socket").gethostname(), heartbeat_at=datetime.now(UTC),
                state="training")
    assert not process_alive(dead.pid)
    assert jobs.reap(stale_after_s=600) == [job.id]
    failed = jobs.get(job.id)
    assert failed.state == "failed" and "exited during 'training'" in (failed.error or "")
    assert jobs.submit("sentiment", trigger("b"), runner="test", champion_version=1, settings={}).created


def test_a_silent_worker_on_another_host_is_failed_after_its_heartbeat_lapses(store: Store) -> None:
    jobs = JobStore(store)
    job = jobs.submit("sentiment", trigger("a"), runner="test", champion_version=1, settings={}).job
    jobs.update(job.id, pid=1, host="elsewhere", heartbeat_at=datetime.now(UTC) - timedelta(seconds=30))
    assert jobs.reap(stale_after_s=60) == []
    assert jobs.reap(stale_after_s=10) == [job.id]
    assert "no heartbeat" in (jobs.get(job.id).error or "")


def test_stages_record_their_time_and_failures(store: Store) -> None:
    jobs = JobStore(store)
    job = jobs.submit("sentiment", trigger("a"), runner="test", champion_version=1, settings={}).job
    with jobs.stage(job.id, "assemble"):
        pass
    with pytest.raises(RuntimeError), jobs.stage(job.id, "train"):
        raise RuntimeError("boom")
    stages = jobs.get(job.id).stages
    assert stages["assemble"]["status"] == "done" and stages["assemble"]["seconds"] >= 0
    assert stages["train"]["status"] == "failed"


def test_an_unknown_job_is_a_clear_error(store: Store) -> None:
    with pytest.raises(JobNotFound, match="no retraining job 42"):
        JobStore(store).get(42)
