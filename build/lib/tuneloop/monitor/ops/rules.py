"""Prometheus recording and alert rules, one definition rendered for Prometheus and for Grafana-managed alerting.

Why both: operators who route alerts through Alertmanager load the Prometheus rules; teams that alert from
Grafana provision the same rules there. Rendering both from one list keeps them equivalent by construction.

Alert design:
- quality is CI-aware: the floor breach that starts retraining needs the whole confidence interval of the
  champion's score under the floor; a point estimate under it with the CI still reaching it only warns;
- every value alert goes quiet when its series go stale (the exporter died), so `up == 0` and `absent(...)`
  alerts cover the scrape itself;
- alerts with `action: retrain` are the ones Alertmanager routes to tuneloop's webhook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["critical", "warning", "info"]
RUNBOOK_BASE = "docs/runbooks.md"


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_: str
    severity: Severity
    summary: str
    description: str
    retrain: bool = False
    group: str = "tuneloop-alerts"
    extra_labels: dict[str, str] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        return self.name.lower()

    def labels(self) -> dict[str, str]:
        labels = {"severity": self.severity, **self.extra_labels}
        if self.retrain:
            labels["action"] = "retrain"
        return labels

    def annotations(self, runbook_base: str) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description,
                "runbook_url": f"{runbook_base}#{self.anchor}"}


_CHAMPION = 'on(task, adapter) group_left() tuneloop_adapter_info{alias="champion"}'
_PRIMARY = "on(task, metric) group_left() tuneloop_task_primary_metric"

RECORDING_RULES: tuple[RecordingRule, ...] = (
    RecordingRule("tuneloop:champion_eval_score", f"tuneloop_eval_score * {_CHAMPION}"),
    RecordingRule("tuneloop:champion_eval_score_ci_lower", f"tuneloop_eval_score_ci_lower * {_CHAMPION}"),
    RecordingRule("tuneloop:champion_eval_score_ci_upper", f"tuneloop_eval_score_ci_upper * {_CHAMPION}"),
    RecordingRule("tuneloop:champion_primary_score", f"tuneloop:champion_eval_score * {_PRIMARY}"),
    RecordingRule("tuneloop:champion_primary_score_ci_lower", f"tuneloop:champion_eval_score_ci_lower * {_PRIMARY}"),
    RecordingRule("tuneloop:champion_primary_score_ci_upper", f"tuneloop:champion_eval_score_ci_upper * {_PRIMARY}"),
    RecordingRule("tuneloop:gateway_requests:rate5m",
                  "sum by (task, adapter) (rate(tuneloop_gateway_requests_total[5m]))"),
    # Errors or zero: the error counter has no series until the first error, and a ratio panel should say 0.
    RecordingRule("tuneloop:gateway_errors:ratio_rate5m",
                  "(sum by (task, adapter) (rate(tuneloop_gateway_request_errors_total[5m])) "
                  "or sum by (task, adapter) (rate(tuneloop_gateway_requests_total[5m])) * 0) "
                  "/ sum by (task, adapter) (rate(tuneloop_gateway_requests_total[5m]))"),
    *(RecordingRule(f"tuneloop:gateway_latency_seconds:p{q}_5m",
                    f"histogram_quantile(0.{q}, sum by (task, adapter, le) "
                    "(rate(tuneloop_gateway_request_duration_seconds_bucket[5m])))") for q in ("50", "95", "99")),
)

ALERT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        "TuneloopQualityBelowFloor",
        "tuneloop:champion_eval_score_ci_upper < on(task, dataset, metric) group_left() tuneloop_quality_floor",
        "5m", "critical",
        "{{ $labels.task }}: {{ $labels.metric }} on {{ $labels.dataset }} is below its floor",
        "The upper confidence bound of {{ $labels.adapter }}'s {{ $labels.metric }} on {{ $labels.dataset }} is "
        "under the policy floor: the champion is significantly worse than the floor. Alertmanager sends this to "
        "tuneloop's webhook, which starts (or joins) a retraining job.", retrain=True),
    AlertRule(
        "TuneloopQualityNearFloor",
        "(tuneloop:champion_eval_score < on(task, dataset, metric) group_left() tuneloop_quality_floor) "
        "and on(task, adapter, dataset, metric) "
        "(tuneloop:champion_eval_score_ci_upper >= on(task, dataset, metric) group_left() tuneloop_quality_floor)",
        "15m", "warning",
        "{{ $labels.task }}: {{ $labels.metric }} on {{ $labels.dataset }} is under its floor, within noise",
        "The point estimate is under the floor but the confidence interval still reaches it: not yet a "
        "significant breach. A larger eval (schedule.eval_limit) would decide it."),
    AlertRule(
        "TuneloopDriftDetected", "tuneloop_drift_detected == 1", "30m", "warning",
        "{{ $labels.task }}: captured inputs drifted from the training inputs",
        "The task's drift verdict (any view over its calibrated threshold) has held for 30 minutes, i.e. over "
        "several checks at the default 15m schedule. Routed to tuneloop's webhook to start retraining.",
        retrain=True),
    AlertRule(
        "TuneloopIncidentOpen", 'tuneloop_incidents_open{rule="any"} > 0', "0m", "info",
        "{{ $labels.task }}: a policy incident is open",
        "tuneloop's own policy opened an incident (it starts retraining itself when retrain.on_incident is on); "
        "see `tuneloop incidents`."),
    AlertRule(
        "TuneloopRetrainFailed", "increase(tuneloop_retrain_failures_total[1h]) > 0", "0m", "warning",
        "{{ $labels.task }}: a retraining job failed",
        "A retraining job crashed, was killed or errored; the champion kept serving. `tuneloop jobs list "
        "--task {{ $labels.task }}` shows the reason."),
    AlertRule(
        "TuneloopRolledBack", "increase(tuneloop_rollbacks_total[1h]) > 0", "0m", "warning",
        "{{ $labels.task }}: the champion was rolled back",
        "A promoted adapter regressed during its watch period (or a person rolled it back); the previous champion "
        "serves again."),
    AlertRule(
        "TuneloopEngineDown", "tuneloop_engine_up == 0", "2m", "critical",
        "vLLM behind the gateway does not answer its health check",
        "The gateway's supervisor restarts vLLM on its own; if this holds, it cannot (see the gateway log and "
        "tuneloop_engine_restarts_total)."),
    AlertRule(
        "TuneloopCaptureSpilling", 'increase(tuneloop_capture_records_total{outcome=~"spilled_.*"}[10m]) > 0',
        "0m", "warning", "Captured traffic is spilling to disk",
        "The capture queue was full or the database failed; records wait in the spill file and are replayed "
        "when the database answers again."),
    AlertRule(
        "TuneloopCaptureDropping", 'increase(tuneloop_capture_records_total{outcome="dropped"}[10m]) > 0',
        "0m", "critical", "Captured traffic is being dropped",
        "Records were lost: the spill file could not take them. Drift checks and feedback lose that traffic."),
    AlertRule(
        "TuneloopEvaluationStale",
        "time() - tuneloop_last_success_timestamp_seconds "
        "> on(task, schedule) 3 * tuneloop_schedule_interval_seconds",
        "10m", "warning",
        "{{ $labels.task }}: no successful {{ $labels.schedule }} run in 3 schedule intervals",
        "The scheduler (`tuneloop run`) is down, not holding its lease, or the job keeps failing "
        "(tuneloop_scheduler_job_failures_total)."),
    AlertRule(
        "TuneloopSchedulerNotRunning", "tuneloop_scheduler_lease_held == 0", "15m", "warning",
        "No `tuneloop run` holds the scheduler lease",
        "Scheduled evaluations and drift checks are not running."),
    AlertRule(
        "TuneloopStoreUnreadable", "tuneloop_store_up == 0", "5m", "critical",
        "tuneloop's exporter cannot read its database",
        "Every tuneloop_* value series is missing while this fires; quality and drift alerts cannot fire."),
    AlertRule(
        "TuneloopScrapeDown", 'up{job="tuneloop"} == 0', "2m", "critical",
        "Prometheus cannot scrape tuneloop",
        "The gateway (or `tuneloop exporter`) is down or unreachable. Its series go stale, so every value alert "
        "resolves by itself: this alert is what is left."),
    AlertRule(
        "TuneloopScrapeMissing", 'absent(up{job="tuneloop"})', "5m", "critical",
        "Prometheus has no tuneloop target",
        "The scrape job is gone (service discovery or a config change): no tuneloop alert can fire."),
    AlertRule(
        "TuneloopMetricsMissing", "absent(tuneloop_store_up)", "5m", "critical",
        "No tuneloop metrics in Prometheus",
        "tuneloop_store_up is exported on every scrape; when it is absent, the exporter is down or not scraped."),
    AlertRule(
        "VllmScrapeDown", 'up{job="vllm"} == 0', "2m", "critical",
        "Prometheus cannot scrape vLLM's metrics",
        "vLLM's own /metrics is unreachable: the engine is down or restarting."),
)


def prometheus_rules(runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
    """The rule file Prometheus loads (`rule_files`)."""
    alerts = [{"alert": a.name, "expr": a.expr, "for": a.for_, "labels": a.labels(),
               "annotations": a.annotations(runbook_base)} for a in ALERT_RULES]
    return {"groups": [
        {"name": "tuneloop-recording", "interval": "30s",
         "rules": [{"record": r.record, "expr": r.expr} for r in RECORDING_RULES]},
        {"name": "tuneloop-alerts", "interval": "30s", "rules": alerts},
    ]}


def grafana_alert_rules(datasource_uid: str, runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
    """Grafana file provisioning of the same alerts.

    A Prometheus alert fires for each series its expression returns; Grafana's equivalent queries
    `(expr) * 0 + 1` (1 for each such series, labels kept) and fires when that is > 0, with no data = OK.
    """
    rules = []
    for alert in ALERT_RULES:
        rules.append({
            "uid": f"tuneloop-{alert.anchor}"[:40],
            "title": alert.name,
            "condition": "C",
            "data": [
                {"refId": "A", "relativeTimeRange": {"from": 600, "to": 0}, "datasourceUid": datasource_uid,
                 "model": {"refId": "A", "expr": f"({alert.expr}) * 0 + 1", "instant": True,
                           "intervalMs": 1000, "maxDataPoints": 43200}},
                {"refId": "C", "datasourceUid": "__expr__",
                 "model": {"refId": "C", "type": "threshold", "expression": "A",
                           "conditions": [{"evaluator": {"type": "gt", "params": [0]}}]}},
            ],
            "noDataState": "OK",
            "execErrState": "Error",
            "for": alert.for_,
            "labels": alert.labels(),
            "annotations": alert.annotations(runbook_base),
            "isPaused": False,
        })
    return {"apiVersion": 1, "groups": [{"orgId": 1, "name": "tuneloop", "folder": "tuneloop",
                                         "interval": "1m", "rules": rules}]}
