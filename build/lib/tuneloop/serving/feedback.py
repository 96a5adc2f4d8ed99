"""Feedback: attaching the right answer to a captured request, so labelled traffic can become a challenger set.

Used by the gateway's `POST /v1/feedback` and by `tuneloop feedback import`. A reference is validated against the
request's task (a classification task's reference must be one of its labels) and, once given, is only replaced
on purpose (`overwrite`), so a late or duplicate submission cannot silently change a challenger set's source.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from tuneloop.challenger_sets.records import MAX_TEXT_CHARS
from tuneloop.config import Config
from tuneloop.errors import DatasetError, FeedbackConflict, FeedbackError, UnknownRequest
from tuneloop.redact import Redactor
from tuneloop.store import Store
from tuneloop.tables import TrafficRow


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64)
    reference: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class FeedbackResult(BaseModel):
    request_id: str
    task: str
    reference: str
    changed: bool


def _normalised_reference(config: Config, task: str, reference: str) -> str:
    reference = reference.strip()
    if not reference:
        raise FeedbackError("reference must not be empty or only whitespace")
    spec = config.tasks.get(task)
    if spec is not None and spec.kind == "classification":
        labels = {label.lower(): label for label in spec.labels}
        if reference.lower() not in labels:
            raise FeedbackError(f"'{reference}' is not a label of task '{task}'; expected one of {spec.labels}")
        return labels[reference.lower()]
    return reference


def _apply(row: TrafficRow, config: Config, reference: str, overwrite: bool, *, key_id: str | None = None,
           redactor: Redactor | None = None) -> FeedbackResult:
    """Set the row's reference. A free-text reference is redacted like the captured text it labels; the key that
    wrote it is recorded (None for a file imported by the CLI)."""
    if row.shadow_of is not None:
        raise FeedbackError(f"request {row.request_id} is a shadow answer; give feedback on {row.shadow_of}")
    value = _normalised_reference(config, row.task, reference)
    if redactor is not None and config.tasks.get(row.task) is not None and config.tasks[row.task].kind != \
            "classification":
        value = redactor.redact(value)[0]
    if row.reference is not None and row.reference != value and not overwrite:
        raise FeedbackConflict(f"request {row.request_id} already has reference '{row.reference[:80]}'; "
                               "pass overwrite to replace it")
    changed = row.reference != value
    if changed:
        row.reference = value
        row.reference_at = datetime.now(UTC)
        row.reference_key_id = key_id
    return FeedbackResult(request_id=row.request_id, task=row.task, reference=value, changed=changed)


def attach_reference(store: Store, config: Config, request_id: str, reference: str, *,
                     overwrite: bool = False, key_id: str | None = None,
                     redactor: Redactor | None = None) -> FeedbackResult:
    with store.session() as session:
        row = session.scalars(select(TrafficRow).where(TrafficRow.request_id == request_id)).first()
        if row is None:
            raise UnknownRequest(f"no captured request '{request_id}' (captures are written within a second; "
                                 "retry if the request was just made)")
        return _apply(row, config, reference, overwrite, key_id=key_id, redactor=redactor)


def import_feedback(store: Store, config: Config, path: Path, *, overwrite: bool = False) -> list[FeedbackResult]:
    """Apply a JSONL file of {request_id, reference} lines: all of it, or, if any line is bad, none of it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 (byte {exc.start})") from None
    items: list[tuple[int, FeedbackItem]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, FeedbackItem.model_validate(json.loads(line))))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not JSON ({exc.msg})")
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in exc.errors())
            problems.append(f"{path}:{number}: {fields}")
    if not items and not problems:
        problems.append(f"{path}: no feedback lines")
    results: list[FeedbackResult] = []
    with store.session() as session:
        ids = [item.request_id for _, item in items]
        rows = {r.request_id: r for r in session.scalars(select(TrafficRow).where(TrafficRow.request_id.in_(ids)))}
        seen: dict[str, int] = {}
        for number, item in items:
            if item.request_id in seen:
                problems.append(f"{path}:{number}: request_id {item.request_id} repeats line {seen[item.request_id]}")
                continue
            seen[item.request_id] = number
            row = rows.get(item.request_id)
            if row is None:
                problems.append(f"{path}:{number}: request_id: no captured request '{item.request_id}'")
                continue
            try:
                results.append(_apply(row, config, item.reference, overwrite))
            except FeedbackError as exc:
                problems.append(f"{path}:{number}: {exc}")
        if problems:
            session.rollback()
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise DatasetError(f"{len(problems)} problem(s) in {path}; nothing was imported:\n  " +
                               "\n  ".join(shown))
    return results
