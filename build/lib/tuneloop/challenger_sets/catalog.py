"""The dataset catalog: immutable, versioned datasets on disk with a manifest, indexed in the store.

A dataset is named `task/name`; adding content that differs from the latest version makes a new version, adding
identical content returns the existing one. Files are written to a temporary name and renamed only after every
check passed, and the store row is added last, so a refused or failed import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from tuneloop.challenger_sets.leakage import check_no_leakage, input_keys
from tuneloop.challenger_sets.records import Example, read_examples, read_numbered_examples, write_jsonl
from tuneloop.challenger_sets.task_check import check_for_task
from tuneloop.config import TaskConfig
from tuneloop.errors import DatasetError, DatasetNotFound
from tuneloop.events import record_event
from tuneloop.store import Store
from tuneloop.tables import DatasetRow

DatasetKind = Literal["train", "heldout", "challenger"]
EVAL_KINDS = ("heldout", "challenger")
SCHEMA_VERSION = 1


class Manifest(BaseModel):
    """What a dataset version is, written beside its JSONL file."""

    task: str
    name: str = Field(description="Full name, task/name.")
    version: int
    kind: DatasetKind
    source: str = Field(description="Where the rows came from (package file, imported path, traffic window).")
    created_at: datetime
    rows: int
    sha256: str = Field(description="sha256 of the JSONL file's bytes.")
    schema_version: int = SCHEMA_VERSION
    build: dict[str, Any] = Field(default_factory=dict, description="How it was built: filters, counts, seed.")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class DatasetVersion(BaseModel):
    """A dataset version as listed from the store, with where its file is."""

    manifest: Manifest
    path: Path

    def load(self) -> list[Example]:
        return read_examples(self.path)


def qualify(task: str | None, name: str) -> str:
    """`other-topics` + task sentiment -> `sentiment/other-topics`; a name with a slash stays as it is."""
    if "/" in name:
        return name.split("@", 1)[0]
    if not task:
        raise DatasetNotFound(f"dataset '{name}' needs a task: write it as task/{name}")
    return f"{task}/{name.split('@', 1)[0]}"


def short_name(dataset: str) -> str:
    """`sentiment/other-topics@2` -> `other-topics`: a bounded label or rule name."""
    return dataset.split("@", 1)[0].split("/", 1)[-1]


def content_sha256(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.model_dump_json(exclude_none=True).encode() + b"\n")
    return digest.hexdigest()


def add_dataset(store: Store, data_dir: Path, examples: list[Example], *, task: str, name: str,
                kind: DatasetKind, source: str, build: dict[str, Any] | None = None,
                check_leakage: bool = True) -> DatasetVersion:
    """Register `examples` as the next version of task/name (or return the identical latest version)."""
    full_name = qualify(task, name)
    if not full_name.startswith(f"{task}/"):
        raise DatasetError(f"dataset name '{name}' belongs to another task than '{task}'")
    short = full_name.split("/", 1)[1]
    if not short or not all(c.isalnum() or c in "-_." for c in short):
        raise DatasetError(f"dataset name '{short}' must be letters, digits, '-', '_' or '.'")
    sha = content_sha256(examples)
    latest = find_latest(store, full_name)
    if latest and latest.manifest.sha256 == sha:
        return latest
    if latest and latest.manifest.kind != kind:
        raise DatasetError(f"dataset {full_name} is a {latest.manifest.kind} set; cannot add a {kind} version")
    if check_leakage:
        _check_against_task(store, examples, task=task, kind=kind, name=full_name)
    version = (latest.manifest.version + 1) if latest else 1
    folder = data_dir / "datasets" / task / short
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"v{version}.jsonl"
    staging = folder / f".v{version}.jsonl.tmp"
    write_jsonl(examples, staging)
    manifest = Manifest(task=task, name=full_name, version=version, kind=kind, source=source,
                        created_at=datetime.now(UTC), rows=len(examples), sha256=sha, build=build or {})
    (folder / f".v{version}.manifest.json.tmp").write_text(manifest.model_dump_json(indent=2))
    try:
        with store.session() as session:
            session.add(DatasetRow(task=task, name=full_name, version=version, kind=kind, source=source,
                                   sha256=sha, rows=len(examples), path=str(final),
                                   created_at=manifest.created_at))
            session.flush()
            os.replace(staging, final)
            os.replace(folder / f".v{version}.manifest.json.tmp", folder / f"v{version}.manifest.json")
    finally:
        for leftover in (staging, folder / f".v{version}.manifest.json.tmp"):
            leftover.unlink(missing_ok=True)
    record_event(store, "dataset_added", f"{manifest.ref}: {len(examples)} {kind} rows from {source}", task=task,
                 payload={"dataset": manifest.ref, "sha256": sha, "rows": len(examples)})
    return DatasetVersion(manifest=manifest, path=final)


def import_dataset_file(store: Store, data_dir: Path, path: Path, *, task: str, task_config: TaskConfig,
                        name: str, kind: DatasetKind) -> DatasetVersion:
    """Validate a user's JSONL/CSV file whole, its format and its content for the task, then add it; a bad file
    imports nothing."""
    examples = check_for_task(read_numbered_examples(path), task, task_config, str(path))
    return add_dataset(store, data_dir, examples, task=task, name=name, kind=kind, source=f"file:{path.resolve()}")


def _check_against_task(store: Store, examples: list[Example], *, task: str, kind: DatasetKind, name: str) -> None:
    others = [d for d in list_datasets(store, task=task, latest_only=False) if d.manifest.name != name]
    if kind in EVAL_KINDS:
        # Retraining sets hold the trainable side of challenger sets by design; what is judged is the `-gate`
        # split, which challenger_sets/splits.py keeps free of every training set (retraining ones included).
        against = [d for d in others if d.manifest.kind == "train" and not d.manifest.source.startswith("retrain:")]
    else:
        against = [d for d in others if d.manifest.kind in EVAL_KINDS]
    for other in against:
        check_no_leakage(examples, input_keys(other.load()), name=name, against=other.manifest.ref)


def list_datasets(store: Store, *, task: str | None = None, latest_only: bool = True) -> list[DatasetVersion]:
    query = select(DatasetRow).order_by(DatasetRow.task, DatasetRow.name, DatasetRow.version)
    if task:
        query = query.where(DatasetRow.task == task)
    if latest_only:
        newest = (select(DatasetRow.name, func.max(DatasetRow.version).label("v"))
                  .group_by(DatasetRow.name).subquery())
        query = query.join(newest, (DatasetRow.name == newest.c.name) & (DatasetRow.version == newest.c.v))
    with store.session() as session:
        return [_version(row) for row in session.scalars(query)]


def find_latest(store: Store, full_name: str) -> DatasetVersion | None:
    query = (select(DatasetRow).where(DatasetRow.name == full_name).order_by(DatasetRow.version.desc()).limit(1))
    with store.session() as session:
        row = session.scalars(query).first()
        return _version(row) if row else None


def get_dataset(store: Store, name: str, *, task: str | None = None) -> DatasetVersion:
    """Look up `task/name`, `name` (with task) or either with `@version`."""
    version: int | None = None
    if "@" in name:
        name, _, raw_version = name.partition("@")
        if not raw_version.isdigit():
            raise DatasetNotFound(f"dataset version '{raw_version}' is not a number")
        version = int(raw_version)
    full_name = qualify(task, name)
    query = select(DatasetRow).where(DatasetRow.name == full_name)
    query = query.where(DatasetRow.version == version) if version else query.order_by(DatasetRow.version.desc())
    with store.session() as session:
        row = session.scalars(query.limit(1)).first()
        if row is None:
            known = sorted({r for r in session.scalars(select(DatasetRow.name))})
            raise DatasetNotFound(f"no dataset {full_name}{f'@{version}' if version else ''}; known: {known}")
        found = _version(row)
    if not found.path.exists():
        raise DatasetError(f"dataset {found.manifest.ref} is registered but its file {found.path} is missing")
    return found


def _version(row: DatasetRow) -> DatasetVersion:
    path = Path(row.path)
    manifest_path = path.with_name(path.stem + ".manifest.json")
    build: dict[str, Any] = {}
    if manifest_path.exists():
        build = json.loads(manifest_path.read_text()).get("build", {})
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    manifest = Manifest(task=row.task, name=row.name, version=row.version, kind=row.kind,  # type: ignore[arg-type]
                        source=row.source, created_at=created, rows=row.rows, sha256=row.sha256, build=build)
    return DatasetVersion(manifest=manifest, path=path)
