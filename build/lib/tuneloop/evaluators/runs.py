"""Storage of evaluation runs: find or create a run by its key, save answers as they arrive, save what was
scored (per-example sufficient statistics and aggregate scores), read it back.

A run's key (task, model, dataset sha256, size, decoding settings, system prompt) finds an interrupted run to
resume or a finished one to reuse. Per-example statistics are stored with the answers, so a comparison rebuilds
its metric tables from what was scored instead of scoring again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update

from tuneloop.challenger_sets.catalog import DatasetVersion
from tuneloop.errors import EvaluationError
from tuneloop.evaluators.client import Answer
from tuneloop.evaluators.report import EvalReport, MetricScore
from tuneloop.evaluators.scoring import MetricTable, table_from_stats
from tuneloop.evaluators.targets import EvalTarget
from tuneloop.store import Store
from tuneloop.tables import EvalPredictionRow, EvalRunRow, EvalScoreRow

RunStatus = str  # running | interrupted | complete


def run_key(target: EvalTarget, dataset: DatasetVersion, n: int, system_prompt: str,
            decoding: dict[str, Any]) -> str:
    raw = json.dumps({"task": target.task, "model": target.model, "adapter": target.adapter_version,
                      "dataset": dataset.manifest.sha256, "n": n, "system": system_prompt, "decoding": decoding},
                     sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


class RunStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def find_or_create(self, key: str, target: EvalTarget, dataset: DatasetVersion, n: int, *, fresh: bool,
                       settings: dict[str, Any]) -> tuple[EvalRunRow, set[str]]:
        """The latest run with this key and the example ids it already answered, or a new run."""
        with self.store.session() as session:
            existing = session.scalars(select(EvalRunRow).where(EvalRunRow.run_key == key)
                                       .order_by(EvalRunRow.id.desc()).limit(1)).first()
            if existing is not None and not (fresh and existing.status == "complete"):
                done = set(session.scalars(select(EvalPredictionRow.example_id)
                                           .where(EvalPredictionRow.run_id == existing.id)))
                session.expunge(existing)
                return existing, done
            run = EvalRunRow(run_key=key, task=target.task, model=target.model,
                             adapter_version=target.adapter_version, dataset_ref=dataset.manifest.ref,
                             dataset_sha256=dataset.manifest.sha256, n_examples=n, status="running",
                             settings=settings, timings={}, started_at=datetime.now(UTC))
            session.add(run)
            session.flush()
            session.expunge(run)
            return run, set()

    def get(self, run_id: int) -> EvalRunRow:
        with self.store.session() as session:
            run = session.get(EvalRunRow, run_id)
            if run is None:
                raise EvaluationError(f"no evaluation run {run_id}")
            session.expunge(run)
            return run

    def set_status(self, run_id: int, status: RunStatus) -> None:
        with self.store.session() as session:
            session.execute(update(EvalRunRow).where(EvalRunRow.id == run_id).values(status=status))

    def save_answers(self, run_id: int, answers: list[Answer]) -> None:
        """Write answers and empty the list (called in small batches while a run is in flight)."""
        if not answers:
            return
        with self.store.session() as session:
            session.add_all(EvalPredictionRow(run_id=run_id, position=a.position, example_id=a.example_id,
                                              prediction=a.text, error=a.error, latency_ms=a.latency_ms,
                                              completion_tokens=a.completion_tokens, scores={}) for a in answers)
        answers.clear()

    def predictions(self, run_id: int) -> dict[str, str | None]:
        with self.store.session() as session:
            rows = session.execute(select(EvalPredictionRow.example_id, EvalPredictionRow.prediction)
                                   .where(EvalPredictionRow.run_id == run_id))
            return {example_id: prediction for example_id, prediction in rows}

    def save_scored(self, run_id: int, example_ids: Sequence[str], tables: dict[str, MetricTable],
                    scores: list[MetricScore], timings: dict[str, float]) -> None:
        """Per-example scores and statistics, the aggregate scores and timings; marks the run complete."""
        with self.store.session() as session:
            ids = dict(session.execute(select(EvalPredictionRow.example_id, EvalPredictionRow.id)
                                       .where(EvalPredictionRow.run_id == run_id)).all())
            updates = []
            for i, example_id in enumerate(example_ids):
                per_example: dict[str, Any] = {}
                for name, table in tables.items():
                    if table.per_example is not None:
                        per_example[name] = float(table.per_example[i])
                    if "parsed" in table.details:
                        per_example["label"] = table.details["parsed"][i]
                updates.append({"id": ids[example_id], "scores": per_example,
                                "stats": {name: table.stats[i].tolist() for name, table in tables.items()}})
            session.execute(update(EvalPredictionRow), updates)
            row = session.get(EvalRunRow, run_id)
            assert row is not None
            row.timings = timings
            row.settings = {**row.settings, "signatures": {name: t.signature for name, t in tables.items()}}
            row.status = "complete"
            row.finished_at = datetime.now(UTC)
            session.execute(delete(EvalScoreRow).where(EvalScoreRow.run_id == run_id))
            session.add_all(EvalScoreRow(run_id=run_id, **asdict(s)) for s in scores)

    def stored_tables(self, run_id: int, example_ids: Sequence[str], labels: Sequence[str]) -> dict[str, MetricTable]:
        """The metric tables a finished run was scored with, rebuilt from its stored per-example statistics."""
        run = self.get(run_id)
        with self.store.session() as session:
            rows = {example_id: (stats, prediction) for example_id, stats, prediction in session.execute(
                select(EvalPredictionRow.example_id, EvalPredictionRow.stats, EvalPredictionRow.prediction)
                .where(EvalPredictionRow.run_id == run_id))}
        missing = [i for i in example_ids if i not in rows or rows[i][0] is None]
        if missing:
            raise EvaluationError(f"run {run_id} has no stored statistics for {len(missing)} example(s) (e.g. "
                                  f"{missing[0]}); run it again with --fresh")
        signatures: dict[str, str] = run.settings.get("signatures", {})
        empty = sum(1 for i in example_ids if not (rows[i][1] or "").strip())
        stats = {i: rows[i][0] or {} for i in example_ids}
        return {name: table_from_stats(name, np.array([stats[i][name] for i in example_ids]), signature, labels,
                                       empty)
                for name, signature in signatures.items()}

    def report(self, run: EvalRunRow, *, reused: bool) -> EvalReport:
        with self.store.session() as session:
            rows = list(session.scalars(select(EvalScoreRow).where(EvalScoreRow.run_id == run.id)
                                        .order_by(EvalScoreRow.id)))
            errors = session.scalar(select(func.count(EvalPredictionRow.id)).where(
                EvalPredictionRow.run_id == run.id, EvalPredictionRow.error.is_not(None))) or 0
        scores = [MetricScore(r.metric, r.value, r.ci_low, r.ci_high, r.level, r.n, r.mde, r.empty, r.signature,
                              r.slice_field, r.slice_value) for r in rows]
        return EvalReport(run_id=run.id, task=run.task, model=run.model, adapter_version=run.adapter_version,
                          dataset=run.dataset_ref, n=run.n_examples,
                          scores=[s for s in scores if s.slice_field is None],
                          slices=[s for s in scores if s.slice_field is not None], timings=dict(run.timings or {}),
                          errors=errors, reused=reused)
