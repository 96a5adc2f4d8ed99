"""A task's metric on the last window of served traffic, before (most of) the labels arrive.

The gateway captures each answer's log-probability signal with the request (serving/quality_signal.py). Here, off
the request path:

1. the served adapter version's calibration is loaded, or fitted once on the task's held-out set: its examples are
   asked through the gateway (marked as evaluation traffic, so they are not captured) with log-probabilities on.
   Classification: temperature, isotonic or no calibration, chosen by held-out calibration error
   (monitor/answer_calibration.py). Generation: a per-answer chrF predictor (monitor/answer_quality.py);
2. the window's answers become calibrated label distributions (or predicted chrF), and whatever feedback has
   arrived for them their true labels (or references, scored);
3. the three estimates of monitor/estimators.py are computed and stored, for the CLI, the exporter and the policy.

Only answers of the task's current champion version count (a window straddling a promotion would mix two
models' calibrations), and only answers with a signal: non-streamed chat answers (constrained to the labels, for a
classification task).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import numpy as np
from sqlalchemy import select

from tuneloop.answer_signal import SIGNAL_TOP_LOGPROBS, label_logprobs, stored_label_logprobs, stored_token_signal
from tuneloop.challenger_sets.catalog import get_dataset
from tuneloop.config import Config, TaskConfig
from tuneloop.errors import EstimationError
from tuneloop.evaluators.client import Answer, EndpointClient, request_body
from tuneloop.evaluators.targets import EvalTarget, resolve_target, resolve_version
from tuneloop.monitor.answer_calibration import CalibrationError, Calibrator, choose_calibrator
from tuneloop.monitor.answer_quality import (
    GENERATION_METRICS,
    AnswerQualityModel,
    QualityModelError,
    answer_features,
    fit_quality_model,
    sentence_scores,
)
from tuneloop.monitor.embeddings import Embedder
from tuneloop.monitor.estimators import (
    CLASSIFICATION_METRICS,
    Estimate,
    ScoreWindow,
    WindowData,
    estimate_all,
    estimate_scores,
)
from tuneloop.monitor.views import EmbeddingNoveltyView
from tuneloop.store import Store
from tuneloop.tables import AnswerCalibrationRow, QualityEstimateRow, TrafficRow

BASE_VERSION = 0  # the calibrations table's key for the base model


MethodEstimates = tuple[list[Estimate], dict[str, Any]]  # the three estimates, and what the signal was calibrated by


@dataclass(frozen=True)
class Captured:
    """One captured answer with a signal: label log-probabilities (classification) or token signal (generation)."""

    signal: np.ndarray
    answer: str
    reference: str | None
    prompt: str


@dataclass(frozen=True)
class WindowEstimate:
    task: str
    metric: str
    window: int
    adapter_version: int | None
    n_answers: int
    skipped: dict[str, int]
    calibration: dict[str, Any]
    estimates: list[Estimate] = field(default_factory=list)

    def by_method(self, method: str) -> Estimate:
        return next(e for e in self.estimates if e.method == method)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "window": self.window,
                "adapter_version": self.adapter_version, "n_answers": self.n_answers, "skipped": self.skipped,
                "calibration": self.calibration,
                "estimates": [{"method": e.method, "value": e.value, "ci_lower": e.ci_lower, "ci_upper": e.ci_upper,
                               "n_labelled": e.n_labelled, "n_unlabelled": e.n_unlabelled, **e.detail}
                              for e in self.estimates]}


def estimable_metric(task_name: str, task: TaskConfig, metric: str | None) -> str:
    chosen = metric or task.primary_metric
    if task.kind == "generation":
        if chosen not in GENERATION_METRICS:
            raise EstimationError(f"metric '{chosen}' of generation task '{task_name}' has no estimator; choose "
                                  f"one of {list(GENERATION_METRICS)} (--metric)")
        return chosen
    if chosen == "exact_match":
        chosen = "accuracy"  # a label answer is exactly right when it is the right label
    if chosen not in CLASSIFICATION_METRICS:
        raise EstimationError(f"metric '{chosen}' has no estimator; choose one of {list(CLASSIFICATION_METRICS)}")
    return chosen


class QualityEstimator:
    """Estimates for one config and store; `transport` lets tests answer calibration requests in-process."""

    def __init__(self, config: Config, store: Store, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config, self.store, self.transport = config, store, transport
        self._embedder: Embedder | None = None
        self._novelty_views: dict[str, EmbeddingNoveltyView] = {}

    def estimate(self, task_name: str, *, window: int | None = None, metric: str | None = None,
                 target: EvalTarget | None = None, save: bool = True) -> WindowEstimate:
        task = self.config.task(task_name)
        chosen = estimable_metric(task_name, task, metric)
        size = window or task.estimate.window
        if not 1 <= size <= 20_000:
            raise EstimationError(f"--window {size}: must be between 1 and 20000 answers")
        if target is None:  # the champion; the gateway is asked only if its calibration must be fitted
            _, version = resolve_version(self.config, self.store, task=task_name, adapter=None, base=False)
            adapter_version = version.version if version is not None else None
            model = version.ref if version is not None else self.config.base_model.name
        else:
            adapter_version, model = target.adapter_version, target.model
        rows, skipped = self._window(task_name, task, adapter_version, size)
        if not rows:
            raise EstimationError(
                f"no captured answers with a quality signal for {model}: answers get one when they are "
                "non-streamed chat requests (constrained to the labels, for a classification task), with "
                "tasks.<name>.estimate.signal on")
        endpoint = lambda: target or resolve_target(self.config, self.store, task=task_name)  # noqa: E731
        if task.kind == "generation":
            estimates, calibration = self._generation(task_name, task, chosen, adapter_version, rows, endpoint)
        else:
            estimates, calibration = self._classification(task_name, task, chosen, adapter_version, rows, endpoint)
        result = WindowEstimate(task=task_name, metric=chosen, window=size, adapter_version=adapter_version,
                                n_answers=len(rows), skipped=skipped, calibration=calibration, estimates=estimates)
        if save:
            self._save(result, task.estimate.level)
        return result

    def _classification(self, task_name: str, task: TaskConfig, metric: str, adapter_version: int | None,
                        rows: list[Captured], endpoint: Callable[[], EvalTarget]) -> MethodEstimates:
        calibrator = self.calibrator(task_name, task, adapter_version, endpoint)
        labels = list(task.labels)
        logprobs = np.stack([row.signal for row in rows])
        predicted = np.array([labels.index(row.answer) for row in rows])
        truth = np.array([-1 if row.reference is None else labels.index(row.reference) for row in rows])
        data = WindowData(predicted=predicted, probs=calibrator.apply(logprobs, predicted), truth=truth)
        return (estimate_all(metric, data, task.estimate.level),
                {"method": calibrator.method, "n": calibrator.n, "ece": calibrator.ece})

    def _generation(self, task_name: str, task: TaskConfig, metric: str, adapter_version: int | None,
                    rows: list[Captured], endpoint: Callable[[], EvalTarget]) -> MethodEstimates:
        predictor = self.quality_model(task_name, task, metric, adapter_version, endpoint)
        prompts = [row.prompt for row in rows]
        features = answer_features(np.stack([row.signal for row in rows]), prompts, self.novelty(task_name, prompts))
        truth = np.full(len(rows), np.nan)
        scored = [i for i, row in enumerate(rows) if row.reference is not None]
        if scored:
            truth[scored] = sentence_scores(metric, [rows[i].answer for i in scored],
                                            [rows[i].reference or "" for i in scored])
        data = ScoreWindow(predicted=predictor.predict(features), truth=truth, residual_sd=predictor.residual_sd)
        return (estimate_scores(metric, data, task.estimate.level),
                {"method": predictor.method, "n": predictor.n, "spearman": predictor.spearman,
                 "residual_sd": predictor.residual_sd})

    def _window(self, task_name: str, task: TaskConfig, version: int | None,
                size: int) -> tuple[list[Captured], dict[str, int]]:
        """The newest `size` answers of this version that carry a signal."""
        labels = list(task.labels)
        label_task = task.kind == "classification"
        skipped = {"answer not a label": 0, "signal without the task's labels": 0, "signal of another kind": 0}
        query = (select(TrafficRow.signal, TrafficRow.completion, TrafficRow.reference, TrafficRow.prompt_text)
                 .where(TrafficRow.task == task_name, TrafficRow.status == 200, TrafficRow.shadow_of.is_(None),
                        TrafficRow.signal.is_not(None),
                        TrafficRow.adapter_version.is_(None) if version is None
                        else TrafficRow.adapter_version == version)
                 .order_by(TrafficRow.id.desc()).limit(size))
        rows: list[Captured] = []
        with self.store.session() as session:
            for signal, completion, reference, prompt in session.execute(query):
                answer = (completion or "").strip()
                if not isinstance(signal, dict):
                    skipped["signal of another kind"] += 1
                elif not label_task:
                    values = stored_token_signal(signal)
                    if values is None:
                        skipped["signal of another kind"] += 1
                    else:
                        rows.append(Captured(values, completion or "", reference, prompt or ""))
                elif answer not in labels or (reference is not None and reference not in labels):
                    skipped["answer not a label"] += 1
                elif (values := stored_label_logprobs(signal, labels)) is None:
                    skipped["signal without the task's labels"] += 1
                else:
                    rows.append(Captured(values, answer, reference, prompt or ""))
        return rows, skipped

    def _stored(self, task_name: str, adapter_version: int | None) -> AnswerCalibrationRow | None:
        """The version's stored calibration (a calibrator or an answer-quality model), if it has one."""
        key = adapter_version if adapter_version is not None else BASE_VERSION
        with self.store.session() as session:
            row = session.scalars(select(AnswerCalibrationRow).where(
                AnswerCalibrationRow.task == task_name, AnswerCalibrationRow.adapter_version == key)).first()
            if row is not None:
                session.expunge(row)
            return row

    def _store(self, task_name: str, adapter_version: int | None, dataset_ref: str, method: str,
               params: dict[str, Any], n: int) -> None:
        key = adapter_version if adapter_version is not None else BASE_VERSION
        with self.store.session() as session:
            session.add(AnswerCalibrationRow(task=task_name, adapter_version=key, dataset_ref=dataset_ref,
                                             method=method, params=params, n=n))

    def calibrator(self, task_name: str, task: TaskConfig, adapter_version: int | None,
                   target: Callable[[], EvalTarget]) -> Calibrator:
        """The stored calibrator of the version, fitted on the held-out set through `target()` the first time."""
        stored = self._stored(task_name, adapter_version)
        if stored is not None:
            return Calibrator.from_json(stored.params)
        dataset = get_dataset(self.store, task.heldout_dataset, task=task_name)
        examples = dataset.load()[: task.estimate.calibration_examples]
        endpoint = target()
        answers = asyncio.run(self._held_out_answers(task, endpoint, examples, top_logprobs=SIGNAL_TOP_LOGPROBS))
        labels = list(task.labels)
        rows, predicted, truth = [], [], []
        for example, answer in zip(examples, answers, strict=True):
            text = (answer.text or "").strip()
            if answer.signal is None or text not in labels or example.reference not in labels:
                continue
            rows.append(label_logprobs(answer.signal, labels)[0])
            predicted.append(labels.index(text))
            truth.append(labels.index(example.reference))
        if not rows:
            raise EstimationError(f"{endpoint.model} returned no log-probabilities for {len(examples)} held-out "
                                  "examples; the engine must allow --max-logprobs 20")
        try:
            calibrator = choose_calibrator(np.stack(rows), np.array(predicted), np.array(truth))
        except CalibrationError as exc:
            raise EstimationError(f"calibrating {endpoint.model} on {dataset.manifest.ref}: {exc}") from None
        self._store(task_name, adapter_version, dataset.manifest.ref, calibrator.method, calibrator.to_json(),
                    calibrator.n)
        return calibrator

    def quality_model(self, task_name: str, task: TaskConfig, metric: str, adapter_version: int | None,
                      target: Callable[[], EvalTarget]) -> AnswerQualityModel:
        """The version's stored per-answer predictor of `metric`, fitted on the held-out set the first time."""
        stored = self._stored(task_name, adapter_version)
        key = adapter_version if adapter_version is not None else BASE_VERSION
        if stored is not None:
            try:
                model = AnswerQualityModel.from_json(stored.params)
            except QualityModelError as exc:
                raise EstimationError(f"the stored predictor of '{task_name}' version {key}: {exc}") from None
            if model.metric == metric:
                return model
            raise EstimationError(f"the stored predictor of '{task_name}' version {key} predicts {model.metric}, "
                                  f"not {metric}")
        dataset = get_dataset(self.store, task.heldout_dataset, task=task_name)
        examples = dataset.load()[: task.estimate.calibration_examples]
        endpoint = target()
        answers = asyncio.run(self._held_out_answers(task, endpoint, examples, top_logprobs=None))
        kept = [(example, answer, values) for example, answer in zip(examples, answers, strict=True)
                if isinstance(answer.signal, dict) and (values := stored_token_signal(answer.signal)) is not None]
        if not kept:
            raise EstimationError(f"{endpoint.model} returned no token log-probabilities for {len(examples)} "
                                  "held-out examples")
        prompts = [example.last_user_text() for example, _, _ in kept]
        features = answer_features(np.stack([values for _, _, values in kept]), prompts,
                                   self.novelty(task_name, prompts))
        scores = sentence_scores(metric, [answer.text or "" for _, answer, _ in kept],
                                 [example.reference for example, _, _ in kept])
        try:
            model = fit_quality_model(features, scores, metric=metric, seed=self.config.evaluation.seed)
        except QualityModelError as exc:
            raise EstimationError(f"fitting the {metric} predictor of {endpoint.model} on "
                                  f"{dataset.manifest.ref}: {exc}") from None
        self._store(task_name, adapter_version, dataset.manifest.ref, model.method, model.to_json(), model.n)
        return model

    def novelty(self, task_name: str, prompts: list[str]) -> np.ndarray:
        """Each prompt's cosine distance to its nearest training prompts: the drift view's score, per text. The
        embedder and each task's fitted view are kept, so fitting a predictor and estimating its first window
        embed the reference once."""
        from tuneloop.monitor.embeddings import make_embedder
        from tuneloop.monitor.samples import reference_sample
        from tuneloop.monitor.views import TextFeatures

        if self._embedder is None:
            self._embedder = make_embedder(self.config.monitor.embedding_backend, self.config.data_path)
        view = self._novelty_views.get(task_name)
        if view is None:
            view = EmbeddingNoveltyView()
            view.fit(TextFeatures.build(reference_sample(self.config, self.store, task_name).texts, self._embedder))
            self._novelty_views[task_name] = view
        return np.asarray(view.distances(TextFeatures.build(prompts, self._embedder)))

    async def _held_out_answers(self, task: TaskConfig, target: EvalTarget, examples: list[Any], *,
                                top_logprobs: int | None) -> list[Answer]:
        settings = self.config.evaluation
        semaphore = asyncio.Semaphore(settings.concurrency)
        async with EndpointClient(target, settings, transport=self.transport,
                                  token=self.config.admin_token) as client:
            async def one(position: int, example: Any) -> Answer:
                body = request_body(target, task, example, settings.seed)
                body["logprobs"] = True
                if top_logprobs:
                    body["top_logprobs"] = top_logprobs
                async with semaphore:
                    return await client.ask(position, example, body)

            return list(await asyncio.gather(*(one(i, e) for i, e in enumerate(examples))))

    def _save(self, result: WindowEstimate, level: float) -> None:
        made = datetime.now(UTC)  # one timestamp for the three rows: the policy reads them back as one estimate
        with self.store.session() as session:
            for e in result.estimates:
                session.add(QualityEstimateRow(
                    created_at=made, task=result.task, adapter_version=result.adapter_version, metric=result.metric,
                    method=e.method,
                    window=result.window, value=e.value, ci_lower=e.ci_lower, ci_upper=e.ci_upper, level=level,
                    n_labelled=e.n_labelled, n_unlabelled=e.n_unlabelled,
                    detail={**e.detail, "n_answers": result.n_answers, "calibration": result.calibration["method"]}))
