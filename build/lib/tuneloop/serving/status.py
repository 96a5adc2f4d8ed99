"""What `tuneloop status` reports: each task's champion and candidate, the gateway's health, spilled traffic."""

from __future__ import annotations

from pydantic import BaseModel

from tuneloop.config import Config
from tuneloop.registry import find_alias
from tuneloop.serving.admin_client import AdminClient
from tuneloop.serving.capture import spilled_records
from tuneloop.store import Store


class TaskStatus(BaseModel):
    task: str
    champion: str | None
    candidate: str | None
    canary_share: float
    shadow: bool


class ServingStatus(BaseModel):
    tasks: list[TaskStatus]
    gateway: dict[str, object]
    spilled_traffic_records: int


def serving_status(config: Config, store: Store) -> ServingStatus:
    tasks = []
    for name, task in config.tasks.items():
        champion, candidate = find_alias(store, name, "champion"), find_alias(store, name, "candidate")
        tasks.append(TaskStatus(task=name, champion=champion.ref if champion else None,
                                candidate=candidate.ref if candidate else None,
                                canary_share=task.rollout.canary_share, shadow=task.rollout.shadow))
    spilled = len(spilled_records(config.data_path / "spill" / "traffic-spill.jsonl"))
    return ServingStatus(tasks=tasks, gateway=AdminClient(config).health(), spilled_traffic_records=spilled)
