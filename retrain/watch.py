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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from tuneloop.retrain.jobs import Job, JobStore
from tuneloop.config import Config
from tuneloop.errors import EngineUnavailable
from tuneloop.events import record_event
from tuneloop.registry import find_alias, get_adapter
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

log = logging.getLogger(__name__)
MIN_REQUESTS = 20


@dataclass
class Signal:
    name: str
    regression: bool
    message: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class WatchOutcome:
    job: int
    task: str
    status: str  # watching | confirmed | rolled_back | superseded
    signals: list[Signal]

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "task": self.task, "status": self.status, "signals": [asdict(s) for s in self.signals]}


class Watch:
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store
        self.jobs = JobStore(store)

    def watched_job(self, task: str) -> Job | None:
        job = self.jobs.latest(task, "promoted")
        return job if job is not None and job.watch.get("status") == "watching" else None

    def check(self, task: str, *, now: datetime | None = None) -> WatchOutcome | None:
        job = self.watched_job(task)
        if job is None:
            return None
        now = now or datetime.now(UTC)
        champion = find_alias(self.store, task, "champion")
        if champion is None or champion.version != job.candidate_version:
            self.jobs.update(job.id, watch={**job.watch, "status": "superseded", "checked_at": now.isoformat()})
            return WatchOutcome(job.id, task, "superseded", [])
        old, new = job.watch["previous_version"], job.candidate_version
        assert new is not None
        signals = [*self._evaluations(task, old, new, job), self._error_rate(task, old, new, job, now)]
        labels = self._label_shares(task, old, new, job, now)
        if labels is not None:
            signals.append(labels)
        regressions = [s for s in signals if s.regression]
        checked = {**job.watch, "checked_at": now.isoformat(), "signals": [asdict(s) for s in signals]}
        if regressions:
            return self._roll_back(job, task, checked, regressions, signals)
        until = datetime.fromisoformat(job.watch["until"])
        status = "confirmed" if now >= until else "watching"
        self.jobs.update(job.id, watch={**checked, "status": status})
        if status == "confirmed":
            record_event(self.store, "watch_confirmed", f"{task}: {task}@{new} held through its watch", task=task,
                         payload={"job": job.id, "version": new})
        return WatchOutcome(job.id, task, status, signals)

    def _roll_back(self, job: Job, task: str, checked: dict[str, Any], regressions: list[Signal],
                   signals: list[Signal]) -> WatchOutcome:
        from tuneloop.serving.promotion import rollback

        why = "; ".join(s.message for s in regressions)
        log.warning("%s: rolling back %s@%s: %s", task, task, job.candidate_version, why)
        record_event(self.store, "watch_regression", f"{task}: {task}@{job.candidate_version} regressed: {why}",
                     task=task, payload={"job": job.id, "version": job.candidate_version,
                                         "signals": [s.name for s in regressions]})
        result = rollback(self.config, self.store, task)
        self.jobs.update(job.id, state="rolled_back", watch={**checked, "status": "rolled_back", "reason": why,
                                                             "restored": result.champion})
        return WatchOutcome(job.id, task, "rolled_back", signals)

    def _evaluations(self, task: str, old: int, new: int, job: Job) -> list[Signal]:
        from tuneloop.challenger_sets.catalog import get_dataset
        from tuneloop.evaluators.targets import ensure_served
        from tuneloop.retrain.gate import Gate

        gate = Gate(self.config, self.store, task)
        settings, metric = gate.settings, gate.metric
        runner = gate.runner()
        old_version, new_version = get_adapter(self.store, f"{task}@{old}"), get_adapter(self.store, f"{task}@{new}")
        try:
            url = ensure_served(self.config, old_version)
        except EngineUnavailable as exc:
            return [Signal("evaluations", False, f"not evaluated: {exc}")]
        signals = []
        for entry in job.watch.get("gate_sets", []):
            dataset = get_dataset(self.store, entry["dataset"].split("@", 1)[0])
            limit = min(dataset.manifest.rows, settings.limit) if settings.limit else None
            result, runs = gate.paired(runner, url, old_version, new_version, dataset, limit)
            regression = result.ci_high < 0 and result.p_value < 1 - settings.level
            signals.append(Signal(
                f"eval:{dataset.manifest.ref}", regression,
                f"{metric} on {dataset.manifest.ref}: {task}@{new} - {task}@{old} = {result.delta:+.4f} "
                f"[{result.ci_low:+.4f}, {result.ci_high:+.4f}], p={result.p_value:.4f}, n={result.n}",
                {"delta": result.delta, "ci_low": result.ci_low, "ci_high": result.ci_high,
                 "p_value": result.p_value, "n": result.n, "runs": runs}))
        return signals

    def _traffic(self, task: str, version: int, start: datetime, end: datetime) -> list[TrafficRow]:
        with self.store.session() as session:
            return list(session.scalars(select(TrafficRow).where(
                TrafficRow.task == task, TrafficRow.adapter_version == version, TrafficRow.shadow_of.is_(None),
                TrafficRow.created_at >= start, TrafficRow.created_at < end)))

    def _windows(self, task: str, old: int, new: int, job: Job,
                 now: datetime) -> tuple[list[TrafficRow], list[TrafficRow]]:
        promoted = datetime.fromisoformat(job.watch["promoted_at"])
        span = max(now - promoted, timedelta(seconds=1))
        return self._traffic(task, old, promoted - span, promoted), self._traffic(task, new, promoted, now)

    def _error_rate(self, task: str, old: int, new: int, job: Job, now: datetime) -> Signal:
        from scipy.stats import fisher_exact

        before, after = self._windows(task, old, new, job, now)
        errors_before = sum(r.status >= 500 for r in before)
        errors_after = sum(r.status >= 500 for r in after)
        facts = {"old_requests": len(before), "old_errors": errors_before, "new_requests": len(after),
                 "new_errors": errors_after}
        if len(before) < MIN_REQUESTS or len(after) < MIN_REQUESTS:
            return Signal("error_rate", False, f"too few requests to compare error rates ({len(before)} before, "
                          f"{len(after)} since; {MIN_REQUESTS} each needed)", facts)
        level = self.config.task(task).retrain.gate.level
        p = float(fisher_exact([[errors_after, len(after) - errors_after],
                                [errors_before, len(before) - errors_before]], alternative="greater")[1])
        regression = p < 1 - level
        return Signal("error_rate", regression,
                      f"error rate {errors_after / len(after):.1%} since promotion vs "
                      f"{errors_before / len(before):.1%} before (one-sided Fisher p={p:.4f})", {**facts, "p_value": p})

    def _label_shares(self, task: str, old: int, new: int, job: Job, now: datetime) -> Signal | None:
        from scipy.stats import chi2_contingency

        task_config = self.config.task(task)
        if task_config.kind != "classification":
            return None
        before, after = self._windows(task, old, new, job, now)
        if len(before) < MIN_REQUESTS or len(after) < MIN_REQUESTS:
            return None
        labels = task_config.labels
        counts = [Counter((r.completion or "").strip() for r in rows if r.status == 200) for rows in (before, after)]
        table = [[c.get(label, 0) for label in labels] for c in counts]
        used = [i for i in range(len(labels)) if table[0][i] + table[1][i] > 0]
        if len(used) < 2:
            return None
        p = float(chi2_contingency([[row[i] for i in used] for row in table])[1])
        shares = {f"{name}:{label}": counts[k].get(label, 0) for k, name in enumerate(("old", "new"))
                  for label in labels}
        return Signal("label_shares", False, f"answer label shares differ with chi-square p={p:.4f} (reported, "
                      "not acted on)", {"p_value": p, **shares})
