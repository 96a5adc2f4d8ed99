"""The promotion gate: is the retrained candidate demonstrably better where the champion was worse, and no worse
where it was good?

Both models answer the same examples of each gate set (challenger_sets/judged.py) through the endpoint users
call (the deployment loads the candidate through the engine client's checks, no user routed to it), and the
primary metric is compared with a paired bootstrap:

- challenger splits (superiority): candidate - champion > 0 with p below 1 - level;
- the held-out set (non-inferiority): the lower CI bound of candidate - champion above -margin.

A set is only allowed to decide when it can: its paired minimum detectable effect (80 % power) must be at most the
margin, else the gate rejects with that reason rather than reading noise. `preflight` applies the same rule before
any training, with the smallest MDE n examples can ever have (see statistics.paired_standard_error_floor).
"""

from __future__ import annotations

import math

import httpx

from tuneloop.challenger_sets.catalog import DatasetVersion
from tuneloop.challenger_sets.judged import GateRole, JudgedSet
from tuneloop.config import Config, GateConfig, MetricName
from tuneloop.evaluators.compare import MetricComparison, compare_runs
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.evaluators.statistics import minimum_detectable_effect, paired_standard_error_floor
from tuneloop.registry import AdapterVersion
from tuneloop.retrain.deployment import Deployment
from tuneloop.retrain.records import GateCheck, GateDecision
from tuneloop.store import Store


def smallest_mde(n: int, level: float) -> float:
    """The MDE of a paired difference over n examples if the two models disagreed on none of them."""
    return minimum_detectable_effect(paired_standard_error_floor(n), alpha=1 - level)


def _size(judged: JudgedSet, settings: GateConfig) -> int:
    rows = judged.dataset.manifest.rows
    return min(rows, settings.limit) if settings.limit else rows


def _limit(dataset: DatasetVersion, settings: GateConfig) -> int | None:
    return min(dataset.manifest.rows, settings.limit) if settings.limit else None


class Gate:
    def __init__(self, config: Config, store: Store, task: str, deployment: Deployment) -> None:
        self.config, self.store, self.task, self.deployment = config, store, task, deployment
        self.settings = config.task(task).retrain.gate
        self.metric: MetricName = config.task(task).primary_metric
        evaluation = config.evaluation.model_copy(update={"confidence_level": self.settings.level})
        self._eval_config = config.model_copy(update={"evaluation": evaluation})

    def preflight(self, sets: list[JudgedSet], champion: str) -> GateDecision | None:
        """A rejection before training when some set is too small to ever decide; None when all can."""
        checks = []
        for judged in sets:
            n = _size(judged, self.settings)
            floor = smallest_mde(n, self.settings.level)
            if floor > self.settings.margin:
                checks.append(GateCheck(dataset=judged.ref, role=judged.role, n=n, mde=floor, passed=False,
                                        reason=_too_small(n, floor, self.settings.margin, "at best")))
        if not checks:
            return None
        return GateDecision(promote=False, metric=self.metric, level=self.settings.level, margin=self.settings.margin,
                            champion=champion, candidate=None, checks=checks, reasons=[c.reason for c in checks],
                            preflight=True)

    def decide(self, champion: AdapterVersion, candidate: AdapterVersion, sets: list[JudgedSet], *,
               progress: bool = False, transport: httpx.AsyncBaseTransport | None = None) -> GateDecision:
        """Both versions answer every set through the deployment's endpoint (`transport` stands in for HTTP in
        tests); finished runs on the same examples are reused, so the champion's scheduled runs count."""
        runner = self.runner(progress=progress, transport=transport)
        checks = [self._check(runner, champion, candidate, judged) for judged in sets]
        reasons = [f"{c.dataset}: {c.reason}" for c in checks if not c.passed]
        return GateDecision(promote=not reasons, metric=self.metric, level=self.settings.level,
                            margin=self.settings.margin, champion=champion.ref, candidate=candidate.ref, checks=checks,
                            reasons=reasons or ["every gate set passed"])

    def runner(self, *, progress: bool = False, transport: httpx.AsyncBaseTransport | None = None) -> EvalRunner:
        """An eval runner whose intervals are at the gate's level (the watch uses it too)."""
        return EvalRunner(self._eval_config, self.store, progress=progress, transport=transport)

    def paired(self, runner: EvalRunner, a: AdapterVersion, b: AdapterVersion,
               dataset: DatasetVersion) -> tuple[MetricComparison, tuple[int, int]]:
        """b - a on the primary metric, both asked the same first examples (up to the gate's limit)."""
        limit = _limit(dataset, self.settings)
        run_a, run_b = (runner.run(EvalTarget(self.task, v.ref, v.version, self.deployment.endpoint_for(v)), dataset,
                                   limit=limit).run_id for v in (a, b))
        comparison = next(m for m in compare_runs(runner, run_a, run_b).metrics if m.metric == self.metric)
        return comparison, (run_a, run_b)

    def _check(self, runner: EvalRunner, champion: AdapterVersion, candidate: AdapterVersion,
               judged: JudgedSet) -> GateCheck:
        comparison, runs = self.paired(runner, champion, candidate, judged.dataset)
        mde = gate_mde(comparison)
        passed, reason = self._verdict(comparison, mde, judged.role)
        return GateCheck(dataset=judged.ref, role=judged.role, n=comparison.n, mde=mde, passed=passed, reason=reason,
                         comparison=comparison, runs=runs)

    def _verdict(self, comparison: MetricComparison, mde: float, role: GateRole) -> tuple[bool, str]:
        margin, level = self.settings.margin, self.settings.level
        if mde > margin:
            return False, _too_small(comparison.n, mde, margin, "measured")
        shown = (f"delta {comparison.delta:+.4f} [{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}], "
                 f"p={comparison.p_value:.4f}")
        if role == "heldout":
            if comparison.ci_low > -margin:
                return True, f"non-inferior: {shown}; lower bound above -{margin}"
            return False, f"may be worse than the champion by more than the margin {margin}: {shown}"
        if comparison.delta > 0 and comparison.p_value < 1 - level:
            return True, f"better: {shown} (significant at {level:.0%})"
        return False, f"not significantly better: {shown} (needs delta > 0 and p < {1 - level:.2f})"


def gate_mde(comparison: MetricComparison) -> float:
    """The paired MDE where the comparison has one, else the unpaired upper bound."""
    paired = comparison.paired_mde
    return paired if paired is not None and not math.isnan(paired) else comparison.mde


def _too_small(n: int, mde: float, margin: float, how: str) -> str:
    return (f"too small to decide: n={n} gives a minimum detectable effect of {mde:.4f} ({how}), above the margin "
            f"{margin}; use a larger set or a wider retrain.gate.margin")
