"""The per-answer quality signal of a classification answer, read from the answer vLLM already computed.

A label task's answer is one label, decoded under the label constraint. vLLM returns, when asked, the first
answer token's top log-probabilities. Measured against PEFT on the same chats (tests/monitor/test_estimate_live.py),
vLLM 0.32 computes them after the constraint's token mask and before temperature: they are normalised over the
tokens the constraint allows (the labels and their prefixes), so they differ from the model's unconstrained
log-probabilities by about a constant, and the labels' shares among themselves are the model's. The labels of
the embedded task are single tokens, so each label's token carries that label's score. Asking costs vLLM a top-k
over the vocabulary for the answer's tokens, and the gateway nothing it did not already do: it parses every
non-streamed answer for capture anyway, so it takes the signal from that parse and, when the client did not ask
for log-probabilities itself, removes them from the answer it returns.

Streamed answers, completions-endpoint requests and requests that bring their own output format are answered as
they are, without a signal. Turning log-probabilities into calibrated label probabilities happens later, off the
request path (monitor/estimate.py).
"""

from __future__ import annotations

from typing import Any

from tuneloop.answer_signal import SIGNAL_TOP_LOGPROBS
from tuneloop.config import TaskConfig


def ask_for_signal(body: dict[str, Any], task: TaskConfig, *, constrained: bool, stream: bool) -> bool:
    """Ask vLLM for the first token's top log-probabilities (in place); True if the client did not ask for
    log-probabilities itself, so the gateway must take them out of the answer again."""
    if not constrained or stream or task.kind != "classification" or not task.estimate.signal:
        return False
    if body.get("logprobs"):
        return False  # the client's own request: its answer keeps them, and capture reads them too
    body["logprobs"] = True
    body["top_logprobs"] = SIGNAL_TOP_LOGPROBS
    return True


def without_logprobs(payload: dict[str, Any]) -> dict[str, Any]:
    """The answer as the client asked for it: the log-probabilities the gateway added removed."""
    for choice in payload.get("choices") or []:
        if isinstance(choice, dict):
            choice.pop("logprobs", None)
    return payload
