"""Threshold policy: turn eval scores and drift verdicts into incidents, one open incident per task and rule.

Rules (tasks.<name>.policy):
- floor:   the champion's latest score of a metric on a dataset is below an absolute value;
- drop:    the champion scores worse than its own baseline (its first complete run on that dataset) and the CI of
           the drop lies wholly below -tolerance: paired bootstrap when both runs scored the same examples,
           independent bootstrap of the two runs when the dataset got a new version; a drop inside the noise is no
           breach;
- drift:   the last N drift checks of the task were all flagged;
- estimate: the latest live-traffic estimate of a floored metric (monitor/estimate.py) is under the floor: the
           whole prediction-powered interval, or the whole label-free interval while the latest drift check flagged
           the traffic (without labels the label-free estimate is trusted only as far as its calibration, and drift
           is when that is in doubt; it then takes both to breach).

A rule with no data yet is left alone. A breach opens an incident (event `breach`) unless one is open already
(then it is only refreshed) or the same rule resolved less than `cooldown_s` ago; when the rule holds again the
incident is resolved (event `incident_resolved`). The conductor starts retraining from opened incidents
(tuneloop/conductor/loop.py); incidents and rule ids live in monitor/incidents.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import select

from tuneloop.challenger_sets.catalog import qualify
from tuneloop.challenger_sets.catalog import short_name as _short
from tuneloop.challenger_sets.splits import evaluation_set
from tuneloop.config import Config, MetricName, TaskConfig
from tuneloop.events import record_event
from tuneloop.monitor.incidents import IncidentChanges, IncidentStore, RuleCheck, RuleId
from tuneloop.registry import AdapterVersion, find_alias
from tuneloop.store import Store
from tuneloop.tables import DriftRunRow, EvalRunRow, EvalScoreRow, QualityEstimateRow

log = logging.getLogger(__name__)


@dataclass
class PolicyOutcome:
    task: str
    checks: list[RuleCheck]
    changes: IncidentChanges = field(default_factory=IncidentChanges)


class Policy:
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store

    # Rules --------------------------------------------------------------------------------------------------

    def check_rules(self, task: str) -> list[RuleCheck]:
        task_config = self.config.task(task)
        champion = find_alias(self.store, task, "champion")
        checks: list[RuleCheck] = []
        for floor in task_config.policy.floors:
            rule = RuleId.floor(floor.metric, _short(floor.dataset))
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
        # A generation task's estimate is a mean of sentence chrF, not the corpus chrF its floors are set on: shown
        # and exported, but no rule compares the two.
        if task_config.kind == "classification" and task_config.estimate.floor_rule:
            checks.extend(self._estimate_checks(task, task_config))
        return checks

    def _estimate_checks(self, task: str, task_config: TaskConfig) -> list[RuleCheck]:
        floors: dict[str, float] = {}
        for floor in task_config.policy.floors:
            metric: str = "accuracy" if floor.metric == "exact_match" else floor.metric
            if metric in ("accuracy", "macro_f1"):
                floors[metric] = max(floors.get(metric, floor.min), floor.min)  # the strictest floor of a metric
        checks = []
        for metric, minimum in sorted(floors.items()):
            rule = RuleId.estimate(metric)
            latest = self._latest_estimates(task, metric)
            ppi, free = latest.get("prediction_powered"), latest.get("label_free")
            if free is None:
                checks.append(RuleCheck(rule, "no_data", f"no live-traffic estimate of {metric} for '{task}' yet"))
                continue
            drifted = self._latest_drift_flag(task)
            facts = {"floor": minimum, "drifted": drifted, "window": free.window,
                     **{f"{row.method}_{part}": getattr(row, part) for row in latest.values()
                        for part in ("value", "ci_lower", "ci_upper", "n_labelled")}}
            if ppi is not None and ppi.ci_upper is not None and ppi.ci_upper < minimum:
                checks.append(RuleCheck(rule, "breach", f"live {metric} of '{task}', prediction-powered from "
                                        f"{ppi.n_labelled} labels: {ppi.value:.4f} [{ppi.ci_lower:.4f}, "
                                        f"{ppi.ci_upper:.4f}], wholly under the floor {minimum}", facts))
            elif drifted and free.ci_upper is not None and free.ci_upper < minimum:
                checks.append(RuleCheck(rule, "breach", f"live {metric} of '{task}', label-free: {free.value:.4f} "
                                        f"[{free.ci_lower:.4f}, {free.ci_upper:.4f}], wholly under the floor "
                                        f"{minimum}, while drift is flagged", facts))
            else:
                checks.append(RuleCheck(rule, "holds", f"live {metric} of '{task}' is not shown to be under the "
                                        f"floor {minimum}", facts))
        return checks

    def _latest_estimates(self, task: str, metric: str) -> dict[str, QualityEstimateRow]:
        with self.store.session() as session:
            newest = session.scalars(select(QualityEstimateRow).where(
                QualityEstimateRow.task == task, QualityEstimateRow.metric == metric)
                .order_by(QualityEstimateRow.id.desc()).limit(3)).all()
            if not newest:
                return {}
            batch = newest[0].created_at
            return {row.method: row for row in newest if row.created_at == batch}

    def _latest_drift_flag(self, task: str) -> bool:
        with self.store.session() as session:
            latest = session.scalars(select(DriftRunRow).where(DriftRunRow.task == task)
                                     .order_by(DriftRunRow.id.desc()).limit(1)).first()
        return bool(latest is not None and latest.drifted)

    def _drop_checks(self, task: str, task_config: TaskConfig,
                     champion: AdapterVersion | None) -> list[RuleCheck]:
        rule_config = task_config.policy.drop
        assert rule_config is not None
        metric: MetricName = rule_config.metric or task_config.primary_metric
        datasets = rule_config.datasets or [task_config.heldout_dataset, *task_config.challenger_datasets]
        checks = []
        for dataset in datasets:
            rule = RuleId.drop(metric, _short(dataset))
            runs = self._runs(task, champion.version, dataset) if champion else []
            if champion is None or len(runs) < 2:
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
        from tuneloop.errors import TuneloopError
        from tuneloop.evaluators.runs import RunStore
        from tuneloop.evaluators.statistics import bootstrap_draws

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
        rule = RuleId.drift()
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
        outcome = PolicyOutcome(task=task, checks=self.check_rules(task))
        outcome.changes = IncidentStore(self.store).apply(
            task, outcome.checks, now=now, cooldown=timedelta(seconds=self.config.task(task).policy.cooldown_s))
        facts = {str(c.rule): c.facts for c in outcome.checks}
        for incident in outcome.changes.opened:
            record_event(self.store, "breach", f"{task}: {incident.rule} breached: {incident.message}", task=task,
                         payload={"incident": incident.id, "rule": str(incident.rule), **facts[str(incident.rule)]})
        for incident in outcome.changes.resolved:
            check = next(c for c in outcome.checks if c.rule == incident.rule)
            record_event(self.store, "incident_resolved", f"{task}: {incident.rule} holds again: {check.message}",
                         task=task, payload={"incident": incident.id, "rule": str(incident.rule), **check.facts})
        return outcome
