"""The conductor's loop on a real store, with scheduled evals asking a scripted endpoint over real HTTP and a
runner that records instead of starting workers: a scheduled job is recorded as the scheduler records it, a breach
it reveals opens an incident that queues one retraining job naming the breached set, a failed job runs no policy,
and only an eval re-checks a watched promotion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tests.fakes import RecordingDeployment, RecordingRunner
from tests.monitor.helpers import answer_by_rule, make_dataset, register_champion, register_version
from tests.stub_endpoint import stub_endpoint
from tuneloop.conductor.loop import Loop, incident_trigger
from tuneloop.config import Config, FloorRule, RetrainConfig
from tuneloop.events import list_events
from tuneloop.monitor.incidents import Incident, RuleId
from tuneloop.monitor.jobs import EvalJobResult, Skipped
from tuneloop.registry import set_alias
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import IncidentTrigger, JobSettings, ManualTrigger, WatchState
from tuneloop.store import Store
from tuneloop.tables import JobRunRow


@pytest.fixture
def breaching(config: Config, store: Store) -> Config:
    """sentiment's champion answers every second other-topic tweet wrong, below a 0.9 macro-F1 floor."""
    config.evaluation.bootstrap_resamples = 300
    task = config.tasks["sentiment"]
    task.policy.floors = [FloorRule(metric="macro_f1", dataset="other-topics", min=0.9)]
    task.policy.drop, task.policy.drift_windows = None, 0
    make_dataset(store, config, "heldout", 60, kind="heldout")
    make_dataset(store, config, "other-topics", 120)
    register_champion(store, "sentiment", 1)
    return config


def loop_for(config: Config, store: Store, url: str, runner: RecordingRunner) -> Loop:
    return Loop(config, store, runner=runner, deployment=RecordingDeployment(store, url), endpoint=url)


def test_a_breach_found_by_a_scheduled_eval_queues_one_job_for_the_breached_set(breaching: Config,
                                                                                 store: Store) -> None:
    runner = RecordingRunner()
    with stub_endpoint(answer_by_rule({"sentiment@1": 2})) as endpoint:
        loop = loop_for(breaching, store, endpoint.url, runner)
        outcome = loop.run_scheduled("eval", "sentiment")
        assert outcome.status == "ok" and isinstance(outcome.result, EvalJobResult)
        assert set(outcome.result.runs) == {"sentiment/heldout@1", "sentiment/other-topics-gate@1"}
        assert {model for model, _ in endpoint.asked} == {"sentiment@1"}, "asked through the given endpoint"
        again = loop.run_scheduled("eval", "sentiment")  # still breaching: the incident is refreshed, no new job
    assert again.status == "ok"
    [job] = JobStore(store).recent()
    assert runner.launched == [job.id]
    [received] = job.triggers
    assert isinstance(received.trigger, IncidentTrigger)
    assert received.trigger.rule == "floor:macro_f1:other-topics" and received.trigger.datasets == ["other-topics"]
    with store.session() as session:
        runs = list(session.scalars(select(JobRunRow).order_by(JobRunRow.id)))
    assert [(r.job, r.status, r.holder) for r in runs] == [("eval", "ok", "inline")] * 2, "recorded as scheduled"


def test_incidents_without_on_incident_start_nothing(breaching: Config, store: Store) -> None:
    breaching.tasks["sentiment"].retrain.on_incident = False
    runner = RecordingRunner()
    with stub_endpoint(answer_by_rule({"sentiment@1": 2})) as endpoint:
        after = loop_for(breaching, store, endpoint.url, runner).run_scheduled("eval", "sentiment")
    assert after.status == "ok" and JobStore(store).recent() == [] and runner.launched == []
    assert "breach" in [e.kind for e in list_events(store, task="sentiment")], "the incident itself is opened"


def test_a_failed_scheduled_job_is_recorded_and_runs_no_policy(breaching: Config, store: Store) -> None:
    runner = RecordingRunner()
    loop = loop_for(breaching, store, "http://127.0.0.1:9", runner)  # nothing listens there
    breaching.evaluation.max_attempts = 1
    outcome = loop.run_scheduled("eval", "sentiment")
    assert outcome.status == "failed" and "EngineUnavailable" in (outcome.error or "")
    assert "job_failed" in [e.kind for e in list_events(store, task="sentiment")]
    assert "breach" not in [e.kind for e in list_events(store, task="sentiment")] and runner.launched == []


def test_only_an_eval_rechecks_a_watched_promotion(breaching: Config, store: Store) -> None:
    breaching.tasks["sentiment"].policy.floors = []
    register_version(store, "sentiment", 2)
    jobs = JobStore(store)
    job = jobs.submit("sentiment", ManualTrigger(key="manual:1", reason="r"), runner="test", champion_version=1,
                      settings=JobSettings(retrain=RetrainConfig(), challenger_sets=["sentiment/other-topics"])).job
    jobs.record_candidate(job.id, 2)
    set_alias(store, "sentiment@2", "champion")
    now = datetime.now(UTC)
    jobs.finish(job.id, "promoted", watch=WatchState(status="watching", promoted_at=now, until=now + timedelta(hours=1),
                                                      previous_version=1, through_gateway=True))
    with stub_endpoint(answer_by_rule({})) as endpoint:
        loop = loop_for(breaching, store, endpoint.url, RecordingRunner())
        drift = loop.run_scheduled("drift", "sentiment")
        assert isinstance(drift.result, Skipped) and "captured user prompts" in drift.result.reason
        watch = jobs.get(job.id).watch
        assert watch is not None and watch.checked_at is None, "a drift check does not run the watch"
        loop.run_scheduled("eval", "sentiment")
    watch = jobs.get(job.id).watch
    assert watch is not None and watch.checked_at is not None and watch.status == "watching"


def test_an_incidents_rule_names_the_sets_retraining_learns_from() -> None:
    now = datetime.now(UTC)

    def incident(rule: RuleId) -> Incident:
        return Incident(id=7, task="sentiment", rule=rule, status="open", opened_at=now, last_seen_at=now,
                        resolved_at=None, breaches=1, message="x" * 900, facts={})

    floor = incident_trigger(incident(RuleId.floor("macro_f1", "other-topics")))
    assert (floor.key, floor.datasets, floor.rule) == ("incident:7", ["other-topics"], "floor:macro_f1:other-topics")
    assert len(floor.message) == 500, "bounded"
    assert incident_trigger(incident(RuleId.drift())).datasets == [], "drift names no set: all are used"


def _dead_worker(store: Store, job_id: int, *, candidate: int, state: str) -> None:
    """Test setup: the job's worker registered `candidate`, reached `state` and was SIGKILLed (a pid above
    Linux's largest, 2**22, never names a live process, so the reaper sees the worker gone at once)."""
    import socket

    from tuneloop.tables import RetrainJobRow

    with store.session() as session:
        row = session.get(RetrainJobRow, job_id)
        assert row is not None
        row.pid, row.host, row.heartbeat_at = 2**22 + 7, socket.gethostname(), datetime.now(UTC)
        row.state, row.candidate_version = state, candidate


def test_a_job_killed_while_the_gate_ran_is_failed_and_its_loaded_candidate_released(config: Config,
                                                                                      store: Store) -> None:
    register_champion(store, "sentiment", 1)
    register_version(store, "sentiment", 2)
    deployment = RecordingDeployment(store)
    loop = Loop(config, store, runner=RecordingRunner(), deployment=deployment, endpoint="http://unused.test")
    job = loop.request_retrain("sentiment", ManualTrigger(key="k1", reason="test")).job
    _dead_worker(store, job.id, candidate=2, state="evaluating")
    assert loop.reap_jobs() == [job.id]
    ended = JobStore(store).get(job.id)
    assert ended.state == "failed" and "exited during 'evaluating'" in (ended.error or "")
    assert deployment.calls == [("release", "sentiment@2")]
    assert loop.reap_jobs() == [], "an ended job is not reaped twice"


def test_a_job_killed_after_promoting_ends_promoted_with_its_watch_on(config: Config, store: Store) -> None:
    config.tasks["sentiment"].retrain.watch_s = 600
    register_champion(store, "sentiment", 1)
    register_version(store, "sentiment", 2)
    deployment = RecordingDeployment(store)
    loop = Loop(config, store, runner=RecordingRunner(), deployment=deployment, endpoint="http://unused.test")
    job = loop.request_retrain("sentiment", ManualTrigger(key="k1", reason="test")).job
    set_alias(store, "sentiment@2", "champion", reason="promoted")  # the worker's last act before the kill
    _dead_worker(store, job.id, candidate=2, state="evaluating")
    assert loop.reap_jobs() == [job.id]
    ended = JobStore(store).get(job.id)
    assert ended.state == "promoted", ended.error
    assert ended.watch is not None and ended.watch.status == "watching" and ended.watch.previous_version == 1
    assert (ended.watch.until - ended.watch.promoted_at).total_seconds() == pytest.approx(600)
    assert "recovered by the reaper" in (ended.watch.reason or "")
    assert deployment.calls == [], "the champion is not unloaded"


def test_alerts_reaching_two_gateways_at_once_start_one_job_for_the_task(config: Config, store: Store) -> None:
    # Each gateway process's webhook hands its alerts to its own loop (tuneloop/conductor/webhook.py); two on one
    # database, each with its own connection pool and runner, receive different alerts for one task at once.
    import threading

    register_champion(store, "sentiment", 1)
    other_store = Store(store.url, migrate=False)
    runners = [RecordingRunner(), RecordingRunner()]
    loops = [Loop(config, s, runner=r, deployment=RecordingDeployment(s), endpoint="http://unused.test")
             for s, r in zip((store, other_store), runners, strict=True)]
    barrier = threading.Barrier(8)
    outcomes: list[int] = []

    def alert(n: int) -> None:
        barrier.wait()
        outcome = loops[n % 2].request_retrain("sentiment", ManualTrigger(key=f"alert:{n}", reason=f"alert {n}"))
        outcomes.append(outcome.job.id)

    threads = [threading.Thread(target=alert, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other_store.close()
    assert len(set(outcomes)) == 1 and len(outcomes) == 8, "every alert joined the one job"
    assert sorted(len(r.launched) for r in runners) == [0, 1], "one gateway started it, once"
    [job] = JobStore(store).recent(task="sentiment")
    assert len(job.triggers) == 8
