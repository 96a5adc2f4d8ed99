"""promtool unit tests of the alert and recording rules, declared here and written as a promtool test file.

Why generated: promtool compares annotations exactly, and ours are long and templated. The scenarios below
(input series, evaluation times, which alerts fire with which labels) are written by hand; the expected
annotations are the rule's templates filled with the expected labels, which promtool then checks against
Prometheus's own template expansion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tuneloop.monitor.ops.rules import ALERT_RULES, RUNBOOK_BASE

TL = 'job="tuneloop", instance="gateway:8400"'
SCRAPE = {"job": "tuneloop", "instance": "gateway:8400"}
QUALITY = {"task": "sentiment", "dataset": "heldout", "metric": "macro_f1"}


@dataclass(frozen=True)
class Expect:
    alert: str
    at: str
    firing: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    series: dict[str, str]
    expect: tuple[Expect, ...]
    exprs: tuple[tuple[str, str, tuple[tuple[str, float], ...]], ...] = field(default=())  # (expr, at, samples)


def _champion_series(score: float, upper: float, floor: float, adapter: str = "sentiment@1",
                     alias: str = "champion") -> dict[str, str]:
    labels = f'{TL}, task="sentiment", adapter="{adapter}", dataset="heldout", metric="macro_f1"'
    return {
        f"tuneloop_eval_score{{{labels}}}": f"{score}x30",
        f"tuneloop_eval_score_ci_upper{{{labels}}}": f"{upper}x30",
        f"tuneloop_eval_score_ci_lower{{{labels}}}": f"{score - (upper - score)}x30",
        f'tuneloop_adapter_info{{{TL}, task="sentiment", alias="{alias}", adapter="{adapter}"}}': "1x30",
        f'tuneloop_quality_floor{{{TL}, task="sentiment", dataset="heldout", metric="macro_f1"}}': f"{floor}x30",
        f'tuneloop_task_primary_metric{{{TL}, task="sentiment", metric="macro_f1"}}': "1x30",
    }


def _quality_labels(adapter: str = "sentiment@1") -> dict[str, str]:
    return {**SCRAPE, **QUALITY, "adapter": adapter}


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "significant quality breach: the whole CI under the floor fires after 5m and asks for retraining",
        _champion_series(score=0.40, upper=0.50, floor=0.60),
        (Expect("TuneloopQualityBelowFloor", "4m"),
         Expect("TuneloopQualityBelowFloor", "6m", (_quality_labels(),)),
         Expect("TuneloopQualityNearFloor", "20m")),
        exprs=(("tuneloop:champion_primary_score", "1m",
                (('tuneloop:champion_primary_score{adapter="sentiment@1", dataset="heldout", '
                  'instance="gateway:8400", job="tuneloop", metric="macro_f1", task="sentiment"}', 0.40),)),),
    ),
    Scenario(
        "point under the floor but the CI reaches it: a warning after 15m, no retraining",
        _champion_series(score=0.55, upper=0.65, floor=0.60),
        (Expect("TuneloopQualityBelowFloor", "20m"),
         Expect("TuneloopQualityNearFloor", "14m"),
         Expect("TuneloopQualityNearFloor", "16m", (_quality_labels(),))),
    ),
    Scenario(
        "a candidate scoring under the floor is not the champion: nothing fires",
        _champion_series(score=0.40, upper=0.50, floor=0.60, adapter="sentiment@2", alias="candidate"),
        (Expect("TuneloopQualityBelowFloor", "10m"), Expect("TuneloopQualityNearFloor", "20m")),
        exprs=(("tuneloop:champion_eval_score", "5m", ()),),
    ),
    Scenario(
        "drift held for 30 minutes fires and asks for retraining; a single drifted check does not",
        {f'tuneloop_drift_detected{{{TL}, task="sentiment"}}': "1x45",
         f'tuneloop_drift_detected{{{TL}, task="chat"}}': "0 0 1 0 0 0 0 0 0 0x35"},
        (Expect("TuneloopDriftDetected", "29m"),
         Expect("TuneloopDriftDetected", "31m", ({**SCRAPE, "task": "sentiment"},))),
    ),
    Scenario(
        "a failed retraining job and a rollback each fire once the counter grows",
        {f'tuneloop_retrain_failures_total{{{TL}, task="sentiment"}}': "0 0 0 1 1 1 1 1 1 1",
         f'tuneloop_rollbacks_total{{{TL}, task="sentiment"}}': "0 0 0 0 0 1 1 1 1 1"},
        (Expect("TuneloopRetrainFailed", "2m"),
         Expect("TuneloopRetrainFailed", "4m", ({**SCRAPE, "task": "sentiment"},)),
         Expect("TuneloopRolledBack", "4m"),
         Expect("TuneloopRolledBack", "6m", ({**SCRAPE, "task": "sentiment"},))),
    ),
    Scenario(
        "an open incident is reported at once",
        {f'tuneloop_incidents_open{{{TL}, task="sentiment", rule="any"}}': "0 1 1",
         f'tuneloop_incidents_open{{{TL}, task="chat", rule="any"}}': "0 0 0"},
        (Expect("TuneloopIncidentOpen", "0m"),
         Expect("TuneloopIncidentOpen", "1m", ({**SCRAPE, "task": "sentiment", "rule": "any"},))),
    ),
    Scenario(
        "capture spilling warns, dropping is critical",
        {f'tuneloop_capture_records_total{{{TL}, outcome="spilled_queue_full"}}': "0 0 5 5 5",
         f'tuneloop_capture_records_total{{{TL}, outcome="dropped"}}': "0 0 0 0 2",
         f'tuneloop_capture_records_total{{{TL}, outcome="captured"}}': "0+100x5"},
        (Expect("TuneloopCaptureSpilling", "1m"),
         Expect("TuneloopCaptureSpilling", "3m", ({**SCRAPE, "outcome": "spilled_queue_full"},)),
         Expect("TuneloopCaptureDropping", "3m"),
         Expect("TuneloopCaptureDropping", "4m", ({**SCRAPE, "outcome": "dropped"},))),
    ),
    Scenario(
        "evaluations stale after 3 intervals (+10m); a job that keeps succeeding never fires",
        {f'tuneloop_last_success_timestamp_seconds{{{TL}, task="sentiment", schedule="eval"}}': "0x30",
         f'tuneloop_last_success_timestamp_seconds{{{TL}, task="chat", schedule="eval"}}': "0+60x30",
         f'tuneloop_schedule_interval_seconds{{{TL}, task="sentiment", schedule="eval"}}': "60x30",
         f'tuneloop_schedule_interval_seconds{{{TL}, task="chat", schedule="eval"}}': "60x30"},
        (Expect("TuneloopEvaluationStale", "12m"),
         Expect("TuneloopEvaluationStale", "14m", ({"task": "sentiment", "schedule": "eval"},))),
    ),
    Scenario(
        "no scheduler holding the lease for 15m",
        {f"tuneloop_scheduler_lease_held{{{TL}}}": "0x20"},
        (Expect("TuneloopSchedulerNotRunning", "14m"),
         Expect("TuneloopSchedulerNotRunning", "16m", (SCRAPE,))),
    ),
    Scenario(
        "the exporter dies: value alerts resolve by themselves (stale series), the scrape alerts take over",
        {f"tuneloop_engine_up{{{TL}}}": "0 0 0 0 0 stale",
         f"tuneloop_store_up{{{TL}}}": "1 1 1 1 1 stale",
         f'up{{{TL}}}': "1 1 1 1 1 0x15"},
        (Expect("TuneloopEngineDown", "3m", (SCRAPE,)),
         Expect("TuneloopEngineDown", "7m"),
         Expect("TuneloopScrapeDown", "6m"),
         Expect("TuneloopScrapeDown", "8m", (SCRAPE,)),
         Expect("TuneloopMetricsMissing", "9m"),
         Expect("TuneloopMetricsMissing", "11m", ({},)),
         Expect("TuneloopScrapeMissing", "15m")),
    ),
    Scenario(
        "the database is unreadable: the exporter still answers, with tuneloop_store_up 0",
        {f"tuneloop_store_up{{{TL}}}": "1 0x10"},
        (Expect("TuneloopStoreUnreadable", "5m"),
         Expect("TuneloopStoreUnreadable", "7m", (SCRAPE,))),
    ),
    Scenario(
        "no tuneloop target at all (scrape job gone), and vLLM's own target down",
        {'up{job="vllm", instance="gateway:8401"}': "1 0x10"},
        (Expect("TuneloopScrapeMissing", "4m"),
         Expect("TuneloopScrapeMissing", "6m", ({"job": "tuneloop"},)),
         Expect("VllmScrapeDown", "4m", ({"job": "vllm", "instance": "gateway:8401"},))),
    ),
    Scenario(
        "gateway error ratio is 0 (not empty) without errors, and the share of errors once they happen",
        {f'tuneloop_gateway_requests_total{{{TL}, task="sentiment", adapter="sentiment@1", route="chat", '
         f'status="200"}}': "0+60x10",
         f'tuneloop_gateway_requests_total{{{TL}, task="chat", adapter="chat@1", route="chat", status="200"}}':
         "0+30x10",
         f'tuneloop_gateway_requests_total{{{TL}, task="chat", adapter="chat@1", route="chat", status="503"}}':
         "0+10x10",
         f'tuneloop_gateway_request_errors_total{{{TL}, task="chat", adapter="chat@1", route="chat", '
         f'status="503"}}': "0+10x10"},
        (),
        exprs=(("tuneloop:gateway_errors:ratio_rate5m", "6m",
                (('tuneloop:gateway_errors:ratio_rate5m{adapter="sentiment@1", task="sentiment"}', 0.0),
                 ('tuneloop:gateway_errors:ratio_rate5m{adapter="chat@1", task="chat"}', 0.25))),),
    ),
)


def _fill(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)


def _alert(name: str, labels: dict[str, str], runbook_base: str) -> dict[str, Any]:
    rule = next(r for r in ALERT_RULES if r.name == name)
    expected = {**labels, **rule.labels()}
    return {"exp_labels": expected,
            "exp_annotations": {k: _fill(v, expected) for k, v in rule.annotations(runbook_base).items()}}


def promtool_tests(rule_file: str, runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
    tests = []
    for scenario in SCENARIOS:
        test: dict[str, Any] = {
            "name": scenario.name, "interval": "1m",
            "input_series": [{"series": series, "values": values} for series, values in scenario.series.items()],
        }
        if scenario.expect:
            test["alert_rule_test"] = [
                {"eval_time": e.at, "alertname": e.alert,
                 "exp_alerts": [_alert(e.alert, labels, runbook_base) for labels in e.firing]}
                for e in scenario.expect]
        if scenario.exprs:
            test["promql_expr_test"] = [
                {"expr": expr, "eval_time": at,
                 "exp_samples": [{"labels": labels, "value": value} for labels, value in samples]}
                for expr, at, samples in scenario.exprs]
        tests.append(test)
    return {"rule_files": [rule_file], "evaluation_interval": "1m", "tests": tests}
