"""Where a retraining job runs. `LocalRunner` starts the worker module it is given (the conductor's,
`python -m tuneloop.conductor.worker`) as a detached process on this machine: its own session, so stopping or
restarting the gateway that launched it does not stop it, with its output in `<data_dir>/jobs/job-<N>/worker.log`.
`RayRunner` (retrain/ray_runner.py) submits the same worker to a Ray cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Protocol

from tuneloop.config import Config, parse_config
from tuneloop.errors import TuneloopError
from tuneloop.retrain.records import Job

CONFIG_SNAPSHOT = "config.json"
WORKER_LOG = "worker.log"


class JobNotRunning(TuneloopError):
    """A cancel for a job whose worker is not running (or not here)."""


class JobRunner(Protocol):
    """Starts a job's worker somewhere, and answers for it afterwards. The database holds the job's state; a runner
    knows only its process."""

    name: str

    def launch(self, job: Job) -> str | None:
        """Start the worker; returns the runner's own name for it (stored with the job), if it has one."""
        ...

    def why_gone(self, job: Job) -> str | None:
        """Why the runner knows the job's worker is gone, or None (running, or the runner cannot tell)."""
        ...

    def logs(self, job: Job) -> str:
        """The worker's output so far."""
        ...

    def cancel(self, job: Job) -> None:
        """Ask the worker to stop (it fails the job with that reason)."""
        ...


def job_dir(config: Config, job_id: int) -> Path:
    return config.data_path / "jobs" / f"job-{job_id}"


def write_config_snapshot(config: Config, folder: Path) -> Path:
    """The exact config the job runs with, the database URL and admin token resolved from the environment (a Ray
    node does not share this process's environment), so owner-readable only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_SNAPSHOT
    resolved = config.model_dump(mode="json")
    resolved["database_url"] = config.resolved_database_url
    resolved["serving"]["admin_token"] = config.admin_token
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"config_dir": str(config.config_dir), "config": resolved}, out)
    return path


def load_config_snapshot(path: Path) -> Config:
    """The config a job was launched with (write_config_snapshot), for the worker process."""
    raw = json.loads(path.read_text())
    return parse_config(json.dumps(raw["config"]), source=str(path), config_dir=Path(raw["config_dir"]))


def thread_env(threads: int) -> dict[str, str]:
    """The variables torch and its BLAS read for their thread count at start-up."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


class LocalRunner:
    name = "local"

    def __init__(self, config: Config, *, worker_module: str) -> None:
        self.config, self.worker_module = config, worker_module

    def launch(self, job: Job) -> None:
        folder = job_dir(self.config, job.id)
        snapshot = write_config_snapshot(self.config, folder)
        log_path = folder / WORKER_LOG
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", self.worker_module, str(job.id), "--config-snapshot", str(snapshot),
                 "--log", str(log_path)],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=str(self.config.config_dir), env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                      **thread_env(self.config.jobs.local_threads)})
        # Reap the child when it ends so it never lingers as a zombie the job reaper would mistake for alive.
        threading.Thread(target=process.wait, name=f"job-{job.id}-wait", daemon=True).start()

    def why_gone(self, job: Job) -> None:
        """The job's pid says it all, and why_stale reads it."""
        return None

    def logs(self, job: Job) -> str:
        path = job_dir(self.config, job.id) / WORKER_LOG
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cancel(self, job: Job) -> None:
        if job.pid is None or job.host != socket.gethostname():
            raise JobNotRunning(f"job {job.id}'s worker is not a process on this machine "
                                f"({job.pid}@{job.host}); cancel it where it runs")
        try:
            os.kill(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            raise JobNotRunning(f"job {job.id}'s worker {job.pid} has already exited") from None
