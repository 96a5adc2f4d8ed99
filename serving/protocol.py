"""Request and response shapes the gateway reads or writes, and the one error body every failure uses.

The gateway forwards OpenAI-compatible bodies to vLLM mostly untouched, so request models validate only what
the gateway itself relies on and keep every other field (`extra="allow"`).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from tuneloop.errors import (
    AdapterError,
    AdapterUnavailable,
    AuthError,
    ConfigError,
    DatasetError,
    DatasetNotFound,
    EngineUnavailable,
    FeedbackConflict,
    FeedbackError,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    RequestTimeout,
    RequestTooLarge,
    StoreError,
    TuneloopError,
    UnknownRequest,
)
from tuneloop.parsing import is_integer

MAX_BODY_BYTES = 2_000_000
MAX_JSON_DEPTH = 32  # an OpenAI body with tools and JSON schemas is a dozen levels deep at most
EVAL_PURPOSE_HEADER = "X-Tuneloop-Purpose"  # "eval": counted, never captured as user traffic
RETRY_AFTER_S = "5"
# Idle pooled connections are dropped after this, safely before the server's own keep-alive timeout (uvicorn's, so
# vLLM's and the gateway's: 5 s) closes them: reusing a connection the server is closing at that moment fails the
# request (seen once in `tuneloop demo --fast` as a 503 between two traffic windows ~5 s apart).
KEEPALIVE_EXPIRY_S = 2.0
Endpoint = Literal["chat", "completion"]
Purpose = Literal["user", "eval"]
ErrorType = Literal["authentication_error", "permission_error", "rate_limit_error", "not_found_error",
                    "conflict_error", "adapter_unavailable", "service_unavailable",
                    "store_unavailable", "adapter_error", "request_too_large", "request_timeout",
                    "invalid_request_error", "internal_error"]
# Exception type -> HTTP status and error type, most specific first. The admin client maps a (status, type) pair
# back to the first exception type listed with it. What the client sent wrong is a 4xx; what failed on our side (the
# database, training, evaluation, any error not classified here) is a 5xx, so a client never retries a bad request
# and never gives up on a good one because the database blinked.
ERROR_TYPES: list[tuple[type[TuneloopError], int, ErrorType]] = [
    (PermissionDenied, 403, "permission_error"),
    (AuthError, 401, "authentication_error"),
    (RateLimited, 429, "rate_limit_error"),
    (ModelNotFound, 404, "not_found_error"),
    (UnknownRequest, 404, "not_found_error"),
    (DatasetNotFound, 404, "not_found_error"),
    (FeedbackConflict, 409, "conflict_error"),
    (AdapterUnavailable, 503, "adapter_unavailable"),
    (EngineUnavailable, 503, "service_unavailable"),
    (StoreError, 503, "store_unavailable"),
    (AdapterError, 400, "adapter_error"),
    (RequestTooLarge, 413, "request_too_large"),
    (RequestTimeout, 408, "request_timeout"),
    (DatasetError, 400, "invalid_request_error"),
    (FeedbackError, 400, "invalid_request_error"),
    (ConfigError, 400, "invalid_request_error"),
    (TuneloopError, 500, "internal_error"),
]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[str]
    stream: bool = False


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="task@N")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="task@N")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=64, description="X-Request-Id the gateway answered with.")
    reference: str = Field(min_length=1, max_length=32_000, description="The right answer (a label, or a reply).")
    overwrite: bool = Field(default=False, description="Replace an earlier reference (needs the admin token).")


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


def error_response(status: int, message: str, error_type: str, *,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-style error body used for every gateway failure."""
    body = {"error": ErrorBody(message=message, type=error_type, code=status).model_dump()}
    return JSONResponse(body, status_code=status, headers=headers)


def status_of(exc: TuneloopError) -> tuple[int, ErrorType]:
    for error_type, status, name in ERROR_TYPES:
        if isinstance(exc, error_type):
            return status, name
    return 500, "internal_error"


Model = TypeVar("Model", bound=BaseModel)


async def read_json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, refusing bodies over MAX_BODY_BYTES before reading them when they say so."""
    length = request.headers.get("content-length")
    if length and is_integer(length) and int(length) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"request body is {int(length):,} bytes, over the {MAX_BODY_BYTES:,}-byte limit")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestTooLarge(f"request body is over the {MAX_BODY_BYTES:,}-byte limit")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"request body is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"request body is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") \
            from None
    except RecursionError:
        raise DatasetError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise DatasetError(f"request body must be a JSON object, got {type(body).__name__}")
    check_json_values(body)
    return body


def _refuse_constant(name: str) -> Any:
    raise DatasetError(f"request body is not valid JSON: {name} is not a JSON number")


def check_json_values(body: Any) -> None:
    """Refuse what JSON parsing lets through but nothing downstream can use: nesting deeper than MAX_JSON_DEPTH
    (every later walk of the body recurses) and strings holding a lone UTF-16 surrogate (`"\\ud800"`), which no
    UTF-8 encoder, so neither the database nor vLLM, accepts. Iterative, so the check itself cannot overflow."""
    pending: list[tuple[Any, str, int]] = [(body, "body", 1)]
    while pending:
        value, where, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise DatasetError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels (at {where})")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DatasetError(f"request body holds a lone surrogate escape at {where} (character "
                                   f"{exc.start}): not text") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                pending.append((key, f"{where} key", depth + 1))
                pending.append((item, f"{where}.{key}", depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{where}.{i}", depth + 1) for i, item in enumerate(value))


def validate_body(model: type[Model], body: dict[str, Any]) -> Model:
    """`model` parsed from `body`, or a DatasetError naming every bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise DatasetError(f"invalid request: {problems}") from None


def text_content(content: str | list[Any] | None) -> str:
    """Plain text of a message's content (string, or the text parts of a content list)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
