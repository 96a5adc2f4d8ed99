"""Database tables: the durable record of datasets, adapter versions, aliases and events.

Schema changes go through Alembic migrations in `tuneloop/migrations/`; these classes must match the latest one
(a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class DatasetRow(Base):
    """One immutable version of a dataset; the JSONL file lives under the data dir."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("task", "name", "version", name="uq_dataset_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdapterVersionRow(Base):
    """One trained adapter (or, for comparison runs, prompt-tuning/full model) of a task."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("task", "version", name="uq_adapter_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(20))
    path: Mapped[str] = mapped_column(Text)
    base_model_sha256: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AliasRow(Base):
    """A movable name (`champion`, `candidate`) pointing at one adapter version of a task."""

    __tablename__ = "aliases"

    task: Mapped[str] = mapped_column(String(100), primary_key=True)
    alias: Mapped[str] = mapped_column(String(40), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EventRow(Base):
    """Something that happened (trained, promoted, imported, refused); append-only."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(60), index=True)
    task: Mapped[str | None] = mapped_column(String(100), nullable=True)
    message: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TrafficRow(Base):
    """One request through the gateway, PII already redacted; the raw material of drift and challenger sets."""

    __tablename__ = "traffic"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    route: Mapped[str] = mapped_column(String(20))
    endpoint: Mapped[str] = mapped_column(String(20))
    prompt_text: Mapped[str] = mapped_column(Text)
    messages: Mapped[list[Any]] = mapped_column(JSON)
    completion: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(default=False)
    shadow_of: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pii: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    reference_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    reference_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    signal: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)  # serving/quality_signal.py


class ApiKeyRow(Base):
    """An API key: its public id, scopes and limits, and the SHA-256 of its secret (never the secret)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class GatewayRow(Base):
    """A running gateway on this database, seen every serving.alias_poll_s (serving/membership.py)."""

    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    url: Mapped[str] = mapped_column(String(300))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class EvalRunRow(Base):
    """One evaluation of one model on one dataset version; `run_key` finds an interrupted run to resume."""

    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_key: Mapped[str] = mapped_column(String(64), index=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    model: Mapped[str] = mapped_column(String(200))
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dataset_ref: Mapped[str] = mapped_column(String(300))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    n_examples: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EvalPredictionRow(Base):
    """What the model answered for one example of a run, and that example's scores."""

    __tablename__ = "eval_predictions"
    __table_args__ = (UniqueConstraint("run_id", "example_id", name="uq_eval_prediction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    example_id: Mapped[str] = mapped_column(String(200))
    prediction: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stats: Mapped[dict[str, list[float]] | None] = mapped_column(JSON, nullable=True)


class EvalScoreRow(Base):
    """An aggregate of a run: one metric, overall (slice_field null) or for one slice, with its interval."""

    __tablename__ = "eval_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    metric: Mapped[str] = mapped_column(String(40))
    slice_field: Mapped[str | None] = mapped_column(String(100), nullable=True)
    slice_value: Mapped[str | None] = mapped_column(String(200), nullable=True)
    value: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float] = mapped_column(Float)
    ci_high: Mapped[float] = mapped_column(Float)
    level: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    mde: Mapped[float | None] = mapped_column(Float, nullable=True)
    empty: Mapped[int] = mapped_column(Integer)
    signature: Mapped[str] = mapped_column(Text)


class DriftRunRow(Base):
    """One drift check of a task: the window of captured prompts against the training reference, and its verdict."""

    __tablename__ = "drift_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    window: Mapped[int] = mapped_column(Integer)
    n_current: Mapped[int] = mapped_column(Integer)
    n_reference: Mapped[int] = mapped_column(Integer)
    drifted: Mapped[bool] = mapped_column(default=False)
    false_alarm_rate: Mapped[float] = mapped_column(Float)
    report_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DriftResultRow(Base):
    """One view's statistic in a drift run, with the calibrated threshold it was compared against."""

    __tablename__ = "drift_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("drift_runs.id", ondelete="CASCADE"), index=True)
    view: Mapped[str] = mapped_column(String(40))
    column: Mapped[str] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    drifted: Mapped[bool] = mapped_column(default=False)
    window: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class DriftCalibrationRow(Base):
    """A view's threshold for one window size, set on no-drift windows so its false-alarm rate is bounded."""

    __tablename__ = "drift_calibrations"
    __table_args__ = (UniqueConstraint("task", "reference_key", "view", "window", "alpha",
                                       name="uq_drift_calibration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    reference_key: Mapped[str] = mapped_column(String(64))
    view: Mapped[str] = mapped_column(String(40))
    window: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    null_mean: Mapped[float] = mapped_column(Float)
    null_sd: Mapped[float] = mapped_column(Float)
    false_alarm_rate: Mapped[float] = mapped_column(Float)
    n_windows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IncidentRow(Base):
    """A policy rule in breach for a task; at most one open per (task, rule)."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    rule: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    breaches: Mapped[int] = mapped_column(Integer, default=1)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class JobRunRow(Base):
    """One execution of a scheduled job (eval or drift of a task), successful or not."""

    __tablename__ = "job_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(40), index=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    scheduled_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    holder: Mapped[str] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class LeaseRow(Base):
    """A named lease (the single-scheduler lock): who holds it and until when."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RetrainJobRow(Base):
    """A retraining job: queued -> training -> evaluating -> promoted | rejected | failed (-> rolled_back).

    `active_task` holds the task name while the job is unfinished and NULL after: its unique constraint is the
    one-job-per-task lock, atomic on SQLite and Postgres alike (NULLs never collide)."""

    __tablename__ = "retrain_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    active_task: Mapped[str | None] = mapped_column(String(100), nullable=True, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    runner: Mapped[str] = mapped_column(String(20))
    runner_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    champion_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    candidate_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dataset_ref: Mapped[str | None] = mapped_column(String(300), nullable=True)
    stages: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    watch: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class RetrainTriggerRow(Base):
    """Why a job exists: an incident, an Alertmanager alert or a person; `key` makes a replay a no-op."""

    __tablename__ = "retrain_triggers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("retrain_jobs.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(20))
    key: Mapped[str] = mapped_column(String(300), unique=True)
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnswerCalibrationRow(Base):
    """The calibrator of one adapter version's label probabilities, fitted on the task's held-out set
    (monitor/answer_calibration.py); adapter_version 0 = the base model."""

    __tablename__ = "answer_calibrations"
    __table_args__ = (UniqueConstraint("task", "adapter_version", name="uq_answer_calibration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    adapter_version: Mapped[int] = mapped_column(Integer)
    dataset_ref: Mapped[str] = mapped_column(String(300))
    method: Mapped[str] = mapped_column(String(20))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    n: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QualityEstimateRow(Base):
    """One method's estimate of a task's metric on a window of captured answers (monitor/estimate.py)."""

    __tablename__ = "quality_estimates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    task: Mapped[str] = mapped_column(String(100), index=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metric: Mapped[str] = mapped_column(String(40))
    method: Mapped[str] = mapped_column(String(30))
    window: Mapped[int] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_lower: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_upper: Mapped[float | None] = mapped_column(Float, nullable=True)
    level: Mapped[float] = mapped_column(Float)
    n_labelled: Mapped[int] = mapped_column(Integer)
    n_unlabelled: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
