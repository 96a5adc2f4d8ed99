"""The exporter reads the store at scrape time: series checked with registry.get_sample_value, on the gateway's
/metrics, and through a real Prometheus (Debian package) scraping `tuneloop exporter` on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.monitor.helpers import evaluate_champion, make_dataset, register_champion
from tuneloop.config import Config, FloorRule
from tuneloop.events import record_event
from tuneloop.monitor.exporter import MonitorCollector
from tuneloop.monitor.policy import Policy
from tuneloop.ports import free_port
from tuneloop.store import Store
from tuneloop.tables import DriftResultRow, DriftRunRow, JobRunRow


def _populate(config: Config, store: Store, *, champion: bool = True) -> None:
    """One champion with an eval, a drifted check, an open incident, events and scheduler runs."""
    if champion:
        register_champion(store, "sentiment", 1)
    evaluate_champion(config, store, make_dataset(store, config, "fresh", 60), accuracy_every=2)
    with store.session() as session:
        run = DriftRunRow(task="sentiment", window=200, n_current=200, n_reference=2000, drifted=True,
                          false_alarm_rate=0.05, settings={"measured_false_alarm_rate": 0.03})
        session.add(run)
        session.flush()
        session.add(DriftResultRow(run_id=run.id, view="embedding_novelty", column="prompt_embedding", method="m",
                                   score=0.61, threshold=0.37, drifted=True, window=200, n=200, status="ok"))
        session.add(DriftResultRow(run_id=run.id, view="output", column="completion", method="", score=None,
                                   threshold=None, drifted=False, window=200, n=0, status="unavailable"))
        session.add(JobRunRow(job="drift", task="sentiment", status="ok", holder="h", attempt=1))
        session.add(JobRunRow(job="eval", task="sentiment", status="failed", holder="h", attempt=1, error="x"))
    config.tasks["sentiment"].policy.floors = [FloorRule(metric="accuracy", dataset="sentiment/fresh", min=0.6)]
    Policy(config, store).evaluate("sentiment")
    record_event(store, "rollback", "sentiment: back", task="sentiment")


def test_collector_series_come_from_the_store(config: Config, store: Store) -> None:
    _populate(config, store)
    registry = CollectorRegistry()
    registry.register(MonitorCollector(config, store))
    value = registry.get_sample_value
    labels = {"task": "sentiment", "adapter": "sentiment@1", "dataset": "fresh", "metric": "accuracy"}
    assert value("tuneloop_eval_score", labels) == pytest.approx(0.5)
    low, high = value("tuneloop_eval_score_ci_lower", labels), value("tuneloop_eval_score_ci_upper", labels)
    assert low is not None and high is not None and low < 0.5 < high
    assert value("tuneloop_eval_examples", {k: labels[k] for k in ("task", "adapter", "dataset")}) == 60
    assert value("tuneloop_drift_detected", {"task": "sentiment"}) == 1
    assert value("tuneloop_drift_score", {"task": "sentiment", "view": "embedding_novelty"}) == pytest.approx(0.61)
    assert value("tuneloop_drift_threshold", {"task": "sentiment", "view": "embedding_novelty"}) == 0.37
    assert value("tuneloop_drift_score", {"task": "sentiment", "view": "output"}) is None  # unavailable: no series
    assert value("tuneloop_drift_false_alarm_rate", {"task": "sentiment", "kind": "measured"}) == 0.03
    assert value("tuneloop_adapter_info", {"task": "sentiment", "alias": "champion", "adapter": "sentiment@1"}) == 1
    assert value("tuneloop_champion_version", {"task": "sentiment"}) == 1
    assert value("tuneloop_incidents_open", {"task": "sentiment", "rule": "floor:accuracy:fresh"}) == 1
    assert value("tuneloop_incidents_open", {"task": "chat", "rule": "any"}) == 0
    assert value("tuneloop_breaches_total", {"task": "sentiment"}) == 1
    assert value("tuneloop_rollbacks_total", {"task": "sentiment"}) == 1
    assert value("tuneloop_promotions_total", {"task": "chat"}) == 0
    runs = {"task": "sentiment", "schedule": "eval", "status": "failed"}
    assert value("tuneloop_scheduler_job_runs_total", runs) == 1
    assert value("tuneloop_scheduler_job_failures_total", {"task": "sentiment", "schedule": "eval"}) == 1
    age = value("tuneloop_seconds_since_last_success", {"task": "sentiment", "schedule": "drift"})
    assert age is not None and 0 <= age < 120
    assert value("tuneloop_store_up") == 1
    text = generate_latest(registry).decode()
    assert "# TYPE tuneloop_breaches_total counter" in text


def test_values_survive_a_restart_because_they_live_in_the_store(config: Config, store: Store) -> None:
    _populate(config, store)
    other = Store(store.url, migrate=False)  # a second process, or the same one after a restart
    registry = CollectorRegistry()
    registry.register(MonitorCollector(config, other))
    assert registry.get_sample_value("tuneloop_drift_detected", {"task": "sentiment"}) == 1


def test_an_unreachable_store_reports_store_down_instead_of_failing_the_scrape(config: Config) -> None:
    store = Store(f"postgresql+psycopg://nobody:x@127.0.0.1:{free_port()}/none", migrate=False)  # nothing listens
    registry = CollectorRegistry()
    registry.register(MonitorCollector(config, store))
    assert registry.get_sample_value("tuneloop_store_up") == 0
    assert registry.get_sample_value("tuneloop_drift_detected", {"task": "sentiment"}) is None


def test_gateway_metrics_and_reports_route(tmp_path: Path) -> None:
    from tests.serving.test_gateway import TOKEN, _gateway
    from tuneloop.conductor.process import collectors
    from tuneloop.serving.server import GatewayExtensions

    gen = _gateway(tmp_path, extend=lambda config, store: GatewayExtensions(collectors=collectors(config, store)))
    gateway = next(gen)
    try:
        _populate(gateway.config, gateway.store, champion=False)  # the gateway fixture's sentiment@1 is champion
        metrics = gateway.http.get("/metrics").text
        assert 'tuneloop_drift_detected{task="sentiment"} 1.0' in metrics
        series = 'tuneloop_eval_score{adapter="sentiment@1",dataset="fresh",metric="accuracy",task="sentiment"}'
        assert series in metrics
        assert "tuneloop_engine_up 1.0" in metrics  # the serving collector is still there beside the monitor one
        assert 'tuneloop_retrain_jobs{state="queued",task="sentiment"} 0.0' in metrics  # and retraining's
        reports = gateway.config.data_path / "reports" / "drift" / "sentiment"
        reports.mkdir(parents=True)
        (reports / "drift-1.html").write_text("<html>report</html>")
        (gateway.config.data_path / "secret.txt").write_text("no")
        assert gateway.http.get("/reports/drift/sentiment/drift-1.html").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        ok = gateway.http.get("/reports/drift/sentiment/drift-1.html", headers=auth)
        assert ok.status_code == 200 and ok.text == "<html>report</html>"
        assert ok.headers["x-content-type-options"] == "nosniff"
        assert gateway.http.get("/reports/../secret.txt", headers=auth).status_code == 404
        assert gateway.http.get("/reports/drift/sentiment/%2e%2e/%2e%2e/%2e%2e/secret.txt",
                                headers=auth).status_code == 404
        assert gateway.http.get("/reports/drift/sentiment/nope.html", headers=auth).status_code == 404
    finally:
        gen.close()


# A real Prometheus --------------------------------------------------------------------------------------------

@pytest.fixture
def exporter_process(config: Config, store: Store, tmp_path: Path) -> Iterator[int]:
    _populate(config, store)
    (tmp_path / "tuneloop.yaml").write_text(f"data_dir: {config.data_path}\n")
    port = free_port()
    log = tmp_path / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneloop", "--config", str(tmp_path / "tuneloop.yaml"),
                                 "exporter", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError(f"exporter did not start: {log.read_text()}")
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.integration
def test_real_prometheus_scrapes_the_exporter(exporter_process: int, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the Debian package `prometheus` is not installed: run `make install` (it installs it)")
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tuneloop\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_process}']\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{prom_port}/api/v1/query"
        found: dict[str, list] = {}
        deadline = time.monotonic() + 60
        queries = {"eval": 'tuneloop_eval_score{task="sentiment",metric="accuracy"}',
                   "drift": 'tuneloop_drift_detected{task="sentiment"}', "up": 'up{job="tuneloop"}'}
        while time.monotonic() < deadline and len(found) < len(queries):
            for name, query in queries.items():
                try:
                    result = httpx.get(api, params={"query": query}, timeout=2).json()["data"]["result"]
                except (httpx.HTTPError, KeyError, ValueError):  # ValueError: "Service Unavailable" while starting
                    result = []
                if result:
                    found[name] = result
            time.sleep(0.5)
        assert set(found) == set(queries), f"Prometheus returned only {sorted(found)}"
        assert float(found["eval"][0]["value"][1]) == pytest.approx(0.5)
        assert found["eval"][0]["metric"]["adapter"] == "sentiment@1"
        assert float(found["drift"][0]["value"][1]) == 1
        assert float(found["up"][0]["value"][1]) == 1
    finally:
        proc.terminate()
        proc.wait(15)


def test_settings_and_reports_are_exported_for_the_alert_rules(config: Config, store: Store) -> None:
    _populate(config, store)
    config.tasks["sentiment"].schedule.eval = "*/20 * * * *"
    with store.session() as session:
        session.add(DriftRunRow(task="sentiment", window=200, n_current=200, n_reference=2000, drifted=False,
                                false_alarm_rate=0.05, report_path="drift/sentiment/drift-7.html"))
    registry = CollectorRegistry()
    registry.register(MonitorCollector(config, store))
    value = registry.get_sample_value
    assert value("tuneloop_quality_floor", {"task": "sentiment", "dataset": "fresh", "metric": "accuracy"}) == 0.6
    assert value("tuneloop_schedule_interval_seconds", {"task": "sentiment", "schedule": "eval"}) == 1200
    assert value("tuneloop_schedule_interval_seconds", {"task": "sentiment", "schedule": "drift"}) == 900
    assert value("tuneloop_task_primary_metric", {"task": "sentiment", "metric": "macro_f1"}) == 1
    with store.session() as session:
        latest_with_report = max(r.id for r in session.query(DriftRunRow) if r.report_path)
    assert value("tuneloop_drift_report_run_id", {"task": "sentiment"}) == latest_with_report

