"""The scheduler on a real SQLite database: jobs persist across restarts, run once with two schedulers, failed
runs are recorded and retried; the lease is exclusive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import select

from tuneloop.config import Config
from tuneloop.events import list_events
from tuneloop.monitor.jobs import ScheduledResult, Skipped
from tuneloop.monitor.lease import Lease
from tuneloop.monitor.scheduler import TuneloopScheduler
from tuneloop.store import Store
from tuneloop.tables import JobRunRow

DONE = Skipped("test job: nothing to do")


def _only_sentiment_eval(config: Config, schedule: str) -> Config:
    config.tasks["sentiment"].schedule.eval = schedule
    config.tasks["sentiment"].schedule.drift = None
    config.tasks["chat"].schedule.eval = None
    config.tasks["chat"].schedule.drift = None
    config.monitor.lease_s = 2
    config.monitor.retry_delay_s = 0.3
    return config


def _runs(store: Store) -> list[JobRunRow]:
    with store.session() as session:
        return list(session.scalars(select(JobRunRow).order_by(JobRunRow.id)))


def _wait(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def _ran_once(config: Config, store: Store) -> TuneloopScheduler:
    """A running scheduler for an hourly eval that has done its first run (due right after start)."""
    _only_sentiment_eval(config, "1h")
    first = TuneloopScheduler(config, store, {"eval": lambda task: DONE}, holder="first")
    first.start()
    _wait(lambda: len(_runs(store)) == 1)
    _wait(lambda: bool(first.jobs()) and first.jobs()[0]["next_run"] is not None)
    return first


def test_lease_is_exclusive_and_lapses(store: Store) -> None:
    first, second = Lease(store, holder="a", ttl_s=1), Lease(store, holder="b", ttl_s=1)
    assert first.try_acquire()
    assert not second.try_acquire()
    assert first.try_acquire()  # renewal by the holder
    time.sleep(1.2)
    assert second.try_acquire()  # the first stopped renewing: the lease lapsed
    assert not first.try_acquire()
    second.release()
    assert first.try_acquire()


def test_lease_race_has_one_winner(store: Store) -> None:
    stores = [Store(store.url, migrate=False) for _ in range(6)]
    leases = [Lease(other, holder=f"h{i}", ttl_s=30) for i, other in enumerate(stores)]
    results: list[bool] = []
    barrier = threading.Barrier(len(leases))

    def grab(lease: Lease) -> None:
        barrier.wait()
        results.append(lease.try_acquire())

    threads = [threading.Thread(target=grab, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for other in stores:
        other.close()
    assert sorted(results) == [False] * 5 + [True]


def test_two_schedulers_on_one_database_run_a_job_once(config: Config, store: Store) -> None:
    _only_sentiment_eval(config, "1h")
    calls: list[str] = []

    def eval_job(task: str) -> ScheduledResult:
        calls.append(task)
        time.sleep(0.2)
        return DONE

    first = TuneloopScheduler(config, store, {"eval": eval_job}, holder="first")
    other = Store(store.url, migrate=False)
    second = TuneloopScheduler(config, other, {"eval": eval_job}, holder="second")
    first.start()
    second.start()
    try:
        _wait(lambda: len(calls) >= 1)
        time.sleep(3)  # both had time to run the due job, and the second renewed its attempt on the lease twice
        assert calls == ["sentiment"]
        runs = _runs(store)
        assert [(r.job, r.task, r.status, r.holder) for r in runs] == [("eval", "sentiment", "ok", "first")]
        assert first.holds_lease() and not second.holds_lease()
    finally:
        first.stop()
        second.stop()
        other.close()


def test_standby_takes_over_when_the_holder_stops(config: Config, store: Store) -> None:
    _only_sentiment_eval(config, "1s")
    first = TuneloopScheduler(config, store, {"eval": lambda task: DONE}, holder="first")
    first.start()
    _wait(lambda: len(_runs(store)) >= 1)
    other = Store(store.url, migrate=False)
    second = TuneloopScheduler(config, other, {"eval": lambda task: DONE}, holder="second")
    second.start()
    try:
        first.stop()  # releases the lease
        _wait(lambda: any(r.holder == "second" for r in _runs(store)))
        holders = [r.holder for r in _runs(store)]
        switch = holders.index("second")
        assert set(holders[:switch]) == {"first"} and set(holders[switch:]) == {"second"}
    finally:
        second.stop()
        other.close()


def test_job_persists_across_a_restart(config: Config, store: Store) -> None:
    first = _ran_once(config, store)
    next_run = first.jobs()[0]["next_run"]
    first.stop()

    other = Store(store.url, migrate=False)
    restarted = TuneloopScheduler(config, other, {"eval": lambda task: DONE}, holder="restarted")
    restarted.start()
    try:
        assert [j["id"] for j in restarted.jobs()] == ["eval:sentiment"]
        assert restarted.jobs()[0]["next_run"] == next_run  # the stored schedule, not a fresh one
        time.sleep(2)
        assert len(_runs(store)) == 1  # not run again on restart
    finally:
        restarted.stop()
        other.close()


def test_changed_schedule_replaces_the_stored_job(config: Config, store: Store) -> None:
    _ran_once(config, store).stop()
    config.tasks["sentiment"].schedule.eval = "2h"
    second = TuneloopScheduler(config, store, {"eval": lambda task: DONE}, holder="second")
    second.start()
    try:
        assert [j["name"] for j in second.jobs()] == ["eval:sentiment [2h]"]
    finally:
        second.stop()


def test_failed_job_is_recorded_and_retried(config: Config, store: Store) -> None:
    _only_sentiment_eval(config, "1h")
    attempts: list[int] = []

    def flaky(task: str) -> ScheduledResult:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("engine went away")
        return DONE

    scheduler = TuneloopScheduler(config, store, {"eval": flaky}, holder="only")
    scheduler.start()
    try:
        _wait(lambda: len(_runs(store)) == 2 and _runs(store)[-1].status == "ok")
    finally:
        scheduler.stop()
    runs = _runs(store)
    assert [(r.status, r.attempt) for r in runs] == [("failed", 1), ("ok", 2)]
    assert runs[0].error == "RuntimeError: engine went away"
    failed = list_events(store, kind="job_failed")
    assert len(failed) == 1 and failed[0].payload["retry"] is True


@pytest.mark.parametrize("schedule", ["*/5 * * * *", "30m"])
def test_cron_and_interval_schedules_are_accepted(config: Config, store: Store, schedule: str) -> None:
    _only_sentiment_eval(config, schedule)
    scheduler = TuneloopScheduler(config, store, {"eval": lambda task: DONE}, holder="x")
    scheduler.start()
    try:
        assert [j["name"] for j in scheduler.jobs()] == [f"eval:sentiment [{schedule}]"]
    finally:
        scheduler.stop()
