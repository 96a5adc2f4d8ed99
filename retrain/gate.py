"""The promotion gate: is the retrained candidate demonstrably better where the champion was worse, and no worse
where it was good?

Both models answer the same examples of each gate set through the gateway (the candidate loaded through the
engine client's checks, no user routed to it), and the primary metric is compared with a paired bootstrap:

- challenger splits (superiority): candidate - champion > 0 with p below 1 - level;
- the held-out set (non-inferiority): the lower CI bound of candidate - champion above -margin.

A set is only allowed to decide when it can: its paired minimum detectable effect (80 % power) must be at most the
margin, else the gate rejects with that reason rather than reading noise. `preflight` applies the same rule before
any training, with the smallest MDE n examples can ever have (see statistics.paired_standard_error_floor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from tuneloop.challenger_sets.catalog import DatasetVersion
from tuneloop.evaluators.compare import MetricComparison, compare_runs
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.evaluators.statistics import minimum_detectable_effect, paired_standard_error_floor
from tuneloop.evaluators.targets import ensure_served
from tuneloop.retrain.data import GateSet
from tuneloop.config import Config, GateConfig
from tuneloop.registry import AdapterVersion
from tuneloop.store import Store


@dataclass
class GateCheck:
    dataset: str
    role: str
    metric: str
    n: int
    champion: float | None = None
    candidate: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    mde: float | None = None
    passed: bool = False
    reason: str = ""
    runs: list[int] = field(default_factory=list)


@dataclass
class GateDecision:
    promote: bool
    metric: str
    level: float
    margin: float
    champion: str
    candidate: str | None
    checks: list[GateCheck]
    reasons: list[str]
    preflight: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "checks": [asdict(c) for c in self.checks]}


def smallest_mde(n: int, level: float) -> float:
    """The MDE of a paired difference over n examples if the two models disagreed on none of them."""
    return minimum_detectable_effect(paired_standard_error_floor(n), alpha=1 - level)


def _size(gate_set: GateSet, settings: GateConfig) -> int:
    rows = gate_set.dataset.manifest.rows
    return min(rows, settings.limit) if settings.limit else rows


class Gate:
    def __init__(self, config: Config, store: Store, task: str) -> None:
        self.config, self.store, self.task = config, store, task
        self.settings = config.task(task).retrain.gate
        self.metric = config.task(task).primary_metric
        evaluation = config.evaluation.model_copy(update={"confidence_level": self.settings.level})
        self._eval_config = config.model_copy(update={"evaluation": evaluation})

    def preflight(self, sets: list[GateSet], champion: str) -> GateDecision | None:
        """A rejection before training when some set is too small to ever decide; None when all can."""
        checks = []
        for gate_set in sets:
            n = _size(gate_set, self.settings)
            floor = smallest_mde(n, self.settings.level)
            if floor > self.settings.margin:
                checks.append(GateCheck(gate_set.dataset.manifest.ref, gate_set.role, self.metric, n, mde=floor,
                                        reason=_too_small(n, floor, self.settings.margin, "at best")))
        if not checks:
            return None
        return GateDecision(False, self.metric, self.settings.level, self.settings.margin, champion, None, checks,
                            [c.reason for c in checks], preflight=True)

    def decide(self, champion: AdapterVersion, candidate: AdapterVersion, sets: list[GateSet], *,
               progress: bool = False, endpoint: str | None = None,
               transport: httpx.AsyncBaseTransport | None = None) -> GateDecision:
        """`endpoint`/`transport` send the requests elsewhere (tests); by default both versions are loaded into
        the running gateway (the candidate without routing) and asked through it."""
        runner = self.runner(progress=progress, transport=transport)
        if endpoint is None:
            url = ensure_served(self.config, candidate)
            ensure_served(self.config, champion)
        else:
            url = endpoint
        checks = [self._check(runner, url, champion, candidate, s) for s in sets]
        reasons = [f"{c.dataset}: {c.reason}" for c in checks if not c.passed]
        return GateDecision(not reasons, self.metric, self.settings.level, self.settings.margin, champion.ref,
                            candidate.ref, checks, reasons or ["every gate set passed"])

    def runner(self, *, progress: bool = False, transport: httpx.AsyncBaseTransport | None = None) -> EvalRunner:
        """An eval runner whose intervals are at the gate's level (the watch uses it too)."""
        return EvalRunner(self._eval_config, self.store, progress=progress, transport=transport)

    def paired(self, runner: EvalRunner, url: str, a: AdapterVersion, b: AdapterVersion, dataset: DatasetVersion,
               limit: int | None) -> tuple[MetricComparison, list[int]]:
        """b - a on the primary metric, both asked the same first `limit` examples (finished runs are reused)."""
        runs = [runner.run(EvalTarget(self.task, v.ref, v.version, url), dataset, limit=limit).run_id for v in (a, b)]
        return next(m for m in compare_runs(runner, runs[0], runs[1]).metrics if m.metric == self.metric), runs

    def _check(self, runner: EvalRunner, url: str, champion: AdapterVersion, candidate: AdapterVersion,
               gate_set: GateSet) -> GateCheck:
        dataset: DatasetVersion = gate_set.dataset
        result, runs = self.paired(runner, url, champion, candidate, dataset, _size(gate_set, self.settings))
        check = _check_from(result, dataset.manifest.ref, gate_set.role, runs)
        check.passed, check.reason = self._verdict(check)
        return check

    def _verdict(self, check: GateCheck) -> tuple[bool, str]:
        margin, level = self.settings.margin, self.settings.level
        assert check.mde is not None and check.delta is not None and check.ci_low is not None
        assert check.p_value is not None
        if check.mde > margin:
            return False, _too_small(check.n, check.mde, margin, "measured")
        shown = f"delta {check.delta:+.4f} [{check.ci_low:+.4f}, {check.ci_high:+.4f}], p={check.p_value:.4f}"
        if check.role == "heldout":
            if check.ci_low > -margin:
                return True, f"non-inferior: {shown}; lower bound above -{margin}"
            return False, f"may be worse than the champion by more than the margin {margin}: {shown}"
        if check.delta > 0 and check.p_value < 1 - level:
            return True, f"better: {shown} (significant at {level:.0%})"
        return False, f"not significantly better: {shown} (needs delta > 0 and p < {1 - level:.2f})"


def _check_from(result: MetricComparison, dataset: str, role: str, runs: list[int]) -> GateCheck:
    mde = result.paired_mde if result.paired_mde is not None and not math.isnan(result.paired_mde) else result.mde
    return GateCheck(dataset=dataset, role=role, metric=result.metric, n=result.n, champion=result.a,
                     candidate=result.b, delta=result.delta, ci_low=result.ci_low, ci_high=result.ci_high,
                     p_value=result.p_value, mde=mde, runs=runs)


def _too_small(n: int, mde: float, margin: float, how: str) -> str:
    return (f"too small to decide: n={n} gives a minimum detectable effect of {mde:.4f} ({how}), above the margin "
            f"{margin}; use a larger set or a wider retrain.gate.margin")
