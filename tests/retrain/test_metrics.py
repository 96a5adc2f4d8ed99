"""Retraining's Prometheus series, read from a real SQLite job store at scrape time through a registry of the
test's own: states, failures, stage seconds and the latest gate decision's intervals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tuneloop.config import Config, RetrainConfig
from tuneloop.evaluators.compare import MetricComparison
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.metrics import RetrainCollector
from tuneloop.retrain.records import GateCheck, GateDecision, JobSettings, ManualTrigger
from tuneloop.store import Store


def _decision(delta: float) -> GateDecision:
    comparison = MetricComparison("macro_f1", a=0.4, b=0.4 + delta, delta=delta, ci_low=delta - 0.05,
                                  ci_high=delta + 0.05, p_value=0.01, method="paired bootstrap", level=0.95, n=400,
                                  mde=0.08, paired_mde=0.06)
    return GateDecision(promote=delta > 0, metric="macro_f1", level=0.95, margin=0.1, champion="sentiment@1",
                        candidate="sentiment@2", reasons=[], checks=[
                            GateCheck(dataset="sentiment/other-topics-gate@3", role="challenger", n=400, mde=0.06,
                                      passed=delta > 0, reason="", comparison=comparison, runs=(1, 2)),
                            GateCheck(dataset="sentiment/heldout@1", role="heldout", n=20, mde=0.3, passed=False,
                                      reason="too small")])


def test_states_failures_stages_and_the_latest_gate_decision(config: Config, store: Store) -> None:
    jobs = JobStore(store)
    settings = JobSettings(retrain=RetrainConfig())
    failed = jobs.submit("sentiment", ManualTrigger(key="a", reason="r"), runner="test", champion_version=1,
                         settings=settings).job
    jobs.finish(failed.id, "failed", error="boom")
    first = jobs.submit("sentiment", ManualTrigger(key="b", reason="r"), runner="test", champion_version=1,
                        settings=settings).job
    jobs.finish(first.id, "rejected", decision=_decision(-0.02))
    latest = jobs.submit("sentiment", ManualTrigger(key="c", reason="r"), runner="test", champion_version=1,
                         settings=settings).job
    with jobs.stage(latest.id, "assemble"):
        pass
    jobs.finish(latest.id, "promoted", decision=_decision(0.07))
    registry = CollectorRegistry()
    registry.register(RetrainCollector(config, store))
    value = registry.get_sample_value
    assert value("tuneloop_retrain_failures_total", {"task": "sentiment"}) == 1
    assert value("tuneloop_retrain_failures_total", {"task": "chat"}) == 0
    assert value("tuneloop_retrain_jobs", {"task": "sentiment", "state": "rejected"}) == 1
    assert value("tuneloop_retrain_jobs", {"task": "chat", "state": "queued"}) == 0
    assert value("tuneloop_gate_promoted", {"task": "sentiment"}) == 1, "the latest decision"
    labels = {"task": "sentiment", "dataset": "other-topics-gate", "role": "challenger"}
    assert value("tuneloop_gate_delta", {**labels, "bound": "point"}) == 0.07
    assert value("tuneloop_gate_delta", {**labels, "bound": "lower"}) == 0.07 - 0.05
    assert value("tuneloop_gate_delta", {"task": "sentiment", "dataset": "heldout", "role": "heldout",
                                         "bound": "point"}) is None, "a check without a comparison has no delta"
    stage = value("tuneloop_retrain_stage_seconds", {"task": "sentiment", "stage": "assemble"})
    assert stage is not None and stage >= 0
