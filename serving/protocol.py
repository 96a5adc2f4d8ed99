"""Request and response shapes the gateway reads or writes, and the one error body every failure uses.

The gateway forwards OpenAI-compatible bodies to vLLM mostly untouched, so request models validate only what
the gateway itself relies on and keep every other field (`extra="allow"`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

MAX_BODY_BYTES = 2_000_000
EVAL_PURPOSE_HEADER = "X-Tuneloop-Purpose"  # "eval": counted, never captured as user traffic


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


def text_content(content: str | list[Any] | None) -> str:
    """Plain text of a message's content (string, or the text parts of a content list)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
