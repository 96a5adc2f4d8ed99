"""The quality signal of an answer, as captured. A label answer: each label's log-probability from the first answer
token's top candidates (vLLM's log-probabilities under the label constraint, returned with the answer). A free-text
answer: the mean and lowest log-probability of its tokens, and its length. See serving/quality_signal.py.

Shared by the gateway that captures it (serving/quality_signal.py), the eval client that reads it on held-out
answers (evaluators/client.py) and the estimator that calibrates it (monitor/estimate.py), so all three agree on
what a stored signal is.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SIGNAL_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
MASKED_LOGPROB = -9999.0
MAX_SIGNAL_ENTRIES = SIGNAL_TOP_LOGPROBS  # candidates read per answer: a bound on a client-sized field


def first_token_logprobs(payload: Any) -> dict[str, float] | None:
    """{token text: log-probability} of the first answer token's top candidates, or None if the answer has none."""
    try:
        content = payload["choices"][0]["logprobs"]["content"]
        top = content[0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    signal: dict[str, float] = {}
    for entry in top[:MAX_SIGNAL_ENTRIES]:
        if not isinstance(entry, dict):
            continue
        token, logprob = entry.get("token"), entry.get("logprob")
        # vLLM clamps masked tokens (the constraint forbids them) to -9999: not candidates, so not a floor either
        if isinstance(token, str) and isinstance(logprob, int | float) and math.isfinite(logprob) \
                and logprob > MASKED_LOGPROB:
            signal[token[:64]] = max(signal.get(token[:64], -math.inf), float(logprob))
    return signal or None


MISSING_KEY = "_missing"


def label_signal(top: dict[str, float] | None, labels: list[str]) -> dict[str, float] | None:
    """What capture stores: each label's log-probability and how many labels were not among the top candidates.
    Only the labels are kept, never the other candidate tokens (they could be fragments of the user's text)."""
    if not top:
        return None
    values, missing = label_logprobs(top, labels)
    return {**{label: float(v) for label, v in zip(labels, values, strict=True)}, MISSING_KEY: float(missing)}


def stored_label_logprobs(signal: dict[str, float], labels: list[str]) -> np.ndarray | None:
    """The stored signal's label log-probabilities in the task's label order; None if it lacks one (the task's
    labels changed since it was captured)."""
    if any(label not in signal for label in labels):
        return None
    return np.array([signal[label] for label in labels], dtype=float)


def label_logprobs(signal: dict[str, float], labels: list[str]) -> tuple[np.ndarray, int]:
    """Each label's log-probability from a first-token signal, and how many labels were not among the top
    candidates. A label's token may carry a leading space; a missing label gets the lowest log-probability that
    was returned (an upper bound on its true value: it ranked below all of them)."""
    floor = min(signal.values())
    values, missing = [], 0
    for label in labels:
        found = [signal[t] for t in (label, f" {label}", f"Ġ{label}") if t in signal]
        if found:
            values.append(max(found))
        else:
            values.append(floor)
            missing += 1
    return np.array(values, dtype=float), missing


# --- generation answers -------------------------------------------------------------------------------------------

MAX_ANSWER_TOKENS_READ = 4096  # tasks.<name>.max_new_tokens is at most 4096
TOKEN_SIGNAL_KEYS = ("mean_logprob", "min_logprob", "tokens")


def answer_token_signal(payload: Any) -> dict[str, float] | None:
    """What capture stores for a free-text answer: the mean and lowest log-probability of its sampled tokens and
    how many there were. Numbers only: the tokens themselves are the answer's text and are not kept twice."""
    try:
        content = payload["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, list):
        return None
    values = [float(entry["logprob"]) for entry in content[:MAX_ANSWER_TOKENS_READ]
              if isinstance(entry, dict) and isinstance(entry.get("logprob"), int | float)
              and math.isfinite(entry["logprob"]) and entry["logprob"] > MASKED_LOGPROB]
    if not values:
        return None
    return {"mean_logprob": sum(values) / len(values), "min_logprob": min(values), "tokens": float(len(values))}


def stored_token_signal(signal: dict[str, float]) -> np.ndarray | None:
    """A stored free-text signal as (mean log-prob, lowest log-prob, tokens); None if it is not one."""
    if any(not isinstance(signal.get(key), int | float) for key in TOKEN_SIGNAL_KEYS):
        return None
    return np.array([signal[key] for key in TOKEN_SIGNAL_KEYS], dtype=float)
