"""The shipped ops pack against real components: the Debian Prometheus and Alertmanager on 127.0.0.1, started with
grafana/prometheus/prometheus.yml, the generated rules and grafana/alertmanager/alertmanager.yml, scraping the
session's live gateway (its /metrics carries the exporter) and its real vLLM.

Only what a local run must change is changed in the shipped files: addresses (compose service names -> 127.0.0.1
ports), the token file path, and timings (1s scrapes and rule evaluation, the breach alert's `for:` and
Alertmanager's group waits), so the test takes seconds instead of the production minutes; promtool's unit tests
cover the real `for:` durations. Everything else — routes, matchers, receivers, expressions — is as shipped.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.live import ADMIN_TOKEN, LiveGateway
from tests.monitor.test_ops_pack import tool
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.config import FloorRule
from tuneloop.evaluators.compare import MetricComparison
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.monitor.ops.files import panel_queries
from tuneloop.monitor.ops.rules import ALERT_RULES, grafana_alert_rules
from tuneloop.ports import free_port
from tuneloop.registry import find_alias
from tuneloop.retrain.jobs import JobStore
from tuneloop.retrain.records import AlertTrigger, GateCheck, GateDecision, Job, JobSettings, ManualTrigger
from tuneloop.tables import DriftResultRow, DriftRunRow, QualityEstimateRow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
VARIABLES = {"$task": ".*", "$adapter": ".*", "$metric": ".*"}
TOPICS = [("@united lost my luggage twice, never again", "negative", "bags"),
          ("@JetBlue the crew was wonderful today", "positive", "crew"),
          ("@Delta what time does boarding start?", "neutral", "info"),
          ("@AmericanAir four hour delay and no updates", "negative", "bags")]


@dataclass
class Stack:
    prometheus: str
    alertmanager: str


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not become ready in {timeout}s")


@contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def _local_prometheus_config(tmp: Path, live: LiveGateway, prom_port: int, am_port: int) -> Path:
    shipped = yaml.safe_load((GRAFANA / "prometheus/prometheus.yml").read_text())
    gateway = live.url.removeprefix("http://")
    local = {"tuneloop": gateway, "vllm": f"127.0.0.1:{live.config.serving.vllm_port}",
             "prometheus": f"127.0.0.1:{prom_port}"}
    for job in shipped["scrape_configs"]:
        job["static_configs"][0]["targets"] = [local[job["job_name"]]]
    shipped["global"].update(scrape_interval="1s", evaluation_interval="1s")
    shipped["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    rules = yaml.safe_load((GRAFANA / "prometheus/tuneloop-rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if rule.get("alert") == "TuneloopQualityBelowFloor":
                rule["for"] = "3s"
    (tmp / "tuneloop-rules.yml").write_text(yaml.safe_dump(rules))
    shipped["rule_files"] = [str(tmp / "tuneloop-rules.yml")]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(shipped))
    return path


def _local_alertmanager_config(tmp: Path, live: LiveGateway) -> Path:
    shipped = yaml.safe_load((GRAFANA / "alertmanager/alertmanager.yml").read_text())
    token = tmp / "admin_token"
    token.write_text(ADMIN_TOKEN)
    for receiver in shipped["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = re.sub(r"^http://tuneloop:8400", live.url, hook["url"])
            hook["http_config"]["authorization"]["credentials_file"] = str(token)
    for route in [shipped["route"], *shipped["route"]["routes"]]:
        route.update(group_wait="1s", group_interval="2s")
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(shipped))
    return path


@pytest.fixture
def stack(tmp_path: Path, live_gateway: LiveGateway) -> Iterator[Stack]:
    prometheus, alertmanager = tool("prometheus"), tool("prometheus-alertmanager")
    prom_port, am_port = free_port(), free_port()
    prom_config = _local_prometheus_config(tmp_path, live_gateway, prom_port, am_port)
    am_config = _local_alertmanager_config(tmp_path, live_gateway)
    with _process([alertmanager, f"--config.file={am_config}", f"--storage.path={tmp_path / 'am'}",
                   f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                  tmp_path / "alertmanager.log"), \
            _process([prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                      f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log"):
        _wait(f"http://127.0.0.1:{am_port}/-/ready")
        _wait(f"http://127.0.0.1:{prom_port}/-/ready")
        yield Stack(f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}")


def _query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def _seed(live: LiveGateway) -> None:
    """What a day of operation leaves in the store: a real eval through the gateway (with slices), traffic and an
    error, a drift check with its report, and a finished retraining job with a gate decision."""
    store, config = live.store, live.config
    tweets = [Example(id=f"o{i}", input=f"{text} #{i}", reference=label, meta={"topic": topic})
              for i, (text, label, topic) in enumerate(TOPICS * 4)]
    dataset = add_dataset(store, config.data_path, tweets, task="sentiment", name="ops-heldout", kind="heldout",
                          source="test")
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None
    settings = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"bootstrap_resamples": 300, "min_slice_size": 4, "concurrency": 4})})
    report = EvalRunner(settings, store, progress=False).run(
        EvalTarget("sentiment", champion.ref, champion.version, live.url), dataset)
    assert report.n == 16
    for task, text in (("sentiment", "@united where is my bag"), ("chat", "hello, how are you?")):
        answered = httpx.post(f"{live.url}/v1/chat/completions", timeout=120,
                              json={"model": task, "messages": [{"role": "user", "content": text}],
                                    "max_tokens": 8})
        assert answered.status_code == 200, answered.text
    assert httpx.post(f"{live.url}/v1/chat/completions", json={"model": "sentiment"}).status_code == 400
    with store.session() as session:
        run = DriftRunRow(task="sentiment", window=200, n_current=200, n_reference=2000, drifted=True,
                          false_alarm_rate=0.05, settings={"measured_false_alarm_rate": 0.04},
                          report_path="drift/sentiment/drift-1.html")
        session.add(run)
        session.flush()
        session.add(DriftResultRow(run_id=run.id, view="domain_classifier", column="prompt", method="m",
                                   score=0.71, threshold=0.58, drifted=True, window=200, n=200, status="ok"))
        # a live-traffic estimate as monitor/estimate.py stores one (tests/monitor/test_estimate.py makes real ones)
        for method, value, width, labelled in (("label_free", 0.74, 0.06, 0), ("prediction_powered", 0.70, 0.08, 40),
                                               ("labels_only", 0.68, 0.14, 40)):
            session.add(QualityEstimateRow(task="sentiment", adapter_version=champion.version, metric="accuracy",
                                           method=method, window=200, value=value, ci_lower=value - width,
                                           ci_upper=value + width, level=0.95, n_labelled=labelled,
                                           n_unlabelled=200 - labelled, detail={}))
    jobs = JobStore(store)
    job = jobs.submit("chat", ManualTrigger(key="ops-test-chat", reason="seeded"), runner="recording",
                      champion_version=1, settings=JobSettings(retrain=config.task("chat").retrain)).job
    for stage in ("assemble", "train", "evaluate"):
        with jobs.stage(job.id, stage):
            pass
    worse = MetricComparison("chrf", a=0.30, b=0.28, delta=-0.02, ci_low=-0.05, ci_high=0.01, p_value=0.2,
                             method="paired bootstrap", level=0.95, n=40, mde=0.12, paired_mde=0.08)
    jobs.finish(job.id, "rejected", decision=GateDecision(
        promote=False, metric="chrf", level=0.95, margin=0.1, champion="chat@1", candidate="chat@2",
        reasons=["seeded"], checks=[GateCheck(dataset="chat/live-heldout@1", role="heldout", n=40, mde=0.08,
                                              passed=False, reason="seeded", comparison=worse, runs=(1, 2))]))


def _alert_jobs(live: LiveGateway) -> list[tuple[Job, AlertTrigger]]:
    """Jobs the Alertmanager webhook started or joined, with the alert that did."""
    return [(job, received.trigger) for job in JobStore(live.store).recent()
            for received in job.triggers if isinstance(received.trigger, AlertTrigger)]


def test_every_panel_has_data_and_a_quality_breach_reaches_the_webhook(
        live_gateway: LiveGateway, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    sentiment = live_gateway.config.tasks["sentiment"]
    # a floor that holds, so the "distance to the floor" panel has a series; raised below to inject the breach
    monkeypatch.setattr(sentiment.policy, "floors", [FloorRule(metric="accuracy", dataset="sentiment/ops-heldout",
                                                               min=0.0)])
    _seed(live_gateway)

    # the scrape works, and rate() has samples to work with: traffic after the first scrape (a counter seen only
    # at one value has a rate of 0; the seed may finish before Prometheus's first scrape of the gateway)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(_query(stack, "up == 1")) < 3:
        time.sleep(0.5)
    targets = {r["metric"]["job"]: r["value"][1] for r in _query(stack, "up")}
    assert targets == {"tuneloop": "1", "vllm": "1", "prometheus": "1"}, targets
    for text in ("@united on time today", "@Delta lost my bag", "@JetBlue thanks"):
        assert httpx.post(f"{live_gateway.url}/v1/chat/completions", timeout=120, json={
            "model": "sentiment", "messages": [{"role": "user", "content": text}], "max_tokens": 4}).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _query(stack, "tuneloop:gateway_requests:rate5m > 0"):
        time.sleep(0.5)
    assert _query(stack, "tuneloop:gateway_requests:rate5m > 0"), "the recording rule never saw a request rate"

    empty = []
    for uid, title, expr in panel_queries():
        local = expr
        for variable, value in VARIABLES.items():
            local = local.replace(variable, value)
        result = _query(stack, local)
        if not result and not title.startswith("annotation: "):
            empty.append(f"{uid} / {title}: {local}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)
    for rule in grafana_alert_rules("x")["groups"][0]["rules"]:
        _query(stack, rule["data"][0]["model"]["expr"])  # Grafana's queries evaluate on the same Prometheus

    scraped = httpx.get(f"http://127.0.0.1:{live_gateway.config.serving.vllm_port}/metrics", timeout=10).text
    used_vllm = {n for _, _, e in panel_queries() for n in re.findall(r"vllm:[a-z0-9_:]+", e)}
    assert {n for n in used_vllm if not re.search(rf"^{re.escape(n)}[ {{]", scraped, re.MULTILINE)} == set()

    # inject a quality breach: a floor above the upper CI bound of the champion's latest score
    upper = _query(stack, 'tuneloop:champion_eval_score_ci_upper{task="sentiment", dataset="ops-heldout", '
                          'metric="accuracy"}')
    assert len(upper) == 1
    floor = min(1.0, float(upper[0]["value"][1]) + 0.05)
    assert not [a for a in httpx.get(f"{stack.alertmanager}/api/v2/alerts", timeout=10).json()
                if a["labels"]["alertname"] == "TuneloopQualityBelowFloor"], "no breach before the floor is raised"
    sentiment.policy.floors[0].min = floor
    deadline = time.monotonic() + 90
    recorded: list[tuple[Job, AlertTrigger]] = []
    while time.monotonic() < deadline and not recorded:
        recorded = _alert_jobs(live_gateway)
        time.sleep(1)
    alerts = httpx.get(f"{stack.alertmanager}/api/v2/alerts", timeout=10).json()
    names = {a["labels"]["alertname"] for a in alerts}
    assert "TuneloopQualityBelowFloor" in names, names
    assert recorded, f"Alertmanager did not deliver to the webhook; alerts there: {names}"
    assert {job.task for job, _ in recorded} == {"sentiment"}
    job, alert = recorded[0]
    assert alert.alertname == "TuneloopQualityBelowFloor" and job.id in live_gateway.runner.launched
    # only the retrain-routed alert went to the webhook: no other alert name became a trigger
    retrain_names = {r.name for r in ALERT_RULES if r.retrain}
    assert all(a.alertname in retrain_names for _, a in recorded)
    JobStore(live_gateway.store).finish(job.id, "failed", error="test: recorded, not run")
