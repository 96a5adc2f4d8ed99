"""The exception hierarchy of tuneloop.

Every error a user can cause or fix is one of these types, raised with the facts needed to act on it (file,
line, key, version) and turned into an exit code or an HTTP status once, at the CLI or gateway edge.
"""

from __future__ import annotations


class TuneloopError(Exception):
    """Base class of every error tuneloop raises on purpose."""

    exit_code = 1


class ConfigError(TuneloopError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        detail = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(message + detail)


class DatasetError(TuneloopError):
    """A dataset file or record is malformed; names the file, line and field."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = [part for part in (
            path,
            f"line {line}" if line is not None else None,
            f"field '{field}'" if field is not None else None,
        ) if part]
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class LeakageError(DatasetError):
    """An evaluation set shares examples with the data a model was trained on."""


class DatasetNotFound(TuneloopError):
    """No dataset of that name (or version) is registered."""

    exit_code = 4


class AdapterError(TuneloopError):
    """An adapter version is unknown, missing on disk, corrupt or incompatible."""

    exit_code = 5


class EngineUnavailable(TuneloopError):
    """vLLM is not running, still starting or restarting."""

    exit_code = 9


class AdapterUnavailable(EngineUnavailable):
    """A task's champion is not in the engine: its files failed the serving checks or vLLM refused to load it."""


class AuthError(TuneloopError):
    """An admin call without a valid bearer token."""

    exit_code = 10


class PermissionDenied(AuthError):
    """A valid API key whose scopes do not reach the route it called."""


class RateLimited(TuneloopError):
    """An API key over its requests or tokens per minute; `retry_after_s` and `headers` go to the client."""

    def __init__(self, message: str, retry_after_s: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after_s, self.headers = retry_after_s, headers


class ApiKeyError(TuneloopError):
    """An API key operation that cannot be done: an unknown or duplicate name, a bad scope or limit."""

    exit_code = 15


class ModelNotFound(TuneloopError):
    """A request named a model (task or version) the gateway does not serve."""

    exit_code = 11


class TrainingError(TuneloopError):
    """Training could not start or run (bad hyperparameters, no data)."""

    exit_code = 6


class HardwareError(TrainingError):
    """The device a run asked for is not there (train.device: cuda on a machine without one)."""


class BaseModelError(TuneloopError):
    """The base model could not be found, converted or verified."""

    exit_code = 7


class StoreError(TuneloopError):
    """The database could not be reached or migrated."""

    exit_code = 8


class EvaluationError(TuneloopError):
    """An evaluation cannot run or be compared as asked (empty set, mismatched runs, wrong task)."""

    exit_code = 12


class FeedbackError(TuneloopError):
    """Feedback names an unknown request, gives an invalid label, or would overwrite an earlier answer."""

    exit_code = 13


class RequestTooLarge(TuneloopError):
    """A request body is over the gateway's size limit."""

    exit_code = 14


class RequestTimeout(TuneloopError):
    """A client sent its request body too slowly (the gateway's slow-client bound)."""

    exit_code = 14


class UnknownRequest(FeedbackError):
    """No captured request has this id (or its capture has not been written yet)."""


class FeedbackConflict(FeedbackError):
    """The request already has a different reference."""


class EstimationError(TuneloopError):
    """A quality estimate cannot be made: a task or metric without an estimator, a window without answers that
    carry a signal, a calibration without usable held-out answers, or inputs that disagree."""

    exit_code = 16
