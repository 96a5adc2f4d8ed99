"""Prometheus exporter: a Collector that reads the latest state from the store at scrape time.

Retraining's own series come from retrain/metrics.py; the process that serves /metrics registers both.

Nothing is kept in process memory, so values survive restarts and are the same whichever process serves them
(the gateway's /metrics, or `tuneloop exporter` where Prometheus cannot reach the gateway). Label values are
bounded: task names, adapter refs of the current champion/candidate (and the base model), dataset names without
version, metric and view names, rule ids, job kinds. No captured text ever becomes a label.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from tuneloop.challenger_sets.catalog import short_name
from tuneloop.challenger_sets.splits import evaluation_set
from tuneloop.config import Config, schedule_seconds
from tuneloop.errors import TuneloopError
from tuneloop.monitor.incidents import IncidentStore
from tuneloop.store import Store
from tuneloop.tables import (
    AdapterVersionRow,
    AliasRow,
    DriftResultRow,
    DriftRunRow,
    EvalRunRow,
    EvalScoreRow,
    EventRow,
    JobRunRow,
    LeaseRow,
    QualityEstimateRow,
)
from tuneloop.timewindow import as_utc

log = logging.getLogger(__name__)

# Event kinds counted as their own `_total` series (and all of them in tuneloop_events_total).
EVENT_COUNTERS = {
    "breach": ("tuneloop_breaches", "Incidents opened by a policy breach."),
    "retrain_started": ("tuneloop_retrains", "Retraining jobs queued."),
    "alias_champion_set": ("tuneloop_promotions", "Adapters made champion."),
    "rollback": ("tuneloop_rollbacks", "Rollbacks to the previous champion."),
}
JOB_KINDS = ("eval", "drift")


def _ts(value: datetime | None) -> float | None:
    return None if value is None else as_utc(value).timestamp()


class MonitorCollector(Collector):
    """Eval scores, drift, aliases, incidents, events and scheduler runs, from the store, per scrape."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store

    def collect(self) -> Iterator[Any]:
        started = time.perf_counter()
        up = GaugeMetricFamily("tuneloop_store_up", "1 when the exporter could read the store on this scrape.")
        try:
            families = list(self._families())
        except TuneloopError as exc:
            log.warning("exporter could not read the store: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families
        took = GaugeMetricFamily("tuneloop_exporter_collect_seconds", "Time to read the store for this scrape.")
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _families(self) -> Iterator[Any]:
        with self.store.session() as session:
            aliases = {(task, alias): f"{task}@{version}" for task, alias, version in session.execute(
                select(AliasRow.task, AliasRow.alias, AdapterVersionRow.version)
                .join(AdapterVersionRow, AdapterVersionRow.id == AliasRow.adapter_id))}
            yield from self._aliases(aliases)
            yield from self._evals(session, set(aliases.values()))
            yield from self._drift(session)
            yield from self._estimates(session)
            yield from self._events(session)
            yield from self._jobs(session)
        yield from self._incidents()
        yield from self._settings()

    def _settings(self) -> Iterator[Any]:
        """Configured floors and schedules, so alert rules compare against the config instead of copies of it."""
        floor = GaugeMetricFamily("tuneloop_quality_floor", "Policy floor of a metric on a dataset (the dataset "
                                  "label is the set the champion is evaluated on, its judge split once one exists).",
                                  labels=["task", "dataset", "metric"])
        interval = GaugeMetricFamily("tuneloop_schedule_interval_seconds", "Interval of a task's scheduled eval or "
                                     "drift check (for a cron schedule, the gap between its next two runs).",
                                     labels=["task", "schedule"])
        primary = GaugeMetricFamily("tuneloop_task_primary_metric", "1 for each task's primary metric (what alerts "
                                    "and promotion decisions use); join on (task, metric).",
                                    labels=["task", "metric"])
        for task, task_config in self.config.tasks.items():
            primary.add_metric([task, task_config.primary_metric], 1.0)
            for rule in task_config.policy.floors:
                dataset = short_name(evaluation_set(self.store, task, rule.dataset))
                floor.add_metric([task, dataset, rule.metric], rule.min)
            for job in JOB_KINDS:
                seconds = schedule_seconds(getattr(task_config.schedule, job))
                if seconds is not None:
                    interval.add_metric([task, job], seconds)
        yield from (primary, floor, interval)

    def _aliases(self, aliases: dict[tuple[str, str], str]) -> Iterator[Any]:
        info = GaugeMetricFamily("tuneloop_adapter_info", "1 for each task's champion and candidate adapter.",
                                 labels=["task", "alias", "adapter"])
        version = GaugeMetricFamily("tuneloop_champion_version", "Version number of each task's champion.",
                                    labels=["task"])
        for (task, alias), ref in sorted(aliases.items()):
            info.add_metric([task, alias, ref], 1.0)
            if alias == "champion":
                version.add_metric([task], float(ref.rsplit("@", 1)[1]))
        yield info
        yield version

    def _evals(self, session: Any, current_refs: set[str]) -> Iterator[Any]:
        labels = ["task", "adapter", "dataset", "metric"]
        score = GaugeMetricFamily("tuneloop_eval_score", "Latest score of an adapter on a dataset.", labels=labels)
        low = GaugeMetricFamily("tuneloop_eval_score_ci_lower", "Lower bound of the score's confidence interval.",
                                labels=labels)
        high = GaugeMetricFamily("tuneloop_eval_score_ci_upper", "Upper bound of the score's confidence interval.",
                                 labels=labels)
        examples = GaugeMetricFamily("tuneloop_eval_examples", "Examples the latest score is over.",
                                     labels=["task", "adapter", "dataset"])
        finished = GaugeMetricFamily("tuneloop_eval_finished_timestamp_seconds", "When the latest run finished.",
                                     labels=["task", "adapter", "dataset"])
        sliced = GaugeMetricFamily("tuneloop_eval_slice_score", "Latest score on one slice of a dataset (the "
                                   "task's configured `slice_by` fields; slices under `min_slice_size` are not "
                                   "scored).", labels=[*labels, "slice_field", "slice"])
        base = self.config.base_model.name
        latest: dict[tuple[str, str, str], Any] = {}
        # Only the columns needed, not the runs' settings/timings JSON: this runs on every scrape.
        for run in session.execute(select(EvalRunRow.id, EvalRunRow.task, EvalRunRow.model,
                                          EvalRunRow.adapter_version, EvalRunRow.dataset_ref,
                                          EvalRunRow.n_examples, EvalRunRow.finished_at)
                                   .where(EvalRunRow.status == "complete").order_by(EvalRunRow.id)):
            adapter = run.model if run.adapter_version is not None else "base"
            if run.adapter_version is not None and run.model not in current_refs:
                continue
            if run.adapter_version is None and run.model != base:
                continue
            latest[(run.task, adapter, short_name(run.dataset_ref))] = run
        by_run = {run.id: key for key, run in latest.items()}
        if by_run:
            for row in session.scalars(select(EvalScoreRow).where(EvalScoreRow.run_id.in_(by_run))):
                series = [*by_run[row.run_id], row.metric]
                if row.slice_field is not None:
                    sliced.add_metric([*series, row.slice_field, row.slice_value or ""], row.value)
                    continue
                score.add_metric(series, row.value)
                low.add_metric(series, row.ci_low)
                high.add_metric(series, row.ci_high)
        for key, run in latest.items():
            examples.add_metric(list(key), float(run.n_examples))
            stamp = _ts(run.finished_at)
            if stamp is not None:
                finished.add_metric(list(key), stamp)
        yield from (score, low, high, examples, finished, sliced)

    def _drift(self, session: Any) -> Iterator[Any]:
        detected = GaugeMetricFamily("tuneloop_drift_detected", "1 when the latest drift check of the task "
                                     "flagged drift (any view over its calibrated threshold).", labels=["task"])
        view_detected = GaugeMetricFamily("tuneloop_drift_view_detected", "1 when the view crossed its threshold "
                                          "in the latest check.", labels=["task", "view"])
        score = GaugeMetricFamily("tuneloop_drift_score", "Latest drift statistic of a view.", labels=["task", "view"])
        threshold = GaugeMetricFamily("tuneloop_drift_threshold", "Calibrated threshold of the view at this window "
                                      "size.", labels=["task", "view"])
        window = GaugeMetricFamily("tuneloop_drift_window_prompts", "Captured prompts in the latest check.",
                                   labels=["task"])
        budget = GaugeMetricFamily("tuneloop_drift_false_alarm_rate", "False-alarm budget of the task's verdict "
                                   "(configured) and the rate measured on no-drift windows.", labels=["task", "kind"])
        last = GaugeMetricFamily("tuneloop_drift_last_check_timestamp_seconds", "When the latest check ran.",
                                 labels=["task"])
        checks = CounterMetricFamily("tuneloop_drift_checks", "Drift checks stored, by verdict.",
                                     labels=["task", "drifted"])
        report = GaugeMetricFamily("tuneloop_drift_report_run_id", "Id of the task's latest drift check with a "
                                   "saved Evidently report, served at /reports/drift/<task>/drift-<id>.html.",
                                   labels=["task"])
        latest_ids = [row_id for (row_id,) in session.execute(
            select(func.max(DriftRunRow.id)).group_by(DriftRunRow.task))]
        runs = {r.id: r for r in session.scalars(select(DriftRunRow).where(DriftRunRow.id.in_(latest_ids)))}
        for run in runs.values():
            detected.add_metric([run.task], float(run.drifted))
            window.add_metric([run.task], float(run.n_current))
            budget.add_metric([run.task, "configured"], run.false_alarm_rate)
            measured = (run.settings or {}).get("measured_false_alarm_rate")
            if measured is not None:
                budget.add_metric([run.task, "measured"], float(measured))
            stamp = _ts(run.created_at)
            if stamp is not None:
                last.add_metric([run.task], stamp)
        if runs:
            for r in session.scalars(select(DriftResultRow).where(DriftResultRow.run_id.in_(runs))):
                if r.status != "ok" or r.score is None:
                    continue
                task = runs[r.run_id].task
                score.add_metric([task, r.view], r.score)
                view_detected.add_metric([task, r.view], float(r.drifted))
                if r.threshold is not None:
                    threshold.add_metric([task, r.view], r.threshold)
        for task, drifted, count in session.execute(
                select(DriftRunRow.task, DriftRunRow.drifted, func.count()).group_by(DriftRunRow.task,
                                                                                      DriftRunRow.drifted)):
            checks.add_metric([task, "true" if drifted else "false"], float(count))
        for task, run_id in session.execute(select(DriftRunRow.task, func.max(DriftRunRow.id))
                                            .where(DriftRunRow.report_path.is_not(None)).group_by(DriftRunRow.task)):
            report.add_metric([task], float(run_id))
        yield from (detected, view_detected, score, threshold, window, budget, last, checks, report)

    def _estimates(self, session: Any) -> Iterator[Any]:
        """The latest estimate of each (task, metric, method) on live traffic (monitor/estimate.py)."""
        labels = ["task", "adapter", "metric", "method"]
        value = GaugeMetricFamily("tuneloop_quality_estimate", "Latest estimate of a task's metric on its last "
                                  "window of served answers: label_free (calibrated confidence only), "
                                  "prediction_powered (corrected by the window's labels) or labels_only.",
                                  labels=labels)
        low = GaugeMetricFamily("tuneloop_quality_estimate_ci_lower", "Lower bound of the estimate's interval.",
                                labels=labels)
        high = GaugeMetricFamily("tuneloop_quality_estimate_ci_upper", "Upper bound of the estimate's interval.",
                                 labels=labels)
        labelled = GaugeMetricFamily("tuneloop_quality_estimate_labelled_answers", "Answers of the window with a "
                                     "label (feedback) when the estimate was made.", labels=labels)
        unlabelled = GaugeMetricFamily("tuneloop_quality_estimate_unlabelled_answers", "Answers of the window "
                                       "without a label.", labels=labels)
        stamp = GaugeMetricFamily("tuneloop_quality_estimate_timestamp_seconds", "When the estimate was made.",
                                  labels=labels)
        latest = select(func.max(QualityEstimateRow.id)).group_by(
            QualityEstimateRow.task, QualityEstimateRow.metric, QualityEstimateRow.method)
        for row in session.scalars(select(QualityEstimateRow).where(QualityEstimateRow.id.in_(latest))):
            key = [row.task, "base" if row.adapter_version is None else f"{row.task}@{row.adapter_version}",
                   row.metric, row.method]
            labelled.add_metric(key, float(row.n_labelled))
            unlabelled.add_metric(key, float(row.n_unlabelled))
            when = _ts(row.created_at)
            if when is not None:
                stamp.add_metric(key, when)
            if row.value is None or row.ci_lower is None or row.ci_upper is None:
                continue  # no labels for this method: a missing series, not a made-up number
            value.add_metric(key, row.value)
            low.add_metric(key, row.ci_lower)
            high.add_metric(key, row.ci_upper)
        yield from (value, low, high, labelled, unlabelled, stamp)

    def _incidents(self) -> Iterator[Any]:
        per_rule = GaugeMetricFamily("tuneloop_incidents_open", "Open incidents by task and rule.",
                                     labels=["task", "rule"])
        totals: dict[str, int] = defaultdict(int)
        for (task, rule), n in sorted(IncidentStore(self.store).open_counts().items()):
            per_rule.add_metric([task, str(rule)], float(n))
            totals[task] += n
        for task in self.config.tasks:
            per_rule.add_metric([task, "any"], float(totals[task]))
        yield per_rule

    def _events(self, session: Any) -> Iterator[Any]:
        rows = list(session.execute(select(EventRow.kind, EventRow.task, func.count())
                                    .group_by(EventRow.kind, EventRow.task)))
        every = CounterMetricFamily("tuneloop_events", "Events recorded, by kind.", labels=["task", "kind"])
        named = {kind: CounterMetricFamily(name, help_text, labels=["task"])
                 for kind, (name, help_text) in EVENT_COUNTERS.items()}
        seen: dict[str, set[str]] = defaultdict(set)
        for kind, task, count in rows:
            every.add_metric([task or "", kind], float(count))
            if kind in named and task:
                named[kind].add_metric([task], float(count))
                seen[kind].add(task)
        for kind, family in named.items():  # zeros, so rate() and increase() work from the first event on
            for task in self.config.tasks:
                if task not in seen[kind]:
                    family.add_metric([task], 0.0)
        yield every
        yield from named.values()

    def _jobs(self, session: Any) -> Iterator[Any]:
        runs = CounterMetricFamily("tuneloop_scheduler_job_runs", "Scheduled job runs by outcome.",
                                   labels=["task", "schedule", "status"])
        failures = CounterMetricFamily("tuneloop_scheduler_job_failures", "Scheduled job runs that failed.",
                                       labels=["task", "schedule"])
        last_ok = GaugeMetricFamily("tuneloop_last_success_timestamp_seconds", "Last successful eval or drift run "
                                    "of the task (scheduled or by hand).", labels=["task", "schedule"])
        age = GaugeMetricFamily("tuneloop_seconds_since_last_success", "Seconds since the last successful eval or "
                                "drift run of the task.", labels=["task", "schedule"])
        lease = GaugeMetricFamily("tuneloop_scheduler_lease_held", "1 while some `tuneloop run` holds the "
                                  "single-scheduler lease.")
        counts: dict[tuple[str, str, str], int] = {}
        for job, task, status, count in session.execute(
                select(JobRunRow.job, JobRunRow.task, JobRunRow.status, func.count())
                .group_by(JobRunRow.job, JobRunRow.task, JobRunRow.status)):
            counts[(task, job, status)] = count
        for task in self.config.tasks:
            for job in JOB_KINDS:
                for status in ("ok", "failed"):
                    runs.add_metric([task, job, status], float(counts.get((task, job, status), 0)))
                failures.add_metric([task, job], float(counts.get((task, job, "failed"), 0)))
        latest: dict[tuple[str, str], float] = {}
        for job, task, finished in session.execute(
                select(JobRunRow.job, JobRunRow.task, func.max(JobRunRow.finished_at))
                .where(JobRunRow.status == "ok").group_by(JobRunRow.job, JobRunRow.task)):
            stamp = _ts(finished)
            if stamp is not None:
                latest[(task, job)] = stamp
        for task, created in session.execute(select(DriftRunRow.task, func.max(DriftRunRow.created_at))
                                             .group_by(DriftRunRow.task)):
            stamp = _ts(created)
            if stamp is not None:
                latest[(task, "drift")] = max(stamp, latest.get((task, "drift"), 0.0))
        for task, finished in session.execute(select(EvalRunRow.task, func.max(EvalRunRow.finished_at))
                                              .where(EvalRunRow.status == "complete").group_by(EvalRunRow.task)):
            stamp = _ts(finished)
            if stamp is not None:
                latest[(task, "eval")] = max(stamp, latest.get((task, "eval"), 0.0))
        now = time.time()
        for (task, job), stamp in sorted(latest.items()):
            last_ok.add_metric([task, job], stamp)
            age.add_metric([task, job], max(0.0, now - stamp))
        lease_row = session.get(LeaseRow, "scheduler")
        held = lease_row is not None and (_ts(lease_row.expires_at) or 0) > now
        lease.add_metric([], float(held))
        yield from (runs, failures, last_ok, age, lease)
