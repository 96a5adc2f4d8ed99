"""Drift with the real parts: Evidently 0.7, the packaged MiniLM embeddings, the embedded airline/other-topic
tweets, a real SQLite store. Sized small (1,100-text reference, 30 calibration windows) to keep the suite fast."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.monitor.helpers import capture
from tests.stub_endpoint import serving_app
from tuneloop.challenger_sets.catalog import get_dataset
from tuneloop.challenger_sets.embedded import ensure_embedded_datasets
from tuneloop.config import Config
from tuneloop.monitor.drift import DriftDetector
from tuneloop.monitor.embeddings import EmbeddingCache, space_of
from tuneloop.monitor.samples import NotEnoughTraffic
from tuneloop.store import Store
from tuneloop.tables import DriftCalibrationRow, DriftResultRow, DriftRunRow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOSTILE = "</script><script>window.__pwned={n}</script><img src=x onerror=alert(1)> #coachella tickets {n}"
SAVED_REPORTS: dict[str, Path] = {}  # the drifted page, for the browser test below


@pytest.fixture
def small_monitor(config: Config, store: Store) -> Config:
    config.monitor.reference_size = 1100  # over 1,000: Evidently's plain classifier, not the slow bootstrap one
    config.monitor.calibration_pool_size = 600
    config.monitor.calibration_windows = 30
    config.monitor.views = ["domain_classifier", "embedding_novelty", "descriptors", "output"]
    ensure_embedded_datasets(store, config.data_path, ["sentiment"])
    return config


def _inputs(store: Store, name: str, n: int, seed: int) -> list[str]:
    texts = [e.input or "" for e in get_dataset(store, f"sentiment/{name}").load()]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def test_other_topics_drift_and_held_out_airline_tweets_stay_quiet(small_monitor: Config, store: Store) -> None:
    detector = DriftDetector(small_monitor, store)
    with pytest.raises(NotEnoughTraffic, match="has 0 captured user prompts"):
        detector.run("sentiment", window=150)

    capture(store, "sentiment", _inputs(store, "heldout", 150, seed=1))
    quiet = detector.run("sentiment", window=150)
    by_view = {v.view: v for v in quiet.views}
    assert quiet.drifted is False, [(v.view, v.score, v.threshold) for v in quiet.views]
    assert {"domain_classifier", "embedding_novelty", "descriptors"} <= {v for v, r in by_view.items()
                                                                         if r.status == "ok"}
    assert by_view["output"].status == "unavailable" and "no champion" in by_view["output"].detail["reason"]
    assert by_view["domain_classifier"].detail["evidently_variant"] == "classifier"
    # thresholds come from calibration at this window size, not Evidently's 0.55 default
    calibration = by_view["domain_classifier"].calibration
    assert calibration is not None and calibration["window"] == 150 and calibration["n_windows"] == 30
    assert calibration["threshold"] != 0.55 and 0 <= calibration["false_alarm_rate"] <= 0.2
    assert quiet.alpha_per_view == pytest.approx(0.05 / 4)

    hostile = [HOSTILE.format(n=i) for i in range(30)]
    capture(store, "sentiment", [*_inputs(store, "other-topics", 120, seed=2), *hostile])
    drifted = detector.run("sentiment", window=150)
    assert drifted.drifted is True
    flagged = {v.view for v in drifted.views if v.drifted}
    assert {"domain_classifier", "embedding_novelty"} <= flagged
    drifted_score, quiet_score = drifted.views[0].score, quiet.views[0].score
    assert drifted_score is not None and quiet_score is not None and drifted_score > quiet_score

    # stored: two runs with per-view rows; calibrations computed once and reused by the second run
    with store.session() as session:
        runs = session.scalars(select(DriftRunRow).order_by(DriftRunRow.id)).all()
        assert [r.drifted for r in runs] == [False, True]
        rows = session.scalars(select(DriftResultRow).where(DriftResultRow.run_id == runs[1].id)).all()
        assert {r.view for r in rows} == {"domain_classifier", "embedding_novelty", "descriptors", "output"}
        calibrations = session.scalars(select(DriftCalibrationRow)).all()
        assert sorted(c.view for c in calibrations) == ["any", "descriptors", "domain_classifier",
                                                        "embedding_novelty"]

    # embeddings are cached per text in the data dir, in the configured backend's space (onnx-int8 by default):
    # the second run embedded only the 150 new prompts
    assert small_monitor.monitor.embedding_backend == "onnx-int8" and detector.embedder.backend == "onnx-int8"
    cache = EmbeddingCache(small_monitor.data_path / "cache" / "embeddings.sqlite",
                           space=space_of(small_monitor.monitor.embedding_backend))
    assert len(cache) >= 1100 + 600 + 300
    assert detector.embedder.embedded == 1100 + 600 + 150 + 150

    # the Evidently page is saved (its characteristic examples include captured prompts), and a captured <script>
    # is data in it, not markup
    assert quiet.report_path is not None and drifted.report_path is not None
    page = (small_monitor.data_path / "reports" / drifted.report_path).read_text()
    assert "characteristic examples" in page
    assert "</script><script>window.__pwned" not in page
    assert "\\u003c/script\\u003e\\u003cscript\\u003ewindow.__pwned" in page
    SAVED_REPORTS[drifted.report_path] = small_monitor.data_path / "reports" / drifted.report_path
    assert json.loads(json.dumps(drifted.to_json()))["drifted"] is True


def test_a_time_window_selects_by_capture_time(small_monitor: Config, store: Store) -> None:
    from datetime import UTC, datetime, timedelta

    capture(store, "sentiment", _inputs(store, "heldout", 40, seed=3))
    small_monitor.monitor.views = ["descriptors"]
    report = DriftDetector(small_monitor, store).run("sentiment", since=datetime.now(UTC) - timedelta(hours=1),
                                                     html=False)
    assert report.n_current == 40 and report.report_path is None
    with pytest.raises(NotEnoughTraffic, match="in that time window"):
        DriftDetector(small_monitor, store).run("sentiment", since=datetime.now(UTC) + timedelta(hours=1))


def test_the_saved_report_served_by_the_gateway_renders_in_chromium_without_running_captured_script(
        tmp_path: Path) -> None:
    """Real headless Chromium (Debian package) opens the drifted report from the test above through the gateway's
    /reports route: no script errors, the drift verdicts rendered, and the captured <script> prompts are text."""
    from tests.browser import click_text, find_chromium, visit
    from tests.serving.test_gateway import TOKEN, _gateway
    from tuneloop.serving.gateway import create_app

    if find_chromium() is None:
        pytest.fail("Chromium is not installed: `make install` installs the Debian package chromium")
    if not SAVED_REPORTS:
        pytest.fail("the drift test above did not save a report (it failed or was deselected)")
    relative, page = next(iter(SAVED_REPORTS.items()))
    for gateway in _gateway(tmp_path):
        served = gateway.config.data_path / "reports" / relative
        served.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, served)
        with serving_app(create_app(gateway.ctx)) as url:
            refused = visit(f"{url}/reports/{relative}", settle_s=0.5)
            assert refused.status == 401, "the report is behind the admin token"
            seen = visit(f"{url}/reports/{relative}", headers={"Authorization": f"Bearer {TOKEN}"},
                         actions=[click_text("current: characteristic examples")],
                         probes={"pwned": "typeof window.__pwned",
                                 "scripts_in_body": "document.body.querySelectorAll('script').length",
                                 "images": "document.querySelectorAll('img').length"})
    assert seen.status == 200
    assert seen.errors == [], seen.errors
    assert "Drift in column 'prompt'" in seen.text and "Data drift detected" in seen.text, seen.text[:2000]
    assert seen.probes["pwned"] == "undefined", "a captured prompt ran as script"
    assert seen.probes["images"] == 0, "a captured <img onerror> became an element"
    assert "window.__pwned=" in seen.text, "the hostile prompt is shown as text among the examples"
