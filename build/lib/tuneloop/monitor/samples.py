"""What drift compares: a seeded sample of the training inputs (reference), a disjoint pool of further training
inputs (for no-drift calibration windows), and the current window of captured user prompts.

The embedded training file is sorted; an unshuffled reference raised false alarms by itself (DESIGN.md), so both
samples come from one seeded shuffle. The reference key hashes the sample so calibrations are reused only for
exactly this reference.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from tuneloop.challenger_sets.catalog import get_dataset
from tuneloop.config import Config
from tuneloop.errors import TuneloopError
from tuneloop.store import Store
from tuneloop.tables import TrafficRow

# Routes whose prompts are user traffic. Shadow copies repeat a user prompt; eval requests are never captured.
USER_ROUTES = ("champion", "candidate", "explicit", "base")


class DriftError(TuneloopError):
    """A drift check cannot run as asked (no training data, too little traffic, unknown view)."""

    exit_code = 16


class NotEnoughTraffic(DriftError):
    """Fewer captured prompts than a verdict needs: a quiet task, not a failure."""


@dataclass(frozen=True)
class ReferenceSample:
    """Training inputs: `texts` is the reference, `pool` the disjoint no-drift pool; `key` identifies both."""

    task: str
    dataset_ref: str
    texts: list[str]
    pool: list[str]
    key: str


@dataclass(frozen=True)
class TrafficWindow:
    """The captured user prompts of a task (oldest first) and what the served adapters answered."""

    task: str
    prompts: list[str]
    completions: list[str | None]
    adapter_versions: list[int | None]
    since: datetime | None = None
    until: datetime | None = None
    request_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def reference_sample(config: Config, store: Store, task: str) -> ReferenceSample:
    task_config = config.task(task)
    dataset = get_dataset(store, task_config.train_dataset)
    texts = list(dict.fromkeys(e.last_user_text() for e in dataset.load()))
    if len(texts) < 20:
        raise DriftError(f"training set {dataset.manifest.ref} has {len(texts)} distinct inputs; drift needs a "
                         "reference of at least 20")
    random.Random(config.monitor.seed).shuffle(texts)
    size = min(config.monitor.reference_size, len(texts) // 2)
    reference, pool = texts[:size], texts[size:size + config.monitor.calibration_pool_size]
    digest = hashlib.sha256(f"{dataset.manifest.sha256}:{config.monitor.seed}:{size}:{len(pool)}".encode())
    return ReferenceSample(task=task, dataset_ref=dataset.manifest.ref, texts=reference, pool=pool,
                           key=digest.hexdigest()[:32])


def traffic_window(store: Store, task: str, *, last: int | None = None, since: datetime | None = None,
                   until: datetime | None = None) -> TrafficWindow:
    """The last `last` answered user prompts of the task, or those in [since, until).

    Only answered requests (status 200) count: a request vLLM refused (too long, bad parameters) produced no
    answer and is not traffic the adapter served, and counting it would let any client steer the drift verdict
    with prompts the engine throws away."""
    query = select(TrafficRow.request_id, TrafficRow.prompt_text, TrafficRow.completion,
                   TrafficRow.adapter_version).where(TrafficRow.task == task, TrafficRow.route.in_(USER_ROUTES),
                                                     TrafficRow.shadow_of.is_(None), TrafficRow.status == 200)
    if since is not None:
        query = query.where(TrafficRow.created_at >= since)
    if until is not None:
        query = query.where(TrafficRow.created_at < until)
    query = query.order_by(TrafficRow.id.desc())
    if last is not None:
        query = query.limit(last)
    with store.session() as session:
        rows = list(session.execute(query))[::-1]
    rows = [r for r in rows if r.prompt_text and r.prompt_text.strip()]
    return TrafficWindow(task=task, prompts=[r.prompt_text for r in rows],
                         completions=[r.completion for r in rows],
                         adapter_versions=[r.adapter_version for r in rows], since=since, until=until,
                         request_ids=[r.request_id for r in rows])
