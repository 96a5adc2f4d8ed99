"""Evaluation runs: a dataset version through an OpenAI-compatible endpoint, scored with intervals, stored.

The endpoint is the gateway (or vLLM itself, for a candidate not routed yet). Every request carries the task's
system prompt explicitly, so both paths see identical messages, and decodes greedily with a fixed seed. Answers
are written to the store in small batches as they arrive; a run interrupted by Ctrl-C, a dead engine or a crash is
found again by its key (task, model, dataset sha, size, decoding) and resumed without re-asking finished
examples. A finished run with the same key is reused unless `fresh` is asked for: the adapter version and the
dataset version are immutable, so the answers would be the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import delete, func, select, update
from tqdm import tqdm

from challenger_sets.catalog import DatasetVersion
from challenger_sets.records import Example
from evaluators.scoring import MetricTable, score_examples
from evaluators.statistics import minimum_detectable_effect, table_interval
from serving.protocol import EVAL_PURPOSE_HEADER
from tuneloop.config import Config, TaskConfig
from tuneloop.errors import EngineUnavailable, EvaluationError, ModelNotFound
from tuneloop.store import Store
from tuneloop.tables import EvalPredictionRow, EvalRunRow, EvalScoreRow

RETRYABLE_STATUS = {429, 502, 503, 504}
FLUSH_EVERY = 16
MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class EvalTarget:
    """What answers: a model name as the endpoint knows it, for one task."""

    task: str
    model: str
    adapter_version: int | None
    base_url: str


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
            key = f"{s.slice_field}={s.slice_value}"
            slices.setdefault(key, {})[s.metric] = entry(s)
        return {"run_id": self.run_id, "task": self.task, "model": self.model,
                "adapter_version": self.adapter_version, "dataset": self.dataset, "n": self.n,
                "errors": self.errors, "reused": self.reused, "resumed_from": self.resumed_from,
                "metrics": {s.metric: entry(s) for s in self.scores}, "slices": slices, "timings": self.timings}


@dataclass(frozen=True)
class Answer:
    position: int
    example_id: str
    text: str | None
    error: str | None
    latency_ms: float
    completion_tokens: int | None


def run_key(target: EvalTarget, dataset: DatasetVersion, n: int, task: TaskConfig, seed: int) -> str:
    raw = json.dumps({"task": target.task, "model": target.model, "adapter": target.adapter_version,
                      "dataset": dataset.manifest.sha256, "n": n, "max_tokens": task.max_new_tokens,
                      "system": task.system_prompt, "temperature": 0, "seed": seed}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


class EvalRunner:
    """Runs, resumes and scores evaluations; one instance per command."""

    def __init__(self, config: Config, store: Store, *, progress: bool = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport  # tests give a fake endpoint here; None = real HTTP
        self.config = config
        self.store = store
        self.progress = progress
        self.settings = config.evaluation

    # public ----------------------------------------------------------------------------------------------

    def run(self, target: EvalTarget, dataset: DatasetVersion, *, limit: int | None = None, fresh: bool = False,
            slice_by: Sequence[str] = ()) -> EvalReport:
        task = self.config.task(target.task)
        if dataset.manifest.task != target.task:
            raise EvaluationError(f"dataset {dataset.manifest.ref} belongs to task '{dataset.manifest.task}', "
                                  f"not '{target.task}'")
        examples = dataset.load()[:limit] if limit else dataset.load()
        if not examples:
            raise EvaluationError(f"dataset {dataset.manifest.ref} has no examples to evaluate")
        key = run_key(target, dataset, len(examples), task, self.settings.seed)
        run, done = self._find_or_create(key, target, dataset, len(examples), fresh)
        if run.status == "complete":
            return self._report(run, reused=True)
        resumed_from = len(done)
        missing = [(i, e) for i, e in enumerate(examples) if e.id not in done]
        started = time.perf_counter()
        try:
            asyncio.run(self._generate(run.id, target, task, missing, len(examples), len(done)))
        except BaseException:
            self._set_status(run.id, "interrupted")
            raise
        generation_s = time.perf_counter() - started
        metrics_started = time.perf_counter()
        scores, slices = self._score(run.id, task, examples, [*task.slice_by, *slice_by])
        metrics_s = time.perf_counter() - metrics_started
        with self.store.session() as session:
            row = session.get(EvalRunRow, run.id)
            assert row is not None
            previous = dict(row.timings or {})
            total_generation = previous.get("generation_s", 0.0) + generation_s
            row.timings = {"generation_s": round(total_generation, 3), "metrics_s": round(metrics_s, 3),
                           "examples_per_s": round(len(examples) / max(total_generation, 1e-9), 3),
                           "metrics_share": round(metrics_s / max(total_generation + metrics_s, 1e-9), 4)}
            row.status = "complete"
            row.finished_at = datetime.now(UTC)
            session.execute(delete(EvalScoreRow).where(EvalScoreRow.run_id == run.id))
            session.add_all(EvalScoreRow(run_id=run.id, **asdict(s)) for s in [*scores, *slices])
        report = self._report(self.get_run(run.id), reused=False)
        report.resumed_from = resumed_from
        return report

    def tables(self, run_id: int) -> tuple[list[str], dict[str, MetricTable]]:
        """Example ids (in dataset order) and metric tables of a finished run, recomputed from its answers."""
        run = self.get_run(run_id)
        task = self.config.task(run.task)
        from challenger_sets.catalog import get_dataset

        dataset = get_dataset(self.store, run.dataset_ref)
        examples = dataset.load()[:run.n_examples]
        predictions = self._predictions(run_id)
        return [e.id for e in examples], score_examples(
            task.metrics, [predictions.get(e.id) for e in examples], [e.reference for e in examples], task.labels)

    # runs ------------------------------------------------------------------------------------------------

    def _find_or_create(self, key: str, target: EvalTarget, dataset: DatasetVersion, n: int,
                        fresh: bool) -> tuple[EvalRunRow, set[str]]:
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
                             settings={"max_tokens": self.config.task(target.task).max_new_tokens, "temperature": 0,
                                       "seed": self.settings.seed, "endpoint": target.base_url,
                                       "level": self.settings.confidence_level,
                                       "resamples": self.settings.bootstrap_resamples},
                             timings={}, started_at=datetime.now(UTC))
            session.add(run)
            session.flush()
            session.expunge(run)
            return run, set()

    def get_run(self, run_id: int) -> EvalRunRow:
        with self.store.session() as session:
            run = session.get(EvalRunRow, run_id)
            if run is None:
                raise EvaluationError(f"no evaluation run {run_id}")
            session.expunge(run)
            return run

    def _set_status(self, run_id: int, status: str) -> None:
        with self.store.session() as session:
            session.execute(update(EvalRunRow).where(EvalRunRow.id == run_id).values(status=status))

    def _predictions(self, run_id: int) -> dict[str, str | None]:
        with self.store.session() as session:
            rows = session.execute(select(EvalPredictionRow.example_id, EvalPredictionRow.prediction)
                                   .where(EvalPredictionRow.run_id == run_id))
            return {example_id: prediction for example_id, prediction in rows}

    def _save(self, run_id: int, answers: list[Answer]) -> None:
        if not answers:
            return
        with self.store.session() as session:
            session.add_all(EvalPredictionRow(run_id=run_id, position=a.position, example_id=a.example_id,
                                              prediction=a.text, error=a.error, latency_ms=a.latency_ms,
                                              completion_tokens=a.completion_tokens, scores={}) for a in answers)
        answers.clear()

    # generation ------------------------------------------------------------------------------------------

    async def _generate(self, run_id: int, target: EvalTarget, task: TaskConfig,
                        missing: list[tuple[int, Example]], total: int, done: int) -> None:
        if not missing:
            return
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        pending: list[Answer] = []
        bar = tqdm(total=total, initial=done, desc=f"eval {target.model}", unit="ex", disable=not self.progress)
        timeout = httpx.Timeout(self.settings.request_timeout_s, connect=5.0)
        limits = httpx.Limits(max_connections=self.settings.concurrency * 2)
        async with httpx.AsyncClient(base_url=target.base_url, timeout=timeout, limits=limits,
                                     transport=self.transport) as client:
            async def one(position: int, example: Example) -> None:
                async with semaphore:
                    answer = await self._ask(client, target, task, position, example)
                pending.append(answer)
                bar.update(1)
                if len(pending) >= FLUSH_EVERY:
                    self._save(run_id, pending)

            tasks = [asyncio.create_task(one(i, e)) for i, e in missing]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._save(run_id, pending)
                bar.close()

    async def _ask(self, client: httpx.AsyncClient, target: EvalTarget, task: TaskConfig, position: int,
                   example: Example) -> Answer:
        body = {"model": target.model, "messages": example.chat_messages(task.system_prompt),
                "max_tokens": task.max_new_tokens, "temperature": 0, "seed": self.settings.seed}
        last = ""
        for attempt in range(self.settings.max_attempts):
            started = time.perf_counter()
            try:
                response = await client.post("/v1/chat/completions", json=body,
                                             headers={EVAL_PURPOSE_HEADER: "eval"})
            except httpx.TransportError as exc:
                last = f"{exc.__class__.__name__}: {exc}"
                await asyncio.sleep(min(MAX_BACKOFF_S, 0.5 * 2 ** attempt))
                continue
            latency_ms = (time.perf_counter() - started) * 1000
            if response.status_code in RETRYABLE_STATUS:
                last = f"HTTP {response.status_code}: {_error_message(response)}"
                await asyncio.sleep(_retry_delay(response, attempt))
                continue
            if response.status_code == 404:
                raise ModelNotFound(f"{target.base_url} does not serve '{target.model}': {_error_message(response)}")
            if response.status_code != 200:
                return Answer(position, example.id, None, f"HTTP {response.status_code}: "
                              f"{_error_message(response)}"[:2000], latency_ms, None)
            payload = response.json()
            text = (payload.get("choices") or [{}])[0].get("message", {}).get("content")
            tokens = (payload.get("usage") or {}).get("completion_tokens")
            return Answer(position, example.id, text, None, latency_ms, tokens)
        raise EngineUnavailable(f"{target.base_url} did not answer example {example.id} after "
                                f"{self.settings.max_attempts} attempts ({last}); the run is saved, run the same "
                                "command again to resume it")

    # scoring ---------------------------------------------------------------------------------------------

    def _score(self, run_id: int, task: TaskConfig, examples: list[Example],
               slice_fields: Sequence[str]) -> tuple[list[MetricScore], list[MetricScore]]:
        with self.store.session() as session:
            rows = {r.example_id: r for r in session.scalars(select(EvalPredictionRow)
                                                              .where(EvalPredictionRow.run_id == run_id))}
            for row in rows.values():
                session.expunge(row)
        ordered = [rows[e.id] for e in examples]
        tables = score_examples(task.metrics, [r.prediction for r in ordered], [e.reference for e in examples],
                                task.labels)
        scores = [self._interval(table) for table in tables.values()]
        slices: list[MetricScore] = []
        for field_name in dict.fromkeys(slice_fields):
            groups: dict[str, list[int]] = {}
            for i, example in enumerate(examples):
                if field_name in example.meta and example.meta[field_name] is not None:
                    groups.setdefault(str(example.meta[field_name]), []).append(i)
            for value, positions in sorted(groups.items()):
                if len(positions) < self.settings.min_slice_size:
                    continue
                slices += [self._interval(table.subset(positions), field_name, value) for table in tables.values()]
        per_example = self._per_example(tables, ordered)
        with self.store.session() as session:
            session.execute(update(EvalPredictionRow), per_example)
        return scores, slices

    def _interval(self, table: MetricTable, slice_field: str | None = None,
                  slice_value: str | None = None) -> MetricScore:
        level = self.settings.confidence_level
        interval, se = table_interval(table, level=level, resamples=self.settings.bootstrap_resamples,
                                      seed=self.settings.seed)
        mde = minimum_detectable_effect(math.sqrt(2) * se, alpha=1 - level, power=self.settings.power)
        return MetricScore(table.name, interval.value, interval.low, interval.high, level, interval.n, mde,
                           table.empty, table.signature, slice_field, slice_value)

    @staticmethod
    def _per_example(tables: dict[str, MetricTable], rows: list[EvalPredictionRow]) -> list[dict[str, Any]]:
        updates = []
        for i, row in enumerate(rows):
            scores: dict[str, Any] = {}
            for name, table in tables.items():
                values = table.per_example
                if values is not None:
                    scores[name] = float(values[i])
                if "parsed" in table.details:
                    scores["label"] = table.details["parsed"][i]
            updates.append({"id": row.id, "scores": scores})
        return updates

    def _report(self, run: EvalRunRow, *, reused: bool) -> EvalReport:
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


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("retry-after", "")
    if header.replace(".", "", 1).isdigit():
        return min(MAX_BACKOFF_S, float(header))
    return min(MAX_BACKOFF_S, 0.5 * 2 ** attempt)


def _error_message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(payload)[:300]
