"""Watching a promotion: for `retrain.watch_s` after it, the new champion is compared with the one it replaced,
and a significant regression rolls the promotion back.

Signals:
- evaluations: both versions on the latest version of every gate set (greedy, so a set the gate already judged
  reproduces the gate's answer; a new version of a set, e.g. fresh labelled traffic, is new evidence), paired;
  a regression is a CI of new - old wholly below 0 with p under 1 - level;
- live error rate: share of 5xx answers of the new champion since the promotion vs the old one's over as long a
  window before it (one-sided Fisher exact test, at least 20 requests each);
- output-label shares (label tasks): the chi-square test of the two versions' answer distributions is reported,
  never acted on: a better model is *expected* to answer differently on drifted traffic, so a shift alone is not a
  regression.

A rollback is an event (`watch_regression` with the reasons, then the swapper's `rollback`), the job's state
`rolled_back`, the `tuneloop_rollbacks_total` counter and a warning in the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from tuneloop.challenger_sets.judged import judged_sets
from tuneloop.config import Config
from tuneloop.errors import EngineUnavailable
from tuneloop.events import record_event
from tuneloop.registry import AdapterVersion, find_alias, get_adapter
from tuneloop.retrain.deployment import Deployment
from tuneloop.retrain.gate import Gate
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import (
    ErrorRateSignal,
    EvaluationSignal,
    Job,
    LabelSharesSignal,
    WatchSignal,
    WatchState,
    WatchStatus,
)
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

log = logging.getLogger(__name__)
MIN_REQUESTS = 20


@dataclass(frozen=True)
class WatchOutcome:
    """What one check of a watched promotion found."""

    job: int
    task: str
    status: WatchStatus
    signals: list[WatchSignal]


class Watch:
    def __init__(self, config: Config, store: Store, deployment: Deployment) -> None:
        self.config, self.store, self.deployment = config, store, deployment
        self.jobs = JobStore(store)

    def watched_job(self, task: str) -> Job | None:
        job = self.jobs.latest(task, "promoted")
        return job if job is not None and job.watch is not None and job.watch.status == "watching" else None

    def check(self, task: str, *, now: datetime | None = None) -> WatchOutcome | None:
        job = self.watched_job(task)
        if job is None or job.watch is None or job.candidate_version is None:
            return None
        watch, now = job.watch, now or datetime.now(UTC)
        champion = find_alias(self.store, task, "champion")
        if champion is None or champion.version != job.candidate_version:
            self.jobs.record_watch(job.id, watch.model_copy(update={"status": "superseded", "checked_at": now}))
            return WatchOutcome(job.id, task, "superseded", [])
        old = get_adapter(self.store, f"{task}@{watch.previous_version}")
        new = get_adapter(self.store, f"{task}@{job.candidate_version}")
        signals: list[WatchSignal] = [*self._evaluations(job, old, new), self._error_rate(job, watch, old, new, now)]
        labels = self._label_shares(job, watch, old, new, now)
        if labels is not None:
            signals.append(labels)
        checked = watch.model_copy(update={"checked_at": now, "signals": signals})
        regressions: list[WatchSignal] = [s for s in signals if s.regression]
        if regressions:
            return self._roll_back(job, checked, regressions)
        status: WatchStatus = "confirmed" if now >= watch.until else "watching"
        self.jobs.record_watch(job.id, checked.model_copy(update={"status": status}))
        if status == "confirmed":
            record_event(self.store, "watch_confirmed", f"{task}: {new.ref} held through its watch", task=task,
                         payload={"job": job.id, "version": new.version})
        return WatchOutcome(job.id, task, status, signals)

    def _roll_back(self, job: Job, checked: WatchState, regressions: list[WatchSignal]) -> WatchOutcome:
        why = "; ".join(s.message for s in regressions)
        log.warning("%s: rolling back %s: %s", job.task, job.candidate_ref, why)
        record_event(self.store, "watch_regression", f"{job.task}: {job.candidate_ref} regressed: {why}",
                     task=job.task, payload={"job": job.id, "version": job.candidate_version,
                                             "signals": [s.kind for s in regressions]})
        restored = self.deployment.rollback(job.task)
        self.jobs.record_watch(job.id, checked.model_copy(update={"status": "rolled_back", "reason": why,
                                                                  "restored": restored.champion}),
                               state="rolled_back")
        return WatchOutcome(job.id, job.task, "rolled_back", checked.signals)

    def _evaluations(self, job: Job, old: AdapterVersion, new: AdapterVersion) -> list[EvaluationSignal]:
        """Both versions, paired, on the latest judged split of every set the gate judged."""
        gate = Gate(self.config, self.store, job.task, self.deployment)
        try:
            self.deployment.endpoint_for(old)
        except EngineUnavailable as exc:
            return [EvaluationSignal(regression=False, message=f"not evaluated: {exc}")]
        runner = gate.runner()
        signals = []
        for judged in judged_sets(self.config, self.store, job.task, job.settings.challenger_sets):
            result, runs = gate.paired(runner, old, new, judged.dataset)
            regression = result.ci_high < 0 and result.p_value < 1 - gate.settings.level
            signals.append(EvaluationSignal(
                regression=regression, dataset=judged.ref, comparison=result, runs=runs,
                message=f"{gate.metric} on {judged.ref}: {new.ref} - {old.ref} = {result.delta:+.4f} "
                        f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}], p={result.p_value:.4f}, n={result.n}"))
        return signals

    def _traffic(self, task: str, version: int, start: datetime, end: datetime) -> list[TrafficRow]:
        with self.store.session() as session:
            return list(session.scalars(select(TrafficRow).where(
                TrafficRow.task == task, TrafficRow.adapter_version == version, TrafficRow.shadow_of.is_(None),
                TrafficRow.created_at >= start, TrafficRow.created_at < end)))

    def _windows(self, task: str, watch: WatchState, old: AdapterVersion, new: AdapterVersion,
                 now: datetime) -> tuple[list[TrafficRow], list[TrafficRow]]:
        span = max(now - watch.promoted_at, timedelta(seconds=1))
        return (self._traffic(task, old.version, watch.promoted_at - span, watch.promoted_at),
                self._traffic(task, new.version, watch.promoted_at, now))

    def _error_rate(self, job: Job, watch: WatchState, old: AdapterVersion, new: AdapterVersion,
                    now: datetime) -> ErrorRateSignal:
        from scipy.stats import fisher_exact

        before, after = self._windows(job.task, watch, old, new, now)
        errors_before = sum(r.status >= 500 for r in before)
        errors_after = sum(r.status >= 500 for r in after)
        signal = ErrorRateSignal(regression=False, message="", old_requests=len(before), old_errors=errors_before,
                                 new_requests=len(after), new_errors=errors_after)
        if len(before) < MIN_REQUESTS or len(after) < MIN_REQUESTS:
            return signal.model_copy(update={"message": f"too few requests to compare error rates ({len(before)} "
                                             f"before, {len(after)} since; {MIN_REQUESTS} each needed)"})
        level = self.config.task(job.task).retrain.gate.level
        p = float(fisher_exact([[errors_after, len(after) - errors_after],
                                [errors_before, len(before) - errors_before]], alternative="greater")[1])
        return signal.model_copy(update={
            "regression": p < 1 - level, "p_value": p,
            "message": f"error rate {errors_after / len(after):.1%} since promotion vs "
                       f"{errors_before / len(before):.1%} before (one-sided Fisher p={p:.4f})"})

    def _label_shares(self, job: Job, watch: WatchState, old: AdapterVersion, new: AdapterVersion,
                      now: datetime) -> LabelSharesSignal | None:
        from scipy.stats import chi2_contingency

        task_config = self.config.task(job.task)
        if task_config.kind != "classification":
            return None
        before, after = self._windows(job.task, watch, old, new, now)
        if len(before) < MIN_REQUESTS or len(after) < MIN_REQUESTS:
            return None
        labels = task_config.labels
        counts = [Counter((r.completion or "").strip() for r in rows if r.status == 200) for rows in (before, after)]
        table = [[c.get(label, 0) for label in labels] for c in counts]
        used = [i for i in range(len(labels)) if table[0][i] + table[1][i] > 0]
        if len(used) < 2:
            return None
        p = float(chi2_contingency([[row[i] for i in used] for row in table])[1])
        return LabelSharesSignal(p_value=p, old={label: counts[0].get(label, 0) for label in labels},
                                 new={label: counts[1].get(label, 0) for label in labels},
                                 message=f"answer label shares differ with chi-square p={p:.4f} (reported, not "
                                         "acted on)")
