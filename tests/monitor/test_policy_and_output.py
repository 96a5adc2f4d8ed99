"""Policy rules and incidents, and the output view, on a real SQLite store with real eval runs (scored by the eval
runner against a scripted endpoint) and captured traffic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.monitor.helpers import LABELS, capture, register_champion
from tests.monitor.helpers import evaluate_champion as run_eval
from tests.monitor.helpers import make_dataset as dataset
from tuneloop.config import Config, FloorRule
from tuneloop.events import list_events
from tuneloop.monitor.drift import DriftDetector
from tuneloop.monitor.incidents import IncidentStore, RuleId
from tuneloop.monitor.policy import Policy
from tuneloop.store import Store
from tuneloop.tables import DriftRunRow


@pytest.fixture
def policy_config(config: Config) -> Config:
    task = config.tasks["sentiment"]
    task.policy.floors = [FloorRule(metric="accuracy", dataset="sentiment/fresh", min=0.6)]
    task.policy.drop = None
    task.policy.drift_windows = 2
    task.policy.cooldown_s = 3600
    return config


def test_floor_breach_opens_one_incident_and_resolves_when_the_rule_holds(policy_config: Config, store: Store) -> None:
    register_champion(store, "sentiment", 1)
    policy = Policy(policy_config, store)
    assert [(c.rule.kind, c.verdict) for c in policy.check_rules("sentiment")] == [
        ("floor", "no_data"), ("drift", "no_data"), ("estimate", "no_data")]

    run_eval(policy_config, store, dataset(store, policy_config, "fresh", 60), accuracy_every=2)  # 0.5 accuracy
    first = policy.evaluate("sentiment")
    assert len(first.changes.opened) == 1 and first.checks[0].verdict == "breach"
    assert "0.5000" in first.checks[0].message
    second = policy.evaluate("sentiment")  # still in breach: the same incident, refreshed, not a second one
    assert second.changes.opened == [] and second.changes.refreshed == [i.id for i in first.changes.opened]
    [incident] = IncidentStore(store).list(task="sentiment")
    assert incident.rule == RuleId.floor("accuracy", "fresh") and incident.breaches == 2
    assert str(incident.rule) == "floor:accuracy:fresh" and RuleId.parse(str(incident.rule)) == incident.rule

    # a new version of the dataset on which the champion does well: the rule holds, the incident resolves
    run_eval(policy_config, store, dataset(store, policy_config, "fresh", 60, offset=100), accuracy_every=10)
    third = policy.evaluate("sentiment")
    assert [i.id for i in third.changes.resolved] == [i.id for i in first.changes.opened]
    assert IncidentStore(store).list(task="sentiment") == []
    kinds = [e.kind for e in list_events(store, task="sentiment")]
    assert kinds.count("breach") == 1 and kinds.count("incident_resolved") == 1


def test_a_breach_inside_the_cooldown_opens_nothing(policy_config: Config, store: Store) -> None:
    register_champion(store, "sentiment", 1)
    policy = Policy(policy_config, store)
    bad = dataset(store, policy_config, "fresh", 60)
    run_eval(policy_config, store, bad, accuracy_every=2)
    now = datetime.now(UTC)
    assert policy.evaluate("sentiment", now=now).changes.opened
    run_eval(policy_config, store, dataset(store, policy_config, "fresh", 60, offset=100), accuracy_every=10)
    assert policy.evaluate("sentiment", now=now + timedelta(minutes=1)).changes.resolved
    run_eval(policy_config, store, dataset(store, policy_config, "fresh", 60, offset=200), accuracy_every=2)
    flapping = policy.evaluate("sentiment", now=now + timedelta(minutes=2))
    assert flapping.changes.opened == [] and flapping.changes.suppressed == [RuleId.floor("accuracy", "fresh")]
    later = policy.evaluate("sentiment", now=now + timedelta(hours=2))
    assert len(later.changes.opened) == 1


def test_drop_counts_only_when_its_interval_excludes_zero(config: Config, store: Store) -> None:
    task = config.tasks["sentiment"]
    task.policy.floors, task.policy.drift_windows = [], 0
    task.policy.drop.datasets = ["sentiment/fresh"]  # type: ignore[union-attr]
    register_champion(store, "sentiment", 1)
    policy = Policy(config, store)
    run_eval(config, store, dataset(store, config, "fresh", 90), accuracy_every=10)  # baseline ~0.9
    run_eval(config, store, dataset(store, config, "fresh", 90, offset=100), accuracy_every=8)  # ~0.87: noise
    [noise] = policy.check_rules("sentiment")
    assert noise.verdict == "holds" and noise.facts["ci_low"] < 0 < noise.facts["ci_high"]
    run_eval(config, store, dataset(store, config, "fresh", 90, offset=200), accuracy_every=2)  # 0.5: real drop
    [drop] = policy.check_rules("sentiment")
    assert drop.verdict == "breach" and drop.facts["ci_high"] < 0
    assert drop.facts["method"] == "independent bootstrap"
    assert [str(i.rule) for i in policy.evaluate("sentiment").changes.opened] == ["drop:macro_f1:fresh"]


def test_drift_on_consecutive_windows(policy_config: Config, store: Store) -> None:
    policy_config.tasks["sentiment"].policy.floors = []
    policy = Policy(policy_config, store)

    def drift_run(drifted: bool) -> None:
        with store.session() as session:
            session.add(DriftRunRow(task="sentiment", window=100, n_current=100, n_reference=100, drifted=drifted,
                                    false_alarm_rate=0.05, settings={}))

    drift_run(True)
    assert policy.check_rules("sentiment")[0].verdict == "no_data"  # one flagged window is not two
    drift_run(True)
    assert [i.rule for i in policy.evaluate("sentiment").changes.opened] == [RuleId.drift()]
    drift_run(False)
    assert policy.evaluate("sentiment").changes.resolved


def test_output_view_fires_when_the_adapter_label_shares_move(config: Config, store: Store) -> None:
    config.monitor.views = ["output"]
    config.monitor.min_window = 30
    register_champion(store, "sentiment", 1)
    heldout = dataset(store, config, "heldout-small", 300, kind="heldout")
    config.tasks["sentiment"].heldout_dataset = "sentiment/heldout-small"
    run_eval(config, store, heldout, accuracy_every=1000)  # answers: a third of each label
    detector = DriftDetector(config, store)

    same = [LABELS[i % 3] for i in range(150)]
    capture(store, "sentiment", [f"prompt {i}" for i in range(150)], completions=same, adapter_version=1)
    quiet = detector.run("sentiment", window=150, html=False)
    [view] = quiet.views
    assert view.status == "ok" and not view.drifted and not quiet.drifted
    assert view.detail["reference_shares"]["negative"] == pytest.approx(1 / 3, abs=0.01)

    moved = ["negative"] * 100 + ["positive"] * 50  # the model now says "negative" two times in three
    capture(store, "sentiment", [f"later {i}" for i in range(150)], completions=moved, adapter_version=1)
    loud = detector.run("sentiment", window=150, html=False)
    [view] = loud.views
    assert view.score is not None and view.threshold is not None
    assert view.drifted and loud.drifted and view.score > view.threshold
    assert view.detail["current_shares"]["negative"] == pytest.approx(2 / 3, abs=0.01)
    assert view.calibration is not None and view.calibration["false_alarm_rate"] <= 0.05

    # answers of another adapter version are not this adapter's output
    capture(store, "sentiment", [f"v2 {i}" for i in range(150)], completions=["neutral"] * 150, adapter_version=2)
    [view] = detector.run("sentiment", window=150, html=False).views
    assert view.status == "unavailable" and "0 answers by sentiment@1" in view.detail["reason"]


def test_the_drift_window_holds_only_answered_requests(store: Store) -> None:
    """Requests vLLM refused produced no answer: a client sending thousands of prompts the engine throws away
    must not fill the window the drift views judge."""
    from tuneloop.monitor.samples import traffic_window

    capture(store, "sentiment", [f"served {i}" for i in range(5)], completions=["neutral"] * 5)
    capture(store, "sentiment", [f"refused {i}" for i in range(20)], status=400)
    capture(store, "sentiment", [f"engine down {i}" for i in range(3)], status=503)
    window = traffic_window(store, "sentiment", last=10)
    assert window.prompts == [f"served {i}" for i in range(5)]
    assert window.completions == ["neutral"] * 5
