"""Every metric as per-example sufficient statistics that are summed, then reduced to the score.

A mean metric (accuracy, token F1, ROUGE) keeps [score, 1] per example; BLEU and chrF keep sacrebleu's own
segment statistics (n-gram matches and totals, lengths), whose column sums are exactly what
`corpus_score` reduces; macro-F1 keeps one-hot true-positive / true / predicted counts per class. With the
statistics in an (n, k) array, a bootstrap resample, a paired resample or a slice is a weighted row sum plus
one reduction, so corpus metrics are recomputed at the corpus level on every resample without re-tokenising
anything (evaluators/statistics.py), and 10k examples score in one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneloop.evaluators import metrics as m

MEAN_METRICS = ("accuracy", "exact_match", "token_f1", "rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass(frozen=True)
class MetricTable:
    """One metric over n examples: per-example statistics, how to reduce their sums, and what produced them."""

    name: str
    stats: np.ndarray
    reduce: Callable[[np.ndarray], np.ndarray]
    signature: str
    empty: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.stats.shape[0])

    @property
    def per_example(self) -> np.ndarray | None:
        """Per-example scores, for the metrics that are means of them."""
        return self.stats[:, 0] if self.name in MEAN_METRICS else None

    def value(self) -> float:
        return float(self.reduce(self.stats.sum(axis=0, keepdims=True))[0])

    def from_weights(self, weights: np.ndarray) -> np.ndarray:
        """Scores of many resamples at once: `weights` is (resamples, n) counts of each example."""
        return self.reduce(weights @ self.stats)

    def subset(self, rows: Sequence[int] | np.ndarray) -> MetricTable:
        return MetricTable(self.name, self.stats[np.asarray(rows, dtype=int)], self.reduce, self.signature,
                           self.empty, self.details)


def _mean_reduce(summed: np.ndarray) -> np.ndarray:
    means: np.ndarray = np.divide(summed[:, 0], summed[:, 1], out=np.zeros(len(summed)), where=summed[:, 1] > 0)
    return means


def _sacrebleu_metric(name: str) -> Any:
    import sacrebleu

    return sacrebleu.BLEU() if name == "bleu" else sacrebleu.CHRF()


def _sacrebleu_reducer(metric: Any) -> Callable[[np.ndarray], np.ndarray]:
    def reduce(summed: np.ndarray) -> np.ndarray:
        return np.array([metric._compute_score_from_stats([int(v) for v in row]).score / 100 for row in summed])

    return reduce


def _macro_f1_reducer(k: int) -> Callable[[np.ndarray], np.ndarray]:
    def reduce(summed: np.ndarray) -> np.ndarray:
        tp, true, pred = summed[:, :k], summed[:, k:2 * k], summed[:, 2 * k:]
        denominator = true + pred
        f1: np.ndarray = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        macro: np.ndarray = f1.mean(axis=1)
        return macro

    return reduce


def reducer_for(name: str, labels: Sequence[str] = ()) -> Callable[[np.ndarray], np.ndarray]:
    """How a metric's summed statistics become its score; enough to rebuild a table from stored statistics."""
    if name in MEAN_METRICS:
        return _mean_reduce
    if name == "macro_f1":
        if not labels:
            raise ValueError("macro_f1 needs the task's labels")
        return _macro_f1_reducer(len(labels))
    if name in ("bleu", "chrf"):
        return _sacrebleu_reducer(_sacrebleu_metric(name))
    raise ValueError(f"unknown metric '{name}'")


def table_from_stats(name: str, stats: np.ndarray, signature: str, labels: Sequence[str] = (),
                     empty: int = 0) -> MetricTable:
    """A MetricTable rebuilt from stored per-example statistics (see EvalPredictionRow.stats)."""
    return MetricTable(name, np.asarray(stats, dtype=float), reducer_for(name, labels), signature, empty)


def _mean_table(name: str, values: Sequence[float], signature: str, empty: int) -> MetricTable:
    stats = np.column_stack([np.asarray(values, dtype=float), np.ones(len(values))]) if len(values) else \
        np.zeros((0, 2))
    return MetricTable(name, stats, _mean_reduce, signature, empty)


def _sacrebleu_table(name: str, predictions: list[str], references: list[str], empty: int) -> MetricTable:
    metric = _sacrebleu_metric(name)
    stats = np.asarray(metric._extract_corpus_statistics(predictions, [references]), dtype=float)
    if stats.size == 0:
        stats = np.zeros((0, 1))
    return MetricTable(name, stats, _sacrebleu_reducer(metric), str(metric.get_signature()), empty)


def _macro_f1_table(parsed: list[str], references: Sequence[str], labels: Sequence[str], signature: str,
                    empty: int) -> MetricTable:
    k = len(labels)
    index = {label: i for i, label in enumerate(labels)}
    stats = np.zeros((len(parsed), 3 * k))
    for row, (predicted, truth) in enumerate(zip(parsed, references, strict=True)):
        if truth in index:
            stats[row, k + index[truth]] = 1
        if predicted in index:
            stats[row, 2 * k + index[predicted]] = 1
            if predicted == truth:
                stats[row, index[truth]] = 1
    return MetricTable("macro_f1", stats, _macro_f1_reducer(k), signature + "|macro-f1:zero_division=0", empty)


def score_examples(metric_names: Sequence[str], predictions: Sequence[str | None], references: Sequence[str],
                   labels: Sequence[str] = ()) -> dict[str, MetricTable]:
    """The requested metrics over aligned predictions and references (None or "" = empty prediction, scores 0)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    texts = [p or "" for p in predictions]
    empty = sum(1 for p in texts if not p.strip())
    wanted = set(metric_names)
    tables: dict[str, MetricTable] = {}
    if labels and wanted & {"accuracy", "macro_f1"}:
        parsed = [m.parse_label(p, labels) for p in texts]
        signature = f"labels:{','.join(labels)}|parse:whole-or-first-word|invalid-counts-as-wrong"
        tables["accuracy"] = _mean_table("accuracy", [float(p == r) for p, r in zip(parsed, references,
                                                                                       strict=True)],
                                         signature, empty)
        tables["macro_f1"] = _macro_f1_table(parsed, references, labels, signature, empty)
        invalid = sum(1 for p in parsed if p == m.INVALID_LABEL)
        for table in (tables["accuracy"], tables["macro_f1"]):
            table.details.update(invalid=invalid, parsed=parsed)
    if "bleu" in wanted:
        tables["bleu"] = _sacrebleu_table("bleu", texts, list(references), empty)
    if "chrf" in wanted:
        tables["chrf"] = _sacrebleu_table("chrf", texts, list(references), empty)
    rouge_names = wanted & {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    if rouge_names:
        for name, result in m.rouge(texts, references, types=tuple(rouge_names)).items():
            tables[name] = _mean_table(name, result.per_example or [], result.signature, empty)
    if "token_f1" in wanted:
        result = m.token_f1(texts, references)
        tables["token_f1"] = _mean_table("token_f1", result.per_example or [], result.signature, empty)
    if "exact_match" in wanted:
        result = m.exact_match(texts, references)
        tables["exact_match"] = _mean_table("exact_match", result.per_example or [], result.signature, empty)
    missing = wanted - set(tables)
    if missing:
        raise ValueError(f"cannot compute {sorted(missing)}: label metrics need the task's labels")
    return {name: tables[name] for name in metric_names}
