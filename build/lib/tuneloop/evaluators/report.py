"""From per-example metric tables to what a run reports: each metric with its interval, n, MDE and signature,
overall and per slice."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tuneloop.challenger_sets.records import Example
from tuneloop.config import EvaluationConfig
from tuneloop.evaluators.scoring import MetricTable
from tuneloop.evaluators.statistics import minimum_detectable_effect, table_interval


@dataclass(frozen=True)
class MetricScore:
    metric: str
    value: float
    ci_low: float
    ci_high: float
    level: float
    n: int
    mde: float | None
    empty: int
    signature: str
    slice_field: str | None = None
    slice_value: str | None = None


@dataclass
class EvalReport:
    run_id: int
    task: str
    model: str
    adapter_version: int | None
    dataset: str
    n: int
    scores: list[MetricScore]
    slices: list[MetricScore] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    reused: bool = False
    resumed_from: int = 0

    def score(self, metric: str) -> MetricScore:
        return next(s for s in self.scores if s.metric == metric)

    def to_json(self) -> dict[str, Any]:
        def entry(s: MetricScore) -> dict[str, Any]:
            return {k: v for k, v in asdict(s).items() if k not in ("metric", "slice_field", "slice_value")}

        slices: dict[str, dict[str, dict[str, Any]]] = {}
        for s in self.slices:
            slices.setdefault(f"{s.slice_field}={s.slice_value}", {})[s.metric] = entry(s)
        return {"run_id": self.run_id, "task": self.task, "model": self.model,
                "adapter_version": self.adapter_version, "dataset": self.dataset, "n": self.n,
                "errors": self.errors, "reused": self.reused, "resumed_from": self.resumed_from,
                "metrics": {s.metric: entry(s) for s in self.scores}, "slices": slices, "timings": self.timings}


def metric_score(table: MetricTable, settings: EvaluationConfig, slice_field: str | None = None,
                 slice_value: str | None = None) -> MetricScore:
    """One metric with its bootstrap interval and the MDE a comparison of two such runs would have."""
    interval, se = table_interval(table, level=settings.confidence_level, resamples=settings.bootstrap_resamples,
                                  seed=settings.seed)
    mde = minimum_detectable_effect(math.sqrt(2) * se, alpha=1 - settings.confidence_level, power=settings.power)
    return MetricScore(table.name, interval.value, interval.low, interval.high, settings.confidence_level,
                       interval.n, mde, table.empty, table.signature, slice_field, slice_value)


def score_tables(tables: dict[str, MetricTable], examples: Sequence[Example], settings: EvaluationConfig,
                 slice_fields: Sequence[str]) -> tuple[list[MetricScore], list[MetricScore]]:
    """Overall scores, and scores per value of each slice field (slices under `min_slice_size` are skipped)."""
    scores = [metric_score(table, settings) for table in tables.values()]
    slices: list[MetricScore] = []
    for field_name in dict.fromkeys(slice_fields):
        groups: dict[str, list[int]] = {}
        for i, example in enumerate(examples):
            if example.meta.get(field_name) is not None:
                groups.setdefault(str(example.meta[field_name]), []).append(i)
        for value, positions in sorted(groups.items()):
            if len(positions) >= settings.min_slice_size:
                slices += [metric_score(table.subset(positions), settings, field_name, value)
                           for table in tables.values()]
    return scores, slices
