"""Challenger sets from production: captured requests that got a reference through feedback.

Only answered user traffic counts (status 200, not shadow copies, not eval runs, which are never captured).
Rows are deduplicated on the normalised input (the newest feedback wins), and any input that also appears in the
task's training data is dropped and counted: a challenger set measures generalisation to fresh traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from tuneloop.challenger_sets.catalog import DatasetVersion, add_dataset, list_datasets
from tuneloop.challenger_sets.leakage import input_keys
from tuneloop.challenger_sets.records import Example, Message, normalize_text
from tuneloop.config import Config
from tuneloop.errors import DatasetError
from tuneloop.store import Store
from tuneloop.tables import TrafficRow


@dataclass(frozen=True)
class TrafficSetResult:
    dataset: DatasetVersion
    labelled: int
    duplicates: int
    leaked: int


def traffic_examples(store: Store, task: str, *, since: datetime, until: datetime | None = None) -> list[Example]:
    query = (select(TrafficRow).where(TrafficRow.task == task, TrafficRow.reference.is_not(None),
                                      TrafficRow.status == 200, TrafficRow.shadow_of.is_(None),
                                      TrafficRow.created_at >= since)
             .order_by(TrafficRow.created_at))
    if until is not None:
        query = query.where(TrafficRow.created_at < until)
    examples = []
    with store.session() as session:
        for row in session.scalars(query):
            turns = [m for m in row.messages if m.get("role") in ("user", "assistant") and m.get("content")]
            if not turns or turns[-1]["role"] != "user":
                continue
            meta = {"source": "traffic", "captured_at": row.created_at.isoformat(), "route": row.route,
                    "adapter_version": row.adapter_version}
            if len(turns) == 1:
                example = Example(id=f"traffic-{row.request_id}", input=turns[0]["content"],
                                  reference=row.reference or "", meta=meta)
            else:
                example = Example(id=f"traffic-{row.request_id}", reference=row.reference or "", meta=meta,
                                  messages=[Message(role=m["role"], content=m["content"]) for m in turns])
            examples.append(example)
    return examples


def build_from_traffic(config: Config, store: Store, task: str, *, name: str, since: datetime,
                       until: datetime | None = None) -> TrafficSetResult:
    config.task(task)
    labelled = traffic_examples(store, task, since=since, until=until)
    if not labelled:
        raise DatasetError(f"no labelled {task} traffic since {since.isoformat()}: attach references with "
                           "POST /v1/feedback or `tuneloop feedback import` first")
    newest: dict[str, Example] = {}
    for example in labelled:  # oldest first, so later feedback on the same input replaces earlier
        newest[normalize_text(example.input_text())] = example
    training = set()
    for dataset in list_datasets(store, task=task, latest_only=False):
        if dataset.manifest.kind == "train":
            training |= input_keys(dataset.load())
    kept = [e for key, e in newest.items() if key not in training]
    if not kept:
        raise DatasetError(f"all {len(newest)} labelled {task} inputs also occur in training data; no set built")
    window = f"{since.isoformat()}..{until.isoformat() if until else 'now'}"
    dataset = add_dataset(store, config.data_path, kept, task=task, name=name, kind="challenger",
                          source=f"traffic:{task}:{window}",
                          build={"labelled": len(labelled), "duplicates": len(labelled) - len(newest),
                                 "leaked_into_training": len(newest) - len(kept), "since": since.isoformat(),
                                 "until": until.isoformat() if until else None})
    return TrafficSetResult(dataset, len(labelled), len(labelled) - len(newest), len(newest) - len(kept))
