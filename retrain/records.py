"""The records a retraining job hands from stage to stage and to everyone who reads it.

A job is written by the job store (retrain/jobs.py) on behalf of the trigger path (retrain/triggers.py) and the
worker (retrain/worker.py), and read by the watch, the CLI, `tuneloop status`, the Prometheus collector
(retrain/metrics.py) and the tests. The store is the only place these records become rows and back (JSON columns
included); every other reader gets typed fields, so renaming one is an error mypy reports at each reader.

Records are frozen pydantic models: they validate what comes back from the database (an old or hand-edited row
fails loudly instead of being half-read) and dump to the JSON `tuneloop jobs show --json` prints.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneloop.challenger_sets.judged import GateRole
from tuneloop.config import MetricName, RetrainConfig
from tuneloop.evaluators.compare import MetricComparison

JobState = Literal["queued", "training", "evaluating", "promoted", "rejected", "failed", "rolled_back"]
JOB_STATES: tuple[JobState, ...] = ("queued", "training", "evaluating", "promoted", "rejected", "failed",
                                    "rolled_back")
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "training", "evaluating")
FinalState = Literal["promoted", "rejected", "failed", "rolled_back"]
StageName = Literal["assemble", "train", "evaluate", "promote"]
STAGES: tuple[StageName, ...] = ("assemble", "train", "evaluate", "promote")
StageStatus = Literal["running", "done", "failed"]
TriggerSource = Literal["incident", "alertmanager", "manual"]
WatchStatus = Literal["off", "watching", "confirmed", "rolled_back", "superseded"]


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Triggers -----------------------------------------------------------------------------------------------------

class IncidentTrigger(Record):
    """A policy incident opened (the conductor builds it from the incident's typed rule id)."""

    source: Literal["incident"] = "incident"
    key: str = Field(description="incident:<id>; the same key twice is one request.")
    reason: str
    incident: int
    rule: str = Field(description="The incident's rule id as the policy renders it (floor:macro_f1:other-topics).")
    datasets: list[str] = Field(default_factory=list, description="Challenger sets the rule breached on.")
    message: str = ""


class AlertTrigger(Record):
    """A firing Alertmanager alert that names a configured task."""

    source: Literal["alertmanager"] = "alertmanager"
    key: str = Field(description="alertmanager:<fingerprint>:<startsAt>: a re-sent notification is one request.")
    reason: str
    alertname: str
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: str
    datasets: list[str] = Field(default_factory=list, description="The alert's `dataset` label, if any.")


class ManualTrigger(Record):
    """`tuneloop retrain` by a person."""

    source: Literal["manual"] = "manual"
    key: str
    reason: str
    datasets: list[str] = Field(default_factory=list)


Trigger = Annotated[IncidentTrigger | AlertTrigger | ManualTrigger, Field(discriminator="source")]


class JobTrigger(Record):
    """A trigger as the job received it."""

    trigger: Trigger
    received_at: datetime


# Stages and the gate --------------------------------------------------------------------------------------------

class StageTiming(Record):
    started_at: datetime
    status: StageStatus
    seconds: float | None = None
    finished_at: datetime | None = None


class GateCheck(Record):
    """One gate set's verdict. `comparison` is candidate (b) minus champion (a) on the primary metric; a check
    refused before training has none, only the smallest MDE its size allows."""

    dataset: str
    role: GateRole
    n: int
    mde: float = Field(description="The MDE the verdict used: of the paired difference when measured, the "
                       "n-only floor before training.")
    passed: bool
    reason: str
    comparison: MetricComparison | None = None
    runs: tuple[int, int] | None = Field(default=None, description="(champion run, candidate run)")


class GateDecision(Record):
    promote: bool
    metric: MetricName
    level: float
    margin: float
    champion: str
    candidate: str | None
    checks: list[GateCheck]
    reasons: list[str]
    preflight: bool = Field(default=False, description="Refused before training: some set can never decide.")


# The watch ------------------------------------------------------------------------------------------------------

class EvaluationSignal(Record):
    """New champion minus old on the latest version of one gate set, paired."""

    kind: Literal["evaluation"] = "evaluation"
    regression: bool
    message: str
    dataset: str | None = Field(default=None, description="None when nothing could be evaluated.")
    comparison: MetricComparison | None = None
    runs: tuple[int, int] | None = None


class ErrorRateSignal(Record):
    """Share of 5xx answers since the promotion vs the old champion's over as long a window before it."""

    kind: Literal["error_rate"] = "error_rate"
    regression: bool
    message: str
    old_requests: int
    old_errors: int
    new_requests: int
    new_errors: int
    p_value: float | None = None


class LabelSharesSignal(Record):
    """The two versions' answer-label distributions; reported, never acted on."""

    kind: Literal["label_shares"] = "label_shares"
    regression: Literal[False] = False
    message: str
    p_value: float
    old: dict[str, int]
    new: dict[str, int]


WatchSignal = Annotated[EvaluationSignal | ErrorRateSignal | LabelSharesSignal, Field(discriminator="kind")]


class WatchState(Record):
    """A promotion under watch, and what the watch found so far."""

    status: WatchStatus
    promoted_at: datetime
    until: datetime
    previous_version: int
    through_gateway: bool
    checked_at: datetime | None = None
    signals: list[WatchSignal] = Field(default_factory=list)
    reason: str | None = None
    restored: str | None = Field(default=None, description="The champion a rollback restored (task@N).")


# The job ----------------------------------------------------------------------------------------------------------

class JobSettings(Record):
    """What the job runs with: the task's retraining settings when it was queued, and the challenger sets its
    triggers named (decided by the worker; the watch re-judges their latest splits)."""

    retrain: RetrainConfig
    challenger_sets: list[str] = Field(default_factory=list)


class Job(Record):
    id: int
    task: str
    state: JobState
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    runner: str
    runner_ref: str | None = Field(default=None, description="The runner's own name for the job (a Ray "
                                   "submission id); None on the local runner.")
    pid: int | None
    host: str | None
    heartbeat_at: datetime | None
    log_path: str | None
    champion_version: int | None
    candidate_version: int | None
    dataset_ref: str | None
    stages: dict[StageName, StageTiming]
    decision: GateDecision | None
    watch: WatchState | None
    settings: JobSettings
    error: str | None
    triggers: list[JobTrigger]

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def candidate_ref(self) -> str | None:
        return f"{self.task}@{self.candidate_version}" if self.candidate_version is not None else None

    @property
    def seconds(self) -> float:
        """Time spent in stages so far."""
        return sum(s.seconds or 0.0 for s in self.stages.values())
