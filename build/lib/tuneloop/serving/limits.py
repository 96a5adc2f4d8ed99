"""What one request may ask of the engine: known fields only, and bounded counts, lengths and token budgets.

Anything the gateway forwards costs vLLM time, so each knob that multiplies the cost (`n`, `best_of`, messages,
prompts, `max_tokens`, stop sequences, log-probabilities) has a ceiling (`serving.limits`), and a field the gateway
does not know is refused rather than passed through: vLLM accepts many extension fields, some of which change what
the model is asked (chat-template arguments, for one). A request over a limit is refused with 400 naming the field
and the limit; no value is lowered or raised to fit.
"""

from __future__ import annotations

from typing import Any

from tuneloop.config import RequestLimits
from tuneloop.errors import DatasetError
from tuneloop.serving.protocol import Endpoint, text_content

# OpenAI's fields and vLLM's sampling and structured-output extensions that only shape sampling or the answer.
SAMPLING_FIELDS = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "user", "min_tokens",
    "ignore_eos", "response_format", "structured_outputs", "guided_choice", "guided_json", "guided_regex",
    "guided_grammar",
})
ALLOWED_FIELDS: dict[Endpoint, frozenset[str]] = {
    "chat": SAMPLING_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls"},
    "completion": SAMPLING_FIELDS | {"prompt", "best_of", "echo", "suffix"},
}


def _integer(body: dict[str, Any], field: str, low: int, high: int) -> None:
    if field not in body or body[field] is None:
        return
    value = body[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"invalid request: {field} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise DatasetError(f"invalid request: {field} is {value}; the gateway allows {low} to {high} "
                           "(serving.limits)")


def check_limits(endpoint: Endpoint, body: dict[str, Any], limits: RequestLimits) -> None:
    """Raise DatasetError for an unknown field or a value over `limits`; the body is not changed."""
    unknown = sorted(set(body) - ALLOWED_FIELDS[endpoint])
    if unknown:
        raise DatasetError(f"invalid request: unknown field(s) {', '.join(map(repr, unknown))}; the gateway "
                           f"forwards only {', '.join(sorted(ALLOWED_FIELDS[endpoint]))}")
    if endpoint == "chat":
        messages = body.get("messages") or []
        if len(messages) > limits.max_messages:
            raise DatasetError(f"invalid request: {len(messages)} messages; the gateway allows up to "
                               f"{limits.max_messages} (serving.limits.max_messages)")
        texts = [text_content(m.get("content")) for m in messages if isinstance(m, dict)]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if len(prompts) > limits.max_prompts:
            raise DatasetError(f"invalid request: {len(prompts)} prompts; the gateway allows up to "
                               f"{limits.max_prompts} (serving.limits.max_prompts)")
        texts = [p for p in prompts if isinstance(p, str)]
    chars = sum(len(t) for t in texts)
    if chars > limits.max_prompt_chars:
        raise DatasetError(f"invalid request: the prompt text is {chars:,} characters; the gateway allows up to "
                           f"{limits.max_prompt_chars:,} (serving.limits.max_prompt_chars)")
    for field in ("n", "best_of"):
        _integer(body, field, 1, limits.max_n)
    for field in ("max_tokens", "max_completion_tokens"):
        _integer(body, field, 1, limits.max_tokens)
    _integer(body, "top_logprobs", 0, limits.max_logprobs)
    if endpoint == "completion":
        _integer(body, "logprobs", 0, limits.max_logprobs)
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > limits.max_stop:
        raise DatasetError(f"invalid request: {len(stop)} stop sequences; the gateway allows up to "
                           f"{limits.max_stop} (serving.limits.max_stop)")
