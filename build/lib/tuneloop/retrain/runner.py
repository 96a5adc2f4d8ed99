"""Where a retraining job runs. `LocalRunner` starts the worker module it is given (the conductor's,
`python -m tuneloop.conductor.worker`) as a detached process on this machine: its own session, so stopping or
restarting the gateway that launched it does not stop it, with its output in `<data_dir>/jobs/job-<N>/worker.log`.
A cluster runner implements the same `launch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Protocol

from tuneloop.config import Config, parse_config
from tuneloop.retrain.records import Job

CONFIG_SNAPSHOT = "config.json"


class JobRunner(Protocol):
    name: str

    def launch(self, job: Job) -> None: ...


def job_dir(config: Config, job_id: int) -> Path:
    return config.data_path / "jobs" / f"job-{job_id}"


def write_config_snapshot(config: Config, folder: Path) -> Path:
    """The exact config the job runs with (owner-readable only: it may hold the admin token)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_SNAPSHOT
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"config_dir": str(config.config_dir), "config": config.model_dump(mode="json")}, out)
    return path


def load_config_snapshot(path: Path) -> Config:
    """The config a job was launched with (write_config_snapshot), for the worker process."""
    raw = json.loads(path.read_text())
    return parse_config(json.dumps(raw["config"]), source=str(path), config_dir=Path(raw["config_dir"]))


class LocalRunner:
    name = "local"

    def __init__(self, config: Config, *, worker_module: str) -> None:
        self.config, self.worker_module = config, worker_module

    def launch(self, job: Job) -> None:
        folder = job_dir(self.config, job.id)
        snapshot = write_config_snapshot(self.config, folder)
        log_path = folder / "worker.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", self.worker_module, str(job.id), "--config-snapshot", str(snapshot)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=str(self.config.config_dir), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Reap the child when it ends so it never lingers as a zombie the job reaper would mistake for alive.
        threading.Thread(target=process.wait, name=f"job-{job.id}-wait", daemon=True).start()
