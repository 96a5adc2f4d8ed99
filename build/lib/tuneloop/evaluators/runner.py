"""Evaluation runs: a dataset version through an OpenAI-compatible endpoint, scored with intervals, stored.

The endpoint is the gateway users call (evaluators/targets.py). Answers are written to the store in small
batches as they arrive (evaluators/runs.py); a run interrupted by Ctrl-C, a dead engine or a crash is found
again by its key and resumed without re-asking finished examples. A finished run with the same key is reused
unless `fresh` is asked for: adapter and dataset versions are immutable and decoding is greedy with a fixed seed,
so the answers would be the same. Scoring is evaluators/scoring.py + report.py; asking is evaluators/client.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx
from tqdm import tqdm

from tuneloop.challenger_sets.catalog import DatasetVersion
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config, TaskConfig
from tuneloop.errors import EvaluationError
from tuneloop.evaluators.client import FLUSH_EVERY, Answer, EndpointClient, decoding_settings, request_body
from tuneloop.evaluators.report import EvalReport, score_tables
from tuneloop.evaluators.runs import RunStore, run_key
from tuneloop.evaluators.scoring import MetricTable, score_examples
from tuneloop.evaluators.targets import EvalTarget
from tuneloop.store import Store

__all__ = ["EvalReport", "EvalRunner", "EvalTarget"]


class EvalRunner:
    """Runs, resumes and scores evaluations; one instance per command."""

    def __init__(self, config: Config, store: Store, *, progress: bool = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport  # tests give a scripted endpoint here; None = real HTTP
        self.config = config
        self.runs = RunStore(store)
        self.progress = progress
        self.settings = config.evaluation

    def run(self, target: EvalTarget, dataset: DatasetVersion, *, limit: int | None = None, fresh: bool = False,
            slice_by: Sequence[str] = ()) -> EvalReport:
        task = self.config.task(target.task)
        if dataset.manifest.task != target.task:
            raise EvaluationError(f"dataset {dataset.manifest.ref} belongs to task '{dataset.manifest.task}', "
                                  f"not '{target.task}'")
        examples = dataset.load()[:limit] if limit else dataset.load()
        if not examples:
            raise EvaluationError(f"dataset {dataset.manifest.ref} has no examples to evaluate")
        decoding = decoding_settings(task, self.settings.seed)
        key = run_key(target, dataset, len(examples), task.system_prompt, decoding)
        run, done = self.runs.find_or_create(
            key, target, dataset, len(examples), fresh=fresh,
            settings={**decoding, "endpoint": target.base_url, "level": self.settings.confidence_level,
                      "resamples": self.settings.bootstrap_resamples})
        if run.status == "complete":
            return self.runs.report(run, reused=True)
        missing = [(i, e) for i, e in enumerate(examples) if e.id not in done]
        started = time.perf_counter()
        try:
            asyncio.run(self._generate(run.id, target, task, missing, len(examples), len(done)))
        except BaseException:
            self.runs.set_status(run.id, "interrupted")
            raise
        generation_s = float(run.timings.get("generation_s", 0.0)) + time.perf_counter() - started
        metrics_started = time.perf_counter()
        predictions = self.runs.predictions(run.id)
        tables = score_examples(task.metrics, [predictions.get(e.id) for e in examples],
                                [e.reference for e in examples], task.labels)
        scores, slices = score_tables(tables, examples, self.settings, [*task.slice_by, *slice_by])
        metrics_s = time.perf_counter() - metrics_started
        timings = {"generation_s": round(generation_s, 3), "metrics_s": round(metrics_s, 3),
                   "examples_per_s": round(len(examples) / max(generation_s, 1e-9), 3),
                   "metrics_share": round(metrics_s / max(generation_s + metrics_s, 1e-9), 4)}
        self.runs.save_scored(run.id, [e.id for e in examples], tables, [*scores, *slices], timings)
        report = self.runs.report(self.runs.get(run.id), reused=False)
        report.resumed_from = len(done)
        return report

    def tables(self, run_id: int) -> tuple[list[str], dict[str, MetricTable]]:
        """Example ids (in dataset order) and the metric tables a finished run was scored with (stored)."""
        from tuneloop.challenger_sets.catalog import get_dataset

        run = self.runs.get(run_id)
        if run.status != "complete":
            raise EvaluationError(f"run {run_id} is {run.status}; finish it before comparing")
        examples = get_dataset(self.runs.store, run.dataset_ref).load()[:run.n_examples]
        ids = [e.id for e in examples]
        return ids, self.runs.stored_tables(run_id, ids, self.config.task(run.task).labels)

    async def _generate(self, run_id: int, target: EvalTarget, task: TaskConfig,
                        missing: list[tuple[int, Example]], total: int, done: int) -> None:
        if not missing:
            return
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        pending: list[Answer] = []
        bar = tqdm(total=total, initial=done, desc=f"eval {target.model}", unit="ex", disable=not self.progress)
        async with EndpointClient(target, self.settings, transport=self.transport,
                                  token=self.config.admin_token) as client:
            async def one(position: int, example: Example) -> None:
                async with semaphore:
                    answer = await client.ask(position, example,
                                              request_body(target, task, example, self.settings.seed))
                pending.append(answer)
                bar.update(1)
                if len(pending) >= FLUSH_EVERY:
                    self.runs.save_answers(run_id, pending)

            tasks = [asyncio.create_task(one(i, e)) for i, e in missing]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.runs.save_answers(run_id, pending)
                bar.close()
