"""A task's metric on the last window of served traffic, before (most of) the labels arrive.

The gateway captures each classification answer's label log-probabilities with the request
(serving/quality_signal.py). Here, off the request path:

1. the served adapter version's calibrator is loaded, or fitted once on the task's held-out set: its examples are
   asked through the gateway (marked as evaluation traffic, so they are not captured) with log-probabilities on,
   and temperature, isotonic or no calibration is chosen by held-out calibration error (monitor/answer_calibration.py);
2. the window's answers become calibrated label distributions, and whatever feedback has arrived for them their
   true labels;
3. the three estimates of monitor/estimators.py are computed and stored, for the CLI, the exporter and the policy.

Only answers of the task's current champion version count (a window straddling a promotion would mix two
models' calibrations), and only answers with a signal: non-streamed chat answers constrained to the labels.
Generation tasks have no estimator yet; asking for one is an error that says so.
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

from tuneloop.answer_signal import SIGNAL_TOP_LOGPROBS, label_logprobs, stored_label_logprobs
from tuneloop.challenger_sets.catalog import get_dataset
from tuneloop.config import Config, TaskConfig
from tuneloop.errors import EstimationError
from tuneloop.evaluators.client import EndpointClient, request_body
from tuneloop.evaluators.targets import EvalTarget, resolve_target, resolve_version
from tuneloop.monitor.answer_calibration import CalibrationError, Calibrator, choose_calibrator
from tuneloop.monitor.estimators import CLASSIFICATION_METRICS, Estimate, WindowData, estimate_all
from tuneloop.store import Store
from tuneloop.tables import AnswerCalibrationRow, QualityEstimateRow, TrafficRow

BASE_VERSION = 0  # the calibrations table's key for the base model


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
    if task.kind != "classification":
        raise EstimationError(f"task '{task_name}' is a {task.kind} task: label-free estimates exist for "
                              "classification tasks only so far")
    chosen = metric or task.primary_metric
    if chosen == "exact_match":
        chosen = "accuracy"  # a label answer is exactly right when it is the right label
    if chosen not in CLASSIFICATION_METRICS:
        raise EstimationError(f"metric '{chosen}' has no estimator; choose one of {list(CLASSIFICATION_METRICS)}")
    return chosen


class QualityEstimator:
    """Estimates for one config and store; `transport` lets tests answer calibration requests in-process."""

    def __init__(self, config: Config, store: Store, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config, self.store, self.transport = config, store, transport

    def estimate(self, task_name: str, *, window: int | None = None, metric: str | None = None,
                 target: EvalTarget | None = None, save: bool = True) -> WindowEstimate:
        task = self.config.task(task_name)
        chosen = estimable_metric(task_name, task, metric)
        size = window or task.estimate.window
        if not 1 <= size <= 20_000:
            raise EstimationError(f"--window {size}: must be between 1 and 20000 answers")
        if target is None:  # the champion; the gateway is asked only if its calibrator must be fitted
            _, version = resolve_version(self.config, self.store, task=task_name, adapter=None, base=False)
            adapter_version = version.version if version is not None else None
            model = version.ref if version is not None else self.config.base_model.name
        else:
            adapter_version, model = target.adapter_version, target.model
        rows, skipped = self._window(task_name, task, adapter_version, size)
        if not rows:
            raise EstimationError(
                f"no captured answers with a quality signal for {model}: answers get one when they are "
                "non-streamed chat requests constrained to the labels, with tasks.<name>.estimate.signal on")
        calibrator = self.calibrator(task_name, task, adapter_version,
                                     lambda: target or resolve_target(self.config, self.store, task=task_name))
        labels = list(task.labels)
        logprobs = np.stack([row[0] for row in rows])
        predicted = np.array([labels.index(row[1]) for row in rows])
        truth = np.array([-1 if row[2] is None else labels.index(row[2]) for row in rows])
        data = WindowData(predicted=predicted, probs=calibrator.apply(logprobs, predicted), truth=truth)
        estimates = estimate_all(chosen, data, task.estimate.level)
        result = WindowEstimate(task=task_name, metric=chosen, window=size, adapter_version=adapter_version,
                                n_answers=len(rows), skipped=skipped,
                                calibration={"method": calibrator.method, "n": calibrator.n,
                                             "ece": calibrator.ece}, estimates=estimates)
        if save:
            self._save(result, task.estimate.level)
        return result

    def _window(self, task_name: str, task: TaskConfig, version: int | None,
                size: int) -> tuple[list[tuple[np.ndarray, str, str | None]], dict[str, int]]:
        """The newest `size` answers of this version that carry a signal: (label log-probs, answer, reference)."""
        labels = list(task.labels)
        skipped = {"answer not a label": 0, "signal without the task's labels": 0}
        query = (select(TrafficRow.signal, TrafficRow.completion, TrafficRow.reference)
                 .where(TrafficRow.task == task_name, TrafficRow.status == 200, TrafficRow.shadow_of.is_(None),
                        TrafficRow.signal.is_not(None),
                        TrafficRow.adapter_version.is_(None) if version is None
                        else TrafficRow.adapter_version == version)
                 .order_by(TrafficRow.id.desc()).limit(size))
        rows: list[tuple[np.ndarray, str, str | None]] = []
        with self.store.session() as session:
            for signal, completion, reference in session.execute(query):
                answer = (completion or "").strip()
                values = stored_label_logprobs(signal, labels) if isinstance(signal, dict) else None
                if answer not in labels or (reference is not None and reference not in labels):
                    skipped["answer not a label"] += 1
                elif values is None:
                    skipped["signal without the task's labels"] += 1
                else:
                    rows.append((values, answer, reference))
        return rows, skipped

    def calibrator(self, task_name: str, task: TaskConfig, adapter_version: int | None,
                   target: Callable[[], EvalTarget]) -> Calibrator:
        """The stored calibrator of the version, fitted on the held-out set through `target()` the first time."""
        key = adapter_version if adapter_version is not None else BASE_VERSION
        with self.store.session() as session:
            row = session.scalars(select(AnswerCalibrationRow).where(
                AnswerCalibrationRow.task == task_name, AnswerCalibrationRow.adapter_version == key)).first()
            if row is not None:
                return Calibrator.from_json(row.params)
        dataset = get_dataset(self.store, task.heldout_dataset, task=task_name)
        examples = dataset.load()[: task.estimate.calibration_examples]
        endpoint = target()
        logprobs, predicted, truth = asyncio.run(self._held_out_signals(task, endpoint, examples))
        try:
            calibrator = choose_calibrator(logprobs, predicted, truth)
        except CalibrationError as exc:
            raise EstimationError(f"calibrating {endpoint.model} on {dataset.manifest.ref}: {exc}") from None
        with self.store.session() as session:
            session.add(AnswerCalibrationRow(task=task_name, adapter_version=key, dataset_ref=dataset.manifest.ref,
                                             method=calibrator.method, params=calibrator.to_json(), n=calibrator.n))
        return calibrator

    async def _held_out_signals(self, task: TaskConfig, target: EvalTarget,
                                examples: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = list(task.labels)
        settings = self.config.evaluation
        semaphore = asyncio.Semaphore(settings.concurrency)
        async with EndpointClient(target, settings, transport=self.transport,
                                  token=self.config.admin_token) as client:
            async def one(position: int, example: Any) -> Any:
                body = request_body(target, task, example, settings.seed)
                body.update(logprobs=True, top_logprobs=SIGNAL_TOP_LOGPROBS)
                async with semaphore:
                    return await client.ask(position, example, body)

            answers = await asyncio.gather(*(one(i, e) for i, e in enumerate(examples)))
        rows, predicted, truth = [], [], []
        for example, answer in zip(examples, answers, strict=True):
            text = (answer.text or "").strip()
            if answer.signal is None or text not in labels or example.reference not in labels:
                continue
            rows.append(label_logprobs(answer.signal, labels)[0])
            predicted.append(labels.index(text))
            truth.append(labels.index(example.reference))
        if not rows:
            raise EstimationError(f"{target.model} returned no log-probabilities for {len(examples)} held-out "
                                  "examples; the engine must allow --max-logprobs 20")
        return np.stack(rows), np.array(predicted), np.array(truth)

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
