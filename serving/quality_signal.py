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

A generation task's answer is free text: vLLM is asked for the log-probability of each sampled token (no top
candidates, so no extra top-k), and capture keeps their mean, their minimum and the answer's length, the inputs of
the per-answer quality predictor (monitor/answer_quality.py).

Streamed answers, completions-endpoint requests and classification requests that bring their own output format
are answered as they are, without a signal. Turning log-probabilities into calibrated label probabilities (or a
predicted chrF) happens later, off the request path (monitor/estimate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneloop.answer_signal import SIGNAL_TOP_LOGPROBS, answer_token_signal, first_token_logprobs, label_signal
from tuneloop.config import TaskConfig


@dataclass(frozen=True)
class SignalPlan:
    """How one request's answer yields its signal: from the labels' first-token log-probabilities (`labels`) or
    from the answer tokens' log-probabilities (`labels` None), and whether the gateway must take the
    log-probabilities out of the answer again (the client did not ask for them)."""

    labels: list[str] | None
    strip: bool

    def read(self, payload: Any) -> dict[str, float] | None:
        if self.labels is not None:
            return label_signal(first_token_logprobs(payload), self.labels)
        return answer_token_signal(payload)


def plan_signal(body: dict[str, Any], task: TaskConfig, *, constrained: bool, stream: bool) -> SignalPlan | None:
    """Ask vLLM for the log-probabilities the task's signal needs (in place); None when this request gets none."""
    if stream or not task.estimate.signal:
        return None
    if task.kind == "classification" and not constrained:
        return None
    labels = list(task.labels) if task.kind == "classification" else None
    if body.get("logprobs"):
        if labels is not None and not body.get("top_logprobs"):
            return None  # the client's own request without top candidates: no label shares to read
        return SignalPlan(labels, strip=False)  # the client's own request: its answer keeps them
    body["logprobs"] = True
    if labels is not None:
        body["top_logprobs"] = SIGNAL_TOP_LOGPROBS
    return SignalPlan(labels, strip=True)


def strip_logprobs(payload: dict[str, Any]) -> bool:
    """Remove the log-probabilities the gateway added (in place): the answer as the client asked for it. True if
    there were any, so an answer without them is forwarded as the bytes vLLM sent, not re-encoded."""
    removed = False
    for choice in payload.get("choices") or []:
        if isinstance(choice, dict) and "logprobs" in choice:
            del choice["logprobs"]
            removed = True
    return removed
