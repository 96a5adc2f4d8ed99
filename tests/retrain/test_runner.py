"""The local runner: a detached worker process with the job's config snapshot (owner-only, the database URL and
admin token resolved), its log in the job's folder, and one CPU thread beside the engine unless told otherwise."""

from __future__ import annotations

import json
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tuneloop.config import Config, RetrainConfig
from tuneloop.retrain.records import Job, JobSettings
from tuneloop.retrain.runner import LocalRunner, job_dir

# A stand-in worker module: prints what the real worker would be started with.
ENV_WORKER = "tests.retrain.env_worker"


def _job(job_id: int) -> Job:
    now = datetime.now(UTC)
    return Job(id=job_id, task="sentiment", state="queued", created_at=now, updated_at=now, finished_at=None,
               runner="local", pid=None, host=None, heartbeat_at=None, log_path=None, champion_version=1,
               candidate_version=None, dataset_ref=None, stages={}, decision=None, watch=None,
               settings=JobSettings(retrain=RetrainConfig()), error=None, triggers=[])


def _launched_output(config: Config, job_id: int) -> dict[str, Any]:
    LocalRunner(config, worker_module=ENV_WORKER).launch(_job(job_id))
    log = job_dir(config, job_id) / "worker.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().strip().endswith("}"):
            return dict(json.loads(log.read_text().strip().splitlines()[-1]))
        time.sleep(0.1)
    raise AssertionError(f"the worker wrote nothing to {log}")


def test_a_local_worker_gets_one_thread_its_snapshot_and_its_log(config: Config,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_ADMIN_TOKEN", "from-the-environment")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # the stand-in lives in tests/
    seen = _launched_output(config, 7)
    assert seen["OMP_NUM_THREADS"] == "1" and seen["MKL_NUM_THREADS"] == "1"
    assert seen["argv"][:1] == ["7"] and seen["argv"][3:] == ["--log", str(job_dir(config, 7) / "worker.log")]
    snapshot = job_dir(config, 7) / "config.json"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600, "it holds the admin token"
    resolved = json.loads(snapshot.read_text())["config"]
    assert resolved["serving"]["admin_token"] == "from-the-environment"
    assert resolved["database_url"] == config.resolved_database_url
    config.jobs.local_threads = 3
    assert _launched_output(config, 8)["OMP_NUM_THREADS"] == "3"
