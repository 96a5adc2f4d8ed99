"""Threshold policy: turn eval scores and drift verdicts into incidents, one open incident per task and rule.

Rules (tasks.<name>.policy):
- floor:   the champion's latest score of a metric on a dataset is below an absolute value;
- drop:    the champion scores worse than its own baseline (its first complete run on that dataset) and the CI of
           the drop lies wholly below -tolerance: paired bootstrap when both runs scored the same examples,
           independent bootstrap of the two runs when the dataset got a new version; a drop inside the noise is no
           breach;
- drift:   the last N drift checks of the task were all flagged.

A rule with no data yet is left alone. A breach opens an incident (event `breach`) unless one is open already
(then it is only refreshed) or the same rule resolved less than `cooldown_s` ago; when the rule holds again the
incident is resolved (event `incident_resolved`). The next issue starts retraining from open incidents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import select

from tuneloop.challenger_sets.catalog import qualify
from tuneloop.challenger_sets.catalog import short_name as _short
from tuneloop.challenger_sets.splits import evaluation_set
from tuneloop.config import Config, TaskConfig
from tuneloop.events import record_event
from tuneloop.registry import find_alias
from tuneloop.store import Store
from tuneloop.tables import DriftRunRow, EvalRunRow, EvalScoreRow, IncidentRow
from tuneloop.timewindow import as_utc

log = logging.getLogger(__name__)

Verdict = Literal["breach", "holds", "no_data"]


@dataclass
class RuleCheck:
    rule: str
    verdict: Verdict
    message: str
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyOutcome:
    task: str
    checks: list[RuleCheck]
    opened: list[int] = field(default_factory=list)
    opened_by_rule: dict[str, int] = field(default_factory=dict)
    refreshed: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Incident:
    id: int
    task: str
    rule: str
    status: str
    opened_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    breaches: int
    detail: dict[str, Any]


class Policy:
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store

    # Rules --------------------------------------------------------------------------------------------------

    def check_rules(self, task: str) -> list[RuleCheck]:
        task_config = self.config.task(task)
        champion = find_alias(self.store, task, "champion")
        checks: list[RuleCheck] = []
        for floor in task_config.policy.floors:
            rule = f"floor:{floor.metric}:{_short(floor.dataset)}"
            if champion is None:
                checks.append(RuleCheck(rule, "no_data", f"task '{task}' has no champion"))
                continue
            latest = self._runs(task, champion.version, floor.dataset)
            score = self._score(latest[-1].id, floor.metric) if latest else None
            if score is None:
                checks.append(RuleCheck(rule, "no_data", f"no scored eval of {champion.ref} on {floor.dataset}"))
                continue
            breach = score.value < floor.min
            checks.append(RuleCheck(rule, "breach" if breach else "holds",
                                    f"{floor.metric} of {champion.ref} on {latest[-1].dataset_ref} is "
                                    f"{score.value:.4f} [{score.ci_low:.4f}, {score.ci_high:.4f}]; floor {floor.min}",
                                    {"value": score.value, "ci_low": score.ci_low, "ci_high": score.ci_high,
                                     "min": floor.min, "run_id": latest[-1].id, "adapter": champion.ref}))
        if task_config.policy.drop is not None:
            checks.extend(self._drop_checks(task, task_config, champion))
        if task_config.policy.drift_windows > 0:
            checks.append(self._drift_check(task, task_config.policy.drift_windows))
        return checks

    def _drop_checks(self, task: str, task_config: TaskConfig, champion: Any) -> list[RuleCheck]:
        rule_config = task_config.policy.drop
        assert rule_config is not None
        metric = rule_config.metric or task_config.primary_metric
        datasets = rule_config.datasets or [task_config.heldout_dataset, *task_config.challenger_datasets]
        checks = []
        for dataset in datasets:
            rule = f"drop:{metric}:{_short(dataset)}"
            runs = self._runs(task, champion.version, dataset) if champion else []
            if len(runs) < 2:
                checks.append(RuleCheck(rule, "no_data", f"need a baseline and a later eval of the champion on "
                                                         f"{dataset}; have {len(runs)}"))
                continue
            base, current = runs[0], runs[-1]
            if base.dataset_sha256 == current.dataset_sha256:
                checks.append(RuleCheck(rule, "holds", f"{champion.ref} scored the same examples of {dataset} "
                                                       "again: greedy answers cannot have dropped"))
                continue
            interval = self._difference(task_config, base, current, metric)
            if interval is None:
                checks.append(RuleCheck(rule, "no_data", f"runs {base.id}/{current.id} lack stored statistics"))
                continue
            delta, low, high, method = interval
            breach = high < -rule_config.tolerance
            checks.append(RuleCheck(
                rule, "breach" if breach else "holds",
                f"{metric} of {champion.ref} on {dataset}: {delta:+.4f} vs its baseline (run {base.id} -> "
                f"{current.id}), {self.config.evaluation.confidence_level:.0%} CI [{low:+.4f}, {high:+.4f}] "
                f"({method})", {"delta": delta, "ci_low": low, "ci_high": high, "method": method,
                                "baseline_run": base.id, "current_run": current.id, "adapter": champion.ref}))
        return checks

    def _difference(self, task_config: TaskConfig, base: EvalRunRow, current: EvalRunRow,
                    metric: str) -> tuple[float, float, float, str] | None:
        """current - baseline with a bootstrap CI: the two runs scored different examples, so independently."""
        from tuneloop.challenger_sets.catalog import get_dataset
        from tuneloop.evaluators.runs import RunStore
        from tuneloop.evaluators.statistics import bootstrap_draws
        from tuneloop.errors import TuneloopError

        runs = RunStore(self.store)
        settings = self.config.evaluation
        try:
            tables = []
            for run in (base, current):
                ids = [e.id for e in get_dataset(self.store, run.dataset_ref).load()[:run.n_examples]]
                tables.append(runs.stored_tables(run.id, ids, task_config.labels)[metric])
        except (TuneloopError, KeyError):
            return None
        draws_base = bootstrap_draws(tables[0], resamples=settings.bootstrap_resamples, seed=settings.seed)
        draws_current = bootstrap_draws(tables[1], resamples=settings.bootstrap_resamples, seed=settings.seed + 1)
        diffs = draws_current - draws_base
        alpha = (1 - settings.confidence_level) / 2
        low, high = np.quantile(diffs, [alpha, 1 - alpha])
        return tables[1].value() - tables[0].value(), float(low), float(high), "independent bootstrap"

    def _drift_check(self, task: str, windows: int) -> RuleCheck:
        rule = "drift"
        with self.store.session() as session:
            recent = list(session.scalars(select(DriftRunRow).where(DriftRunRow.task == task)
                                          .order_by(DriftRunRow.id.desc()).limit(windows)))
        if not recent:
            return RuleCheck(rule, "no_data", f"no drift check of '{task}' yet")
        flagged = [r.drifted for r in recent]
        facts = {"runs": [r.id for r in recent], "flagged": flagged, "needed": windows}
        if len(recent) == windows and all(flagged):
            return RuleCheck(rule, "breach", f"the last {windows} drift checks of '{task}' all flagged drift", facts)
        if not flagged[0]:
            return RuleCheck(rule, "holds", f"the latest drift check of '{task}' (run {recent[0].id}) is quiet", facts)
        return RuleCheck(rule, "no_data", f"{sum(flagged)} of the last {len(recent)} drift checks flagged; "
                                          f"{windows} consecutive needed", facts)

    def _runs(self, task: str, version: int, dataset: str) -> list[EvalRunRow]:
        """The version's complete runs on `dataset`, or on its judge split once one exists (retraining may have
        used the rest)."""
        runs = self._runs_on(task, version, qualify(task, dataset))
        split = evaluation_set(self.store, task, dataset)
        return self._runs_on(task, version, split) or runs

    def _runs_on(self, task: str, version: int, name: str) -> list[EvalRunRow]:
        with self.store.session() as session:
            return list(session.scalars(select(EvalRunRow).where(
                EvalRunRow.task == task, EvalRunRow.adapter_version == version, EvalRunRow.status == "complete",
                EvalRunRow.dataset_ref.startswith(name + "@")).order_by(EvalRunRow.finished_at, EvalRunRow.id)))

    def _score(self, run_id: int, metric: str) -> EvalScoreRow | None:
        with self.store.session() as session:
            return session.scalars(select(EvalScoreRow).where(
                EvalScoreRow.run_id == run_id, EvalScoreRow.metric == metric,
                EvalScoreRow.slice_field.is_(None))).first()

    # Incidents ----------------------------------------------------------------------------------------------

    def evaluate(self, task: str, *, now: datetime | None = None) -> PolicyOutcome:
        """Check every rule of the task and open, refresh or resolve its incidents accordingly."""
        now = now or datetime.now(UTC)
        cooldown = timedelta(seconds=self.config.task(task).policy.cooldown_s)
        outcome = PolicyOutcome(task=task, checks=self.check_rules(task))
        events: list[tuple[str, str, dict[str, Any]]] = []
        with self.store.session() as session:
            for check in outcome.checks:
                if check.verdict == "no_data":
                    continue
                open_row = session.scalars(select(IncidentRow).where(
                    IncidentRow.task == task, IncidentRow.rule == check.rule, IncidentRow.status == "open")).first()
                if check.verdict == "holds":
                    if open_row is not None:
                        open_row.status, open_row.resolved_at = "resolved", now
                        outcome.resolved.append(open_row.id)
                        events.append(("incident_resolved", f"{task}: {check.rule} holds again: {check.message}",
                                       {"incident": open_row.id, "rule": check.rule, **check.facts}))
                    continue
                if open_row is not None:
                    open_row.last_seen_at, open_row.breaches = now, open_row.breaches + 1
                    open_row.detail = {"message": check.message, **check.facts}
                    outcome.refreshed.append(open_row.id)
                    continue
                last = session.scalars(select(IncidentRow).where(
                    IncidentRow.task == task, IncidentRow.rule == check.rule, IncidentRow.status == "resolved")
                    .order_by(IncidentRow.resolved_at.desc()).limit(1)).first()
                if last is not None and last.resolved_at and now - as_utc(last.resolved_at) < cooldown:
                    outcome.suppressed.append(check.rule)
                    log.info("%s: %s breached again within its cooldown; no new incident", task, check.rule)
                    continue
                row = IncidentRow(task=task, rule=check.rule, status="open", opened_at=now, last_seen_at=now,
                                  breaches=1, detail={"message": check.message, **check.facts})
                session.add(row)
                session.flush()
                outcome.opened.append(row.id)
                outcome.opened_by_rule[check.rule] = row.id
                events.append(("breach", f"{task}: {check.rule} breached: {check.message}",
                               {"incident": row.id, "rule": check.rule, **check.facts}))
        for kind, message, payload in events:
            record_event(self.store, kind, message, task=task, payload=payload)
        return outcome


def list_incidents(store: Store, *, task: str | None = None, status: str | None = "open") -> list[Incident]:
    query = select(IncidentRow).order_by(IncidentRow.id.desc())
    if task:
        query = query.where(IncidentRow.task == task)
    if status:
        query = query.where(IncidentRow.status == status)
    with store.session() as session:
        return [Incident(r.id, r.task, r.rule, r.status, as_utc(r.opened_at), as_utc(r.last_seen_at),
                         as_utc(r.resolved_at) if r.resolved_at else None, r.breaches, r.detail)
                for r in session.scalars(query)]


