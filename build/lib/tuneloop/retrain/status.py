"""The retraining side of `tuneloop status`: each task's latest job, read only (a job whose worker is gone is
shown with the reason, and left for the reaper)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from tuneloop.config import Config
from tuneloop.retrain.jobs import JobStore, why_stale
from tuneloop.retrain.records import JobState, WatchStatus
from tuneloop.store import Store


class RetrainStatus(BaseModel):
    job: int
    state: JobState
    updated_at: datetime
    candidate: str | None
    watch: WatchStatus | None
    stale: str | None = None


def retrain_status(config: Config, store: Store, *, limit: int = 200) -> dict[str, RetrainStatus]:
    latest: dict[str, RetrainStatus] = {}
    for job in JobStore(store).recent(limit=limit):
        if job.task not in latest:
            latest[job.task] = RetrainStatus(job=job.id, state=job.state, updated_at=job.updated_at,
                                             candidate=job.candidate_ref,
                                             watch=job.watch.status if job.watch else None,
                                             stale=why_stale(job, stale_after_s=config.jobs.stale_after_s))
    return latest
