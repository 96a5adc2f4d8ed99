"""Drift of a task's captured traffic against its training inputs, with calibrated thresholds; stored per run.

One run: the last N captured user prompts of the task (or a time window) against a seeded sample of the task's
training inputs, through every configured input view (monitor/views.py) and the output view
(monitor/output_view.py). Each view's threshold for this window size comes from calibration on no-drift windows
(monitor/calibration.py), computed once and stored. The task is `drifted` when any view crosses its threshold;
the per-view false-alarm budget is monitor.false_alarm_rate / number of views. Evidently is imported only here,
inside the run (it costs seconds), with DO_NOT_TRACK set.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tuneloop.config import Config
from tuneloop.monitor.calibration import (
    ANY_VIEW,
    Calibration,
    calibrate_views,
    calibration_size,
    load_calibrations,
    save_calibrations,
    threshold_from_null,
)
from tuneloop.monitor.embeddings import Embedder, calibration_suffix, make_embedder
from tuneloop.monitor.output_view import NULL_WINDOWS, OutputStatistic, heldout_answers
from tuneloop.monitor.samples import (
    DriftError,
    NotEnoughTraffic,
    ReferenceSample,
    TrafficWindow,
    reference_sample,
    traffic_window,
)
from tuneloop.monitor.views import INPUT_VIEWS, TextFeatures, make_input_views
from tuneloop.registry import find_alias
from tuneloop.store import Store
from tuneloop.tables import DriftResultRow, DriftRunRow

__all__ = ["DriftDetector", "DriftError", "NotEnoughTraffic", "DriftReport", "ViewResult"]

log = logging.getLogger(__name__)


@dataclass
class ViewResult:
    view: str
    column: str
    method: str
    score: float | None
    threshold: float | None
    drifted: bool
    window: int
    n: int
    status: str  # ok | unavailable
    detail: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None


@dataclass
class DriftReport:
    task: str
    drifted: bool
    window: int
    n_current: int
    n_reference: int
    reference: str
    false_alarm_rate: float
    alpha_per_view: float
    measured_false_alarm_rate: float | None
    views: list[ViewResult]
    adapter_version: int | None = None
    run_id: int | None = None
    report_path: str | None = None
    created_at: datetime | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["created_at"] = self.created_at.isoformat() if self.created_at else None
        return body


class DriftDetector:
    """Runs drift checks for tasks of one config; keeps the embedder (and its model) between runs."""

    def __init__(self, config: Config, store: Store, *, progress: bool = False) -> None:
        os.environ.setdefault("DO_NOT_TRACK", "1")
        self.config, self.store, self.progress = config, store, progress
        self.settings = config.monitor
        self._embedder: Embedder | None = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = make_embedder(self.settings.embedding_backend, self.config.data_path)
        return self._embedder

    @property
    def alpha_per_view(self) -> float:
        return self.settings.false_alarm_rate / len(self.settings.views)

    def run(self, task: str, *, window: int | None = None, since: datetime | None = None,
            until: datetime | None = None, save: bool = True, html: bool | None = None) -> DriftReport:
        task_config = self.config.task(task)
        started = time.perf_counter()
        size = window or self.settings.window
        current = traffic_window(self.store, task, last=None if since else size, since=since, until=until)
        if len(current) < self.settings.min_window:
            raise NotEnoughTraffic(f"task '{task}' has {len(current)} captured user prompts"
                             f"{' in that time window' if since else ''}; a drift check needs at least "
                             f"{self.settings.min_window} (monitor.min_window)")
        timings: dict[str, float] = {"read_s": time.perf_counter() - started}
        reference: ReferenceSample | None = None
        if any(name in INPUT_VIEWS for name in self.settings.views):
            reference = reference_sample(self.config, self.store, task)
            report = self.check(task, reference, current.prompts, timings=timings)
        else:
            report = DriftReport(task=task, drifted=False, window=len(current), n_current=len(current),
                                 n_reference=0, reference="", false_alarm_rate=self.settings.false_alarm_rate,
                                 alpha_per_view=self.alpha_per_view, measured_false_alarm_rate=None, views=[],
                                 timings=timings)
        self._output_view(task, task_config, current, report)
        report.drifted = any(v.drifted for v in report.views)
        report.timings["total_s"] = round(time.perf_counter() - started, 3)
        if save:
            self._save(report, reference, current, html=self.settings.html_report if html is None else html)
        return report

    def check(self, task: str, reference: ReferenceSample, prompts: list[str], *,
              timings: dict[str, float] | None = None) -> DriftReport:
        """The input views on `prompts` (no output view, nothing stored): what the bench and `run` share."""
        timings = timings if timings is not None else {}
        views = make_input_views(self.settings.views)
        needs_embeddings = any(v.needs_embeddings for v in views)
        t0 = time.perf_counter()
        embedder = self.embedder if needs_embeddings else None
        reference_features = TextFeatures.build(reference.texts, embedder, progress=self.progress)
        current_features = TextFeatures.build(prompts, embedder, progress=self.progress)
        timings["features_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        for view in views:
            view.fit(reference_features)
        calibrations = self.calibrations(task, reference, views, len(prompts), embedder)
        timings["calibration_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        results = []
        for view in views:
            score, detail = view.score(current_features)
            cal = calibrations[view.name]
            results.append(ViewResult(view.name, view.column, view.method, score, cal.threshold,
                                      score > cal.threshold, len(prompts), len(prompts), "ok", detail,
                                      asdict(cal)))
        timings["views_s"] = round(time.perf_counter() - t0, 3)
        any_view = calibrations.get(ANY_VIEW)
        return DriftReport(task=task, drifted=any(r.drifted for r in results), window=len(prompts),
                           n_current=len(prompts), n_reference=len(reference.texts), reference=reference.dataset_ref,
                           false_alarm_rate=self.settings.false_alarm_rate, alpha_per_view=self.alpha_per_view,
                           measured_false_alarm_rate=any_view.false_alarm_rate if any_view else None,
                           views=results, timings=timings)

    def calibrations(self, task: str, reference: ReferenceSample, views: list[Any], n: int,
                     embedder: Embedder | None) -> dict[str, Calibration]:
        """Stored calibrations for this reference and window size; the missing ones are computed and stored."""
        window = calibration_size(n, len(reference.pool))
        alpha = self.alpha_per_view
        key = reference.key + calibration_suffix(self.settings.embedding_backend)
        stored = load_calibrations(self.store, task, key, window, alpha, self.settings.calibration_windows)
        missing = [v for v in views if v.name not in stored]
        if missing:
            log.info("calibrating %s drift thresholds for %s at W=%d on %d no-drift windows (once)",
                     ", ".join(v.name for v in missing), task, window, self.settings.calibration_windows)
            pool = TextFeatures.build(reference.pool, embedder if any(v.needs_embeddings for v in missing) else None,
                                      progress=self.progress)
            fresh = calibrate_views(views, pool, window, alpha, self.settings.calibration_windows,
                                    self.settings.seed, progress=self.progress)
            save_calibrations(self.store, task, key, alpha, fresh)
            stored = {c.view: c for c in fresh}
        return stored

    def _output_view(self, task: str, task_config: Any, current: TrafficWindow, report: DriftReport) -> None:
        if "output" not in self.settings.views:
            return
        champion = find_alias(self.store, task, "champion")
        result = ViewResult("output", "completion", "", None, None, False, len(current), 0, "unavailable")
        report.views.append(result)
        if champion is None:
            result.detail = {"reason": f"task '{task}' has no champion"}
            return
        report.adapter_version = champion.version
        answers = [c for c, v in zip(current.completions, current.adapter_versions, strict=True)
                   if v == champion.version and c is not None]
        heldout = heldout_answers(self.store, task, task_config, champion.version)
        if heldout is None:
            result.detail = {"reason": f"no complete eval of {champion.ref} on {task_config.heldout_dataset} yet: "
                                       "its held-out answers are the reference"}
            return
        if len(answers) < self.settings.min_window:
            result.detail = {"reason": f"{len(answers)} answers by {champion.ref} in the window; need "
                                       f"{self.settings.min_window}"}
            return
        import numpy as np

        statistic = OutputStatistic(task_config, heldout.answers)
        score, detail = statistic.score(answers)
        rng = np.random.default_rng(self.settings.seed + len(answers))
        threshold, mean, sd = threshold_from_null(statistic.null_scores(len(answers), NULL_WINDOWS, rng),
                                                  self.alpha_per_view)
        measured = float(np.mean(statistic.null_scores(len(answers), NULL_WINDOWS, rng) > threshold))
        calibration = Calibration("output", len(answers), self.alpha_per_view, threshold, mean, sd, measured,
                                  NULL_WINDOWS)
        result.method, result.score, result.threshold, result.n = statistic.method, score, threshold, len(answers)
        result.drifted, result.status = score > threshold, "ok"
        result.detail = {**detail, "adapter": champion.ref, "heldout_run": heldout.run_id}
        result.calibration = asdict(calibration)

    def _save(self, report: DriftReport, reference: ReferenceSample | None, current: TrafficWindow, *,
              html: bool) -> None:
        with self.store.session() as session:
            row = DriftRunRow(task=report.task, adapter_version=report.adapter_version, window=report.window,
                              n_current=report.n_current, n_reference=report.n_reference, drifted=report.drifted,
                              false_alarm_rate=report.false_alarm_rate,
                              settings={"reference": report.reference,
                                        "reference_key": reference.key if reference else None,
                                        "alpha_per_view": report.alpha_per_view,
                                        "measured_false_alarm_rate": report.measured_false_alarm_rate,
                                        "since": current.since.isoformat() if current.since else None,
                                        "until": current.until.isoformat() if current.until else None,
                                        "timings": report.timings})
            session.add(row)
            session.flush()
            for v in report.views:
                session.add(DriftResultRow(run_id=row.id, view=v.view, column=v.column, method=v.method,
                                           score=v.score, threshold=v.threshold, drifted=v.drifted, window=v.window,
                                           n=v.n, status=v.status, detail={**v.detail, "calibration": v.calibration}))
            report.run_id, report.created_at = row.id, row.created_at
        if html and reference is not None:
            from tuneloop.monitor.html_report import render_drift_html, save_report

            t0 = time.perf_counter()
            path = save_report(render_drift_html(reference.texts, current.prompts), self.reports_dir(report.task),
                               f"drift-{report.run_id}.html")
            report.timings["html_s"] = round(time.perf_counter() - t0, 3)
            report.report_path = str(path.relative_to(self.config.data_path / "reports"))
            with self.store.session() as session:
                stored = session.get(DriftRunRow, report.run_id)
                assert stored is not None
                stored.report_path = report.report_path

    def reports_dir(self, task: str) -> Path:
        return self.config.data_path / "reports" / "drift" / task
