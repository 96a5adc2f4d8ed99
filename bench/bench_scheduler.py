"""`bench scheduler`: what scheduled evals and drift checks cost the control plane as tasks grow to one hundred.

Issue 25 asks that the scheduler's cost for 100 tasks be measured and linear. For N tasks (all sharing the
sentiment task's data, W = 200 captured prompts each, a real SQLite store) this runs one full round of the real
scheduler (APScheduler with its job store in the database, the lease, `execute`'s job_runs rows and events, the
policy evaluated after every job as `tuneloop run` does) where every task's drift check is real (read the window,
embed from the cache, fit and score the calibrated views, store the run) and every task's eval job is dispatched,
recorded and followed by the policy but asks no model (its inference is per example, measured by `bench eval`).
Then one Prometheus scrape of the exporter over the N tasks' results.

Linear means the cost per task stays flat as N grows: the table divides each cost by N. Sizes run in the order
10, 100, 50 then 1 (not monotone), each in a fresh store. One-off work is excluded and said so: the ONNX model's
build and the embeddings of the prompt pool (shared by all tasks, warmed first), and each task's drift calibration
(computed once for the first task and copied to the others, which share its reference: calibration is once per
task and window size, stored).
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select

from bench.setup import sentiment_sets
from bench.tables import Table, emit
from tuneloop.config import Config, parse_config
from tuneloop.store import Store

SIZES = (10, 100, 50, 1)
QUICK_SIZES = (3, 1)
WINDOW = 200


def run(*, quick: bool = False) -> list[Table]:
    sizes = QUICK_SIZES if quick else SIZES
    tweets = list(dict.fromkeys(e.last_user_text() for name in ("heldout", "other-topics")
                                for e in sentiment_sets()[name]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            measured = _round(Path(tmp) / f"tasks-{n}", n, tweets, calibration_windows=20 if quick else 200)
            rows.append([n, f"{measured['sync_s'] * 1000:.0f}", f"{measured['round_s']:.1f}",
                         f"{measured['round_s'] / n * 1000:.0f}",
                         f"{measured['scrape_s'] * 1000:.0f}", f"{measured['scrape_s'] / n * 1000:.1f}",
                         measured["series"], measured["jobs"]])
            print(f"scheduler n={n}: {measured}", flush=True)
    rows.sort(key=lambda r: r[0])
    return [emit("Scheduler cost as tasks grow: one round of every task's eval and drift jobs, and one scrape",
                 ["tasks", "job sync (ms)", "round (s)", "round per task (ms)",
                  "scrape (ms)", "scrape per task (ms)", "exported series", "jobs run"], rows, key="scheduler",
                 notes=f"Real APScheduler + SQLite job store, lease, job_runs rows, policy after each job; drift "
                       f"checks real over W = {WINDOW} captured prompts per task (embeddings cached, calibration "
                       "copied from the first task: both one-off); eval jobs dispatched and recorded without "
                       "model inference (per example: bench eval). 'round' = first job start to last job end, "
                       "APScheduler's pool running jobs side by side on the 2 cores. Sizes run "
                       "10, 100, 50, 1, each in a fresh store. Linear = the per-task columns stay flat.")]


def _config(folder: Path, n: int, calibration_windows: int) -> Config:
    """N copies of the sentiment task, t000..t{N-1}, evaluated and checked every hour (first run at start)."""
    sentiment = Config().tasks["sentiment"].model_dump(mode="json", exclude_defaults=True)
    sentiment["schedule"] = {"eval": "1h", "drift": "1h"}
    document = {"data_dir": "data", "monitor": {"window": WINDOW, "calibration_windows": calibration_windows},
                "tasks": {f"t{i:03d}": sentiment for i in range(n)}}
    folder.mkdir(parents=True)
    (folder / "tuneloop.yaml").write_text(yaml.safe_dump(document))
    return parse_config((folder / "tuneloop.yaml").read_text(), config_dir=folder)


def _round(folder: Path, n: int, tweets: list[str], *, calibration_windows: int) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    from tuneloop.challenger_sets.embedded import ensure_embedded_datasets
    from tuneloop.monitor.calibration import load_calibrations, save_calibrations
    from tuneloop.monitor.drift import DriftDetector
    from tuneloop.monitor.embeddings import calibration_suffix
    from tuneloop.monitor.exporter import MonitorCollector
    from tuneloop.monitor.jobs import Skipped
    from tuneloop.monitor.policy import Policy
    from tuneloop.monitor.samples import reference_sample
    from tuneloop.monitor.scheduled import scheduled_drift
    from tuneloop.monitor.scheduler import TuneloopScheduler
    from tuneloop.tables import DriftCalibrationRow, JobRunRow, TrafficRow

    config = _config(folder, n, calibration_windows)
    store = Store(config.resolved_database_url)
    try:
        ensure_embedded_datasets(store, config.data_path, ["sentiment"])
        tasks = list(config.tasks)
        rng = random.Random(n)
        now = datetime.now(UTC)
        with store.session() as session:
            session.add_all(TrafficRow(request_id=uuid.uuid4().hex, created_at=now, task=task, adapter_version=1,
                                       route="champion", endpoint="chat", prompt_text=text, messages=[],
                                       completion="negative", latency_ms=1.0, status=200)
                            for task in tasks for text in rng.sample(tweets, WINDOW))
        detector = DriftDetector(config, store)
        reference = reference_sample(config, store, tasks[0])
        detector.embedder.embed(reference.texts + reference.pool + tweets)  # one-off: the shared pool's vectors
        detector.run(tasks[0], save=False)  # one-off: calibrates the shared reference for the first task
        with store.session() as session:
            first = session.scalars(select(DriftCalibrationRow).where(DriftCalibrationRow.task == tasks[0])).first()
            assert first is not None, "the first check stored its calibration"
            window, alpha = first.window, first.alpha
        key = reference.key + calibration_suffix(config.monitor.embedding_backend)
        stored = load_calibrations(store, tasks[0], key, window, alpha, calibration_windows)
        assert stored, "the first task's calibration loads under the key the detector uses"
        for task in tasks[1:]:
            save_calibrations(store, task, key, alpha, list(stored.values()))

        policy = Policy(config, store)
        scheduler = TuneloopScheduler(config, store, {"eval": lambda task: Skipped("bench: no model asked"),
                                                      "drift": lambda task: scheduled_drift(detector, task)},
                                      holder="bench", on_success=lambda kind, task: policy.evaluate(task))
        started = time.perf_counter()
        scheduler.start()
        sync_s = time.perf_counter() - started
        expected = 2 * n
        deadline = time.monotonic() + 600 + 5 * n
        while time.monotonic() < deadline:
            with store.session() as session:
                runs = list(session.scalars(select(JobRunRow).where(JobRunRow.finished_at.is_not(None))))
            if len(runs) >= expected:
                break
            time.sleep(0.2)
        scheduler.stop()
        if len(runs) < expected:
            raise RuntimeError(f"{len(runs)} of {expected} jobs finished within the deadline")
        failed = [r for r in runs if r.status != "ok"]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0].job} {failed[0].task}: "
                               f"{failed[0].error}")
        finished = [r.finished_at for r in runs if r.finished_at is not None]  # all of them: the query asked so
        round_s = (max(finished) - min(r.started_at for r in runs)).total_seconds()
        registry = CollectorRegistry()
        registry.register(MonitorCollector(config, store))
        generate_latest(registry)  # the first scrape warms SQLAlchemy's statement caches
        t0 = time.perf_counter()
        text = generate_latest(registry).decode()
        scrape_s = time.perf_counter() - t0
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        return {"sync_s": sync_s, "round_s": round_s, "scrape_s": scrape_s,
                "series": series, "jobs": len(runs)}
    finally:
        store.close()

