"""Prometheus series of retraining: jobs by state, stage durations, the latest gate decision, failures.

A collector over the job store, read at scrape time like the monitor's (monitor/exporter.py); whoever assembles
the process (the gateway's /metrics, `tuneloop exporter`) registers both. Label values are bounded: task names,
states and stages from closed sets, gate-set names without versions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tuneloop.challenger_sets.catalog import short_name
from tuneloop.config import Config
from tuneloop.errors import TuneloopError
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import JOB_STATES, STAGES
from tuneloop.store import Store

log = logging.getLogger(__name__)


class RetrainCollector(Collector):
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.jobs = config, JobStore(store)

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.jobs.counts()
        except TuneloopError as exc:  # the monitor's collector reports the store as down; nothing to add here
            log.warning("retrain metrics could not read the job store: %s", exc)
            return
        by_state = GaugeMetricFamily("tuneloop_retrain_jobs", "Retraining jobs by current state.",
                                     labels=["task", "state"])
        stage = GaugeMetricFamily("tuneloop_retrain_stage_seconds", "Duration of each stage of the task's latest "
                                  "retraining job that ran it.", labels=["task", "stage"])
        gate = GaugeMetricFamily("tuneloop_gate_delta", "Candidate minus champion on the primary metric in the "
                                 "latest gate decision, per gate set.", labels=["task", "dataset", "role", "bound"])
        decision = GaugeMetricFamily("tuneloop_gate_promoted", "1 when the task's latest gate decision promoted, "
                                     "0 when it rejected.", labels=["task"])
        failures = CounterMetricFamily("tuneloop_retrain_failures", "Retraining jobs that failed (crash, kill, "
                                       "error); failed is final, so this only grows.", labels=["task"])
        for task in self.config.tasks:
            for state in JOB_STATES:
                by_state.add_metric([task, state], float(counts.by_state.get((task, state), 0)))
            failures.add_metric([task], float(counts.by_state.get((task, "failed"), 0)))
        for task, stages in counts.latest_stages.items():
            for name in STAGES:
                timing = stages.get(name)
                if timing is not None and timing.seconds is not None:
                    stage.add_metric([task, name], timing.seconds)
        for task, made in counts.latest_decision.items():
            decision.add_metric([task], float(made.promote))
            for check in made.checks:
                if check.comparison is None:
                    continue
                for bound, value in (("point", check.comparison.delta), ("lower", check.comparison.ci_low),
                                     ("upper", check.comparison.ci_high)):
                    gate.add_metric([task, short_name(check.dataset), check.role, bound], value)
        yield from (by_state, stage, gate, decision, failures)
