"""The gateway's OpenAPI 3.1 document, served at /openapi.json: what each route takes, who may call it, and the
errors it answers with.

Built from the same models and field list the handlers validate with (serving/protocol.py, serving/limits.py), so
the document cannot drift from what is enforced; schema-driven fuzzing (tests/serving/test_fuzz.py, schemathesis)
generates requests from it. Sampling fields are typed as OpenAI and vLLM type them; their bounds are
`serving.limits`, given here as the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from tuneloop.config import RequestLimits
from tuneloop.serving.limits import ALLOWED_FIELDS
from tuneloop.serving.protocol import AdapterLoadRequest, FeedbackRequest, PromoteRequest, RollbackRequest

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}
STRING = {"type": "string"}
STOP = {"oneOf": [STRING, {"type": "array", "items": STRING}]}
TEXT_PARTS = {"type": "array", "items": {"type": "object", "properties": {"type": STRING, "text": STRING}}}
ANY_OBJECT = {"type": "object"}


def _sampling(limits: RequestLimits) -> dict[str, Any]:
    return {
        "model": {"type": "string", "minLength": 1, "description": "A task name, task@N, or the base model's name."},
        "stream": BOOLEAN, "stream_options": ANY_OBJECT,
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_tokens},
        "temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER, "min_p": NUMBER, "seed": INTEGER,
        "n": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
        "stop": STOP, "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "repetition_penalty": NUMBER,
        "logit_bias": {"type": "object", "additionalProperties": NUMBER}, "logprobs": {}, "user": STRING,
        "min_tokens": INTEGER, "ignore_eos": BOOLEAN, "response_format": ANY_OBJECT,
        "structured_outputs": ANY_OBJECT, "guided_choice": {"type": "array", "items": STRING},
        "guided_json": {}, "guided_regex": STRING, "guided_grammar": STRING,
    }


def _chat_request(limits: RequestLimits) -> dict[str, Any]:
    message = {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {"oneOf": [STRING, TEXT_PARTS, {"type": "null"}]}}}
    properties = {**_sampling(limits), "messages": {"type": "array", "minItems": 1, "maxItems": limits.max_messages,
                                                     "items": message},
                  "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_tokens},
                  "top_logprobs": {"type": "integer", "minimum": 0, "maximum": limits.max_logprobs},
                  "tools": {"type": "array", "items": ANY_OBJECT}, "tool_choice": {},
                  "parallel_tool_calls": BOOLEAN}
    return _closed(properties, "chat", required=["model", "messages"])


def _completion_request(limits: RequestLimits) -> dict[str, Any]:
    prompt = {"oneOf": [STRING, {"type": "array", "items": STRING, "maxItems": limits.max_prompts}]}
    properties = {**_sampling(limits), "prompt": prompt,
                  "best_of": {"type": "integer", "minimum": 1, "maximum": limits.max_n},
                  "echo": BOOLEAN, "suffix": STRING}
    return _closed(properties, "completion", required=["model", "prompt"])


def _closed(properties: dict[str, Any], endpoint: str, *, required: list[str]) -> dict[str, Any]:
    missing = ALLOWED_FIELDS[endpoint] ^ set(properties)  # type: ignore[index]
    if missing:
        raise AssertionError(f"the OpenAPI document and serving/limits.py disagree on {sorted(missing)}")
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


def _model(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


ERRORS = {"400": "invalid request (names the field and the limit)", "401": "no or unknown credential",
          "403": "the credential lacks the scope", "404": "unknown model or request", "408": "body sent too slowly",
          "413": "body over 2 MB", "429": "rate limited (Retry-After, x-ratelimit-*)",
          "503": "engine or database not answering (Retry-After)"}


def operation(summary: str, scope: str | None, *, body: dict[str, Any] | None = None,
               ok: str = "answered") -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": ok}, **{code: {"description": text} for code, text in ERRORS.items()}},
    }
    if scope is not None:
        operation["security"] = [{"bearer": [scope]}]
        operation["description"] = f"Needs an API key with the '{scope}' scope (or the admin token)."
    if body is not None:
        operation["requestBody"] = json_body(body)
    return operation


def openapi_document(limits: RequestLimits | None = None,
                     extra_paths: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The document for a gateway with `limits`, plus the routes its assembler added (`extra_paths`)."""
    limits = limits or RequestLimits()
    inference = "inference"
    return {
        "openapi": "3.1.0",
        "info": {"title": "tuneloop gateway", "version": "1",
                 "description": "OpenAI-compatible inference by task name, feedback, and administration. "
                                "Inference needs a key when serving.require_api_key is on."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/chat/completions": {"post": operation("Chat completion routed to the task's champion", inference,
                                                        body=_chat_request(limits))},
            "/v1/completions": {"post": operation("Completion routed to the task's champion", inference,
                                                   body=_completion_request(limits))},
            "/v1/models": {"get": operation("Tasks, loaded versions and the base model", inference)},
            "/v1/feedback": {"post": operation("The right answer for a captured request", "feedback",
                                                body=_model(FeedbackRequest), ok="recorded")},
            "/admin/promote": {"post": operation("Make a version its task's champion", "admin",
                                                  body=_model(PromoteRequest), ok="promoted")},
            "/admin/rollback": {"post": operation("Undo the task's last promotion", "admin",
                                                   body=_model(RollbackRequest), ok="rolled back")},
            "/admin/adapters/load": {"post": operation("Load a version into the engine", "admin",
                                                        body=_model(AdapterLoadRequest), ok="loaded")},
            "/admin/adapters/unload": {"post": operation("Unload a version from the engine", "admin",
                                                          body=_model(AdapterLoadRequest), ok="unloaded")},
            "/healthz": {"get": {"summary": "Engine state and champions", "responses": {
                "200": {"description": "ready"}, "503": {"description": "the engine is not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
            **(extra_paths or {}),
        },
    }
