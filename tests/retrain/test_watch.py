"""The watch of a promotion (retrain/watch.py) on a real store, with both versions asked over real HTTP by a
scripted endpoint: a new champion that regresses on a judged set is rolled back through the deployment, one that
holds is confirmed once its window ends, a promotion someone already replaced is left alone, a rising 5xx rate is
a regression, and a shift in answer labels is reported but never acted on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes import RecordingDeployment
from tests.monitor.helpers import answer_by_rule, make_dataset, register_champion, register_version
from tests.stub_endpoint import stub_endpoint
from tuneloop.config import Config, RetrainConfig
from tuneloop.events import list_events
from tuneloop.registry import find_alias, set_alias
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import JobSettings, ManualTrigger, WatchState
from tuneloop.retrain.watch import Watch
from tuneloop.store import Store
from tuneloop.tables import TrafficRow


@pytest.fixture
def promoted(config: Config, store: Store) -> int:
    """sentiment@2 promoted over sentiment@1 by job 1, under watch for an hour from now."""
    config.evaluation.bootstrap_resamples = 300
    make_dataset(store, config, "heldout", 300, kind="heldout")
    make_dataset(store, config, "other-topics", 400)
    register_champion(store, "sentiment", 1)
    register_version(store, "sentiment", 2)
    jobs = JobStore(store)
    job = jobs.submit("sentiment", ManualTrigger(key="manual:1", reason="r"), runner="test", champion_version=1,
                      settings=JobSettings(retrain=RetrainConfig(), challenger_sets=["sentiment/other-topics"])).job
    jobs.record_candidate(job.id, 2)
    set_alias(store, "sentiment@2", "champion", reason="promoted")
    now = datetime.now(UTC)
    jobs.finish(job.id, "promoted", watch=WatchState(status="watching", promoted_at=now - timedelta(minutes=5),
                                                      until=now + timedelta(hours=1), previous_version=1,
                                                      through_gateway=True))
    return job.id


def traffic(store: Store, version: int, statuses: list[int], *, at: datetime, answer: str = "negative") -> None:
    with store.session() as session:
        for i, status in enumerate(statuses):
            session.add(TrafficRow(request_id=uuid.uuid4().hex, created_at=at + timedelta(milliseconds=i),
                                   task="sentiment", adapter_version=version, route="champion", endpoint="chat",
                                   prompt_text="p", messages=[], completion=answer if status == 200 else None,
                                   latency_ms=1.0, status=status))


def test_a_regression_on_a_judged_set_is_rolled_back(config: Config, store: Store, promoted: int) -> None:
    deployment = RecordingDeployment(store, previous={"sentiment": "sentiment@1"})
    with stub_endpoint(answer_by_rule({"sentiment@2": 2})) as endpoint:
        deployment.endpoint = endpoint.url
        outcome = Watch(config, store, deployment).check("sentiment")
    assert outcome is not None and outcome.status == "rolled_back"
    regressions = [s for s in outcome.signals if s.regression]
    assert regressions and all(s.kind == "evaluation" for s in regressions)
    assert ("rollback", "sentiment") in deployment.calls
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.version == 1
    job = JobStore(store).get(promoted)
    assert job.state == "rolled_back" and job.watch is not None and job.watch.restored == "sentiment@1"
    assert job.watch.reason and "sentiment@2 - sentiment@1" in job.watch.reason
    assert "watch_regression" in [e.kind for e in list_events(store, task="sentiment")]


def test_a_promotion_that_holds_is_confirmed_when_its_window_ends(config: Config, store: Store,
                                                                  promoted: int) -> None:
    deployment = RecordingDeployment(store)
    with stub_endpoint(answer_by_rule({})) as endpoint:
        deployment.endpoint = endpoint.url
        watch = Watch(config, store, deployment)
        during = watch.check("sentiment")
        assert during is not None and during.status == "watching"
        after = watch.check("sentiment", now=datetime.now(UTC) + timedelta(hours=2))
    assert after is not None and after.status == "confirmed" and not any(s.regression for s in after.signals)
    assert JobStore(store).get(promoted).state == "promoted" and ("rollback", "sentiment") not in deployment.calls
    assert watch.check("sentiment") is None, "a confirmed promotion is no longer watched"


def test_a_replaced_promotion_is_superseded_not_judged(config: Config, store: Store, promoted: int) -> None:
    register_version(store, "sentiment", 3)
    set_alias(store, "sentiment@3", "champion", reason="by hand")
    deployment = RecordingDeployment(store)
    outcome = Watch(config, store, deployment).check("sentiment")
    assert outcome is not None and outcome.status == "superseded" and deployment.calls == []
    watch = JobStore(store).get(promoted).watch
    assert watch is not None and watch.status == "superseded"


def test_a_rising_error_rate_rolls_back_and_label_shares_are_only_reported(config: Config, store: Store,
                                                                           promoted: int) -> None:
    job = JobStore(store).get(promoted)
    assert job.watch is not None
    promoted_at = job.watch.promoted_at
    traffic(store, 1, [200] * 30, at=promoted_at - timedelta(minutes=2), answer="negative")
    traffic(store, 2, [200] * 10 + [500] * 20, at=promoted_at + timedelta(minutes=1), answer="positive")
    deployment = RecordingDeployment(store, previous={"sentiment": "sentiment@1"})
    with stub_endpoint(answer_by_rule({})) as endpoint:
        deployment.endpoint = endpoint.url
        outcome = Watch(config, store, deployment).check("sentiment")
    assert outcome is not None and outcome.status == "rolled_back"
    by_kind = {s.kind: s for s in outcome.signals}
    assert by_kind["error_rate"].regression and not by_kind["evaluation"].regression
    labels = by_kind["label_shares"]
    assert not labels.regression and "reported, not acted on" in labels.message
