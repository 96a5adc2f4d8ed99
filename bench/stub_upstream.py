"""`python -m bench.stub_upstream PORT`: an OpenAI-compatible upstream that answers at once, for timing what the
gateway adds (bench/bench_gateway.py).

A bare ASGI app on uvicorn with httptools and uvloop, the fastest server stack installed here, so the upstream's
own time is as small as it can be and the same for both paths. It reads and parses the body as a real engine does,
then answers a fixed chat completion (with vLLM-shaped top-20 log-probabilities when asked: the label signal the
gateway requests), or for `"stream": true` eight server-sent events, a usage event and [DONE].
"""

from __future__ import annotations

import json
import sys
from typing import Any

import uvicorn

ANSWER = json.dumps({"id": "cmpl-stub", "object": "chat.completion", "model": "stub",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "negative"}}],
                     "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32}}).encode()
EVENTS = b"".join(
    b"data: " + json.dumps({"id": "cmpl-stub", "object": "chat.completion.chunk", "model": "stub",
                            "choices": [{"index": 0, "delta": {"content": f" word{i}"}}]}).encode() + b"\n\n"
    for i in range(8))
USAGE = (b"data: " + json.dumps({"id": "cmpl-stub", "choices": [], "usage": {
    "prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38}}).encode() + b"\n\ndata: [DONE]\n\n")
# What vLLM returns when the gateway asks for a label answer's signal: the first token's top 20 candidates.
_TOP = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}
        for token, logprob in [("negative", -0.05), ("neutral", -3.2), ("positive", -4.1)]
        + [(f"cand{i}", -9999.0) for i in range(17)]]
ANSWER_WITH_LOGPROBS = json.dumps({"id": "cmpl-stub", "object": "chat.completion", "model": "stub",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": "negative"},
                                                "logprobs": {"content": [{"token": "negative", "logprob": -0.05,
                                                                          "bytes": list(b"negative"),
                                                                          "top_logprobs": _TOP}]}}],
                                   "usage": {"prompt_tokens": 30, "completion_tokens": 2,
                                             "total_tokens": 32}}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "GET":
        await _send(send, 200, b"application/json", MODELS)
        return
    request = json.loads(body)
    if request.get("stream"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        first, rest = EVENTS.split(b"\n\n", 1)
        await send({"type": "http.response.body", "body": first + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": rest + USAGE})
        return
    await _send(send, 200, b"application/json", ANSWER_WITH_LOGPROBS if request.get("logprobs") else ANSWER)


async def _send(send: Any, status: int, media: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http="httptools", loop="uvloop", log_level="warning",
                access_log=False)
