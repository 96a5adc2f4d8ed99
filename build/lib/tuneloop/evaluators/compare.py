"""Paired comparison of two finished evaluation runs on the same examples: B minus A, per metric.

Both runs' metric tables are rebuilt from the per-example statistics stored when they were scored, so a
comparison uses exactly what each run reported, not a fresh scoring that a metric change could alter.

Every metric gets a paired bootstrap interval and p-value; accuracy also gets the exact McNemar test, which uses
only the examples the two versions disagree on. The minimum detectable effect is printed beside each delta so a
"no significant difference" on a small set reads as "this set cannot tell", not as "they are equal".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tuneloop.errors import EvaluationError
from tuneloop.evaluators.runner import EvalRunner
from tuneloop.evaluators.statistics import mcnemar, paired_bootstrap


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    method: str
    level: float
    n: int
    mde: float
    mcnemar_p_value: float | None = None
    only_a_right: int | None = None
    only_b_right: int | None = None
    paired_mde: float | None = None  # from the SD of the paired differences; what the paired test can detect

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - self.level


@dataclass
class CompareReport:
    a: str
    b: str
    dataset: str
    n: int
    run_a: int
    run_b: int
    metrics: list[MetricComparison]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "dataset": self.dataset, "n": self.n, "runs": [self.run_a, self.run_b],
                "metrics": {m.metric: {k: v for k, v in asdict(m).items() if k != "metric"} | {
                    "significant": m.significant} for m in self.metrics}}


def compare_runs(runner: EvalRunner, run_a: int, run_b: int) -> CompareReport:
    first, second = runner.runs.get(run_a), runner.runs.get(run_b)
    if first.status != "complete" or second.status != "complete":
        raise EvaluationError(f"runs {run_a} and {run_b} must both be complete to compare")
    if (first.task, first.dataset_sha256, first.n_examples) != (second.task, second.dataset_sha256,
                                                                second.n_examples):
        raise EvaluationError(f"runs {run_a} ({first.dataset_ref}, n={first.n_examples}) and {run_b} "
                              f"({second.dataset_ref}, n={second.n_examples}) are not on the same examples")
    ids_a, tables_a = runner.tables(run_a)
    ids_b, tables_b = runner.tables(run_b)
    if set(tables_a) != set(tables_b):
        raise EvaluationError(f"runs {run_a} and {run_b} were scored with different metrics")
    if ids_a != ids_b:
        raise EvaluationError("the two runs scored different examples")
    settings = runner.settings
    results = []
    for name, table_a in tables_a.items():
        paired = paired_bootstrap(table_a, tables_b[name], level=settings.confidence_level,
                                  resamples=settings.bootstrap_resamples, seed=settings.seed)
        extra: dict[str, Any] = {}
        if name == "accuracy" and table_a.per_example is not None:
            b_per_example = tables_b[name].per_example
            assert b_per_example is not None, "both runs were scored with the same metrics"
            p, only_a, only_b = mcnemar(table_a.per_example, b_per_example)
            extra = {"mcnemar_p_value": p, "only_a_right": only_a, "only_b_right": only_b}
        results.append(MetricComparison(name, paired.a, paired.b, paired.delta, paired.low, paired.high,
                                        paired.p_value, paired.method, paired.level, paired.n, paired.mde,
                                        paired_mde=paired.paired_mde, **extra))
    return CompareReport(a=first.model, b=second.model, dataset=first.dataset_ref, n=first.n_examples,
                         run_a=run_a, run_b=run_b, metrics=results)
