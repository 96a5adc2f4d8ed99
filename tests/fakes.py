"""Stand-ins for the serving side in retraining's unit tests (the live tests use the real gateway)."""

from __future__ import annotations

from tuneloop.registry import AdapterVersion, Promotion, get_adapter, set_alias
from tuneloop.retrain.records import Job
from tuneloop.retrain.runner import JobRunner
from tuneloop.store import Store


class RecordingRunner:
    """retrain.runner.JobRunner that records the jobs it was asked to launch and runs none, unless a test hands it
    a real runner to pass them on to (`delegate`: the session gateway's webhook then starts real workers)."""

    name = "recording"

    def __init__(self) -> None:
        self.launched: list[int] = []
        self.delegate: JobRunner | None = None

    def launch(self, job: Job) -> str | None:
        self.launched.append(job.id)
        return self.delegate.launch(job) if self.delegate is not None else None

    def why_gone(self, job: Job) -> str | None:
        return self.delegate.why_gone(job) if self.delegate is not None else None

    def logs(self, job: Job) -> str:
        return self.delegate.logs(job) if self.delegate is not None else ""

    def cancel(self, job: Job) -> None:
        if self.delegate is not None:
            self.delegate.cancel(job)


class RecordingDeployment:
    """retrain.deployment.Deployment for unit tests: every version answers at `endpoint` (a scripted stand-in for
    vLLM behind an httpx transport), promotion and rollback move the registry's champion alias as the gateway would,
    and every call is recorded in `calls`."""

    def __init__(self, store: Store, endpoint: str = "http://endpoint.test", *,
                 previous: dict[str, str] | None = None) -> None:
        """`previous`: the champion a rollback restores per task, for promotions this fake did not make."""
        self.store, self.endpoint = store, endpoint
        self.calls: list[tuple[str, str]] = []
        self._previous: dict[str, str] = dict(previous or {})

    def endpoint_for(self, version: AdapterVersion) -> str:
        self.calls.append(("endpoint_for", version.ref))
        return self.endpoint

    def promote(self, version: AdapterVersion) -> Promotion:
        self.calls.append(("promote", version.ref))
        previous = set_alias(self.store, version.ref, "champion", reason="promoted (test)")
        if previous is not None:
            self._previous[version.task] = previous.ref
        return Promotion(version.task, version.ref, previous.ref if previous else None, through_gateway=False)

    def rollback(self, task: str) -> Promotion:
        self.calls.append(("rollback", task))
        restored = get_adapter(self.store, self._previous[task])
        current = set_alias(self.store, restored.ref, "champion", reason="rollback (test)")
        return Promotion(task, restored.ref, current.ref if current else None, through_gateway=False)

    def release(self, version: AdapterVersion) -> None:
        self.calls.append(("release", version.ref))
