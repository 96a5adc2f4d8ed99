"""`jobs.runner: ray`: a retraining job submitted to a Ray cluster with Ray's job API.

The job's worker (`python -m tuneloop.conductor.worker`) becomes the Ray job's entrypoint, with the resources
`jobs.retrain` asks for (`entrypoint_num_cpus`, `entrypoint_num_gpus`, custom resources), so Ray places it on a node
that has them, away from the cores the engine serves from. The database stays the source of truth for the job's
state: the worker writes its stages, heartbeat and decision there as it does on the local runner; Ray is asked
only what the database cannot know, whether the process is still there (`why_gone`), and for its log.

What every node needs: tuneloop installed (the same image; `jobs.ray_python` names its interpreter if the path
differs), the database reachable, and the data dir on shared storage (adapters, datasets and the job's config
snapshot are read and written there).

The submission id is `tuneloop-job-<id>-<created, epoch seconds>`: stable for the job, so a repeated submission is
refused by Ray instead of training twice, and distinct across databases that reuse job numbers on one cluster.
"""

from __future__ import annotations

import logging
import shlex
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tuneloop.config import RAY_ADDRESS_ENV, Config
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.retrain.records import Job
from tuneloop.retrain.runner import job_dir, thread_env, write_config_snapshot

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)


class RayUnavailable(TuneloopError):
    """The Ray cluster could not be reached, or refused the request."""


def submission_id(job: Job) -> str:
    return f"tuneloop-job-{job.id}-{int(job.created_at.timestamp())}"


class RayRunner:
    name = "ray"

    def __init__(self, config: Config, *, worker_module: str) -> None:
        address = config.resolved_ray_address
        if address is None:
            raise ConfigError(f"jobs.runner is 'ray' but no cluster is named: set jobs.ray_address or "
                              f"{RAY_ADDRESS_ENV} (the dashboard address, e.g. http://127.0.0.1:8265)")
        self.config, self.worker_module, self.address = config, worker_module, address

    def _client(self) -> JobSubmissionClient:
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.address)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types here
            raise RayUnavailable(f"Ray cluster at {self.address} is unreachable: {_first_line(exc)}") from None

    def entrypoint(self, job: Job) -> str:
        snapshot = write_config_snapshot(self.config, job_dir(self.config, job.id))
        python = self.config.jobs.ray_python or sys.executable
        return shlex.join([python, "-m", self.worker_module, str(job.id), "--config-snapshot", str(snapshot),
                           "--log", f"ray job logs {submission_id(job)} (or tuneloop jobs logs {job.id})"])

    def launch(self, job: Job) -> str:
        """Submit the job; returns its Ray submission id. Raises RayUnavailable when Ray refuses or is away."""
        resources = self.config.jobs.retrain
        sid = submission_id(job)
        client = self._client()
        try:
            client.submit_job(entrypoint=self.entrypoint(job), submission_id=sid,
                              entrypoint_num_cpus=resources.num_cpus, entrypoint_num_gpus=resources.num_gpus,
                              entrypoint_resources=dict(resources.resources) or None,
                              runtime_env={"env_vars": {**_worker_env(),
                                                        **thread_env(max(1, int(resources.num_cpus)))}},
                              metadata={"tuneloop_job": str(job.id), "task": job.task})
        except Exception as exc:  # noqa: BLE001 - every refusal becomes the job's failure reason
            raise RayUnavailable(f"Ray at {self.address} refused job {sid}: {_first_line(exc)}") from None
        log.info("job %s submitted to Ray at %s as %s", job.id, self.address, sid)
        return sid

    def why_gone(self, job: Job, *, now: datetime | None = None) -> str | None:
        """Why Ray says the job's worker is gone (FAILED, STOPPED, exited without finishing, pending too long), or
        None while it runs or when Ray cannot be asked (the heartbeat then decides, in why_stale)."""
        sid = job.runner_ref or submission_id(job)
        try:
            info = self._client().get_job_info(sid)
        except RayUnavailable as exc:
            log.warning("job %s: %s", job.id, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - e.g. the job is unknown to a cluster that was replaced
            return f"Ray at {self.address} does not know job {sid}: {_first_line(exc)}"
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        if status in ("FAILED", "STOPPED"):
            detail = f"; exit code {info.driver_exit_code}" if info.driver_exit_code is not None else ""
            return f"Ray job {sid} {status} during '{job.state}': {_cause(info.message or '')}{detail}"
        if status == "SUCCEEDED":
            return f"Ray job {sid} exited during '{job.state}' without finishing the job"
        if status == "PENDING":
            waited = ((now or datetime.now(UTC)) - job.created_at).total_seconds()
            if waited > self.config.jobs.ray_pending_timeout_s:
                self.cancel(job)
                return (f"Ray job {sid} waited {waited:.0f} s for resources ({_resources(self.config)}) and was "
                        "stopped")
        return None

    def logs(self, job: Job) -> str:
        return str(self._client().get_job_logs(job.runner_ref or submission_id(job)))

    def cancel(self, job: Job) -> None:
        """Ask Ray to stop the job: SIGTERM to the worker (which fails the job with that reason), SIGKILL later."""
        self._client().stop_job(job.runner_ref or submission_id(job))


def _worker_env() -> dict[str, str]:
    import os

    from tuneloop.failpoints import FAILPOINTS_ENV

    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    if os.environ.get(FAILPOINTS_ENV):
        env[FAILPOINTS_ENV] = os.environ[FAILPOINTS_ENV]
    return env


def _resources(config: Config) -> str:
    wanted: dict[str, Any] = {"CPU": config.jobs.retrain.num_cpus, "GPU": config.jobs.retrain.num_gpus,
                              **config.jobs.retrain.resources}
    return ", ".join(f"{k}={v:g}" for k, v in wanted.items() if v)


def _cause(message: str) -> str:
    """Ray's message on a failed job, shortened to what says why: its first line and any line that names a death's
    cause ("The actor died because its node has died."), without the actor ids and addresses between them."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = lines[:1] + [line for line in lines[1:] if "because" in line or "node" in line.lower() and "died" in line]
    return " ".join(kept)[:500]


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]
