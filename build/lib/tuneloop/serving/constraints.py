"""Label tasks answer with a label, by construction: vLLM's structured outputs restrict decoding to the labels.

A free-running model asked for a sentiment may answer "I think it's negative." or a poem; its accuracy then
measures the format, not the task, and a base model compared with an adapter loses on format alone. With
`{"structured_outputs": {"choice": labels}}` vLLM only lets the model produce one of the labels (on CPU too),
for user requests and evaluation requests alike. A request that brings its own structured-output or response
format keeps it, and a task can turn the constraint off (`tasks.<name>.constrain_labels: false`).
"""

from __future__ import annotations

from typing import Any

from tuneloop.config import TaskConfig

# Request fields by which a client asks vLLM for its own output format; such a request is left as it is.
OWN_FORMAT_FIELDS = ("structured_outputs", "guided_choice", "guided_json", "guided_regex", "guided_grammar")


def label_token_budget(labels: list[str]) -> int:
    """Enough new tokens for the longest label and the end token: a label never takes more tokens than its
    UTF-8 bytes with a byte-level tokenizer, so this is safe without loading one."""
    return max(len(label.encode("utf-8")) for label in labels) + 1


def label_constraint(task: TaskConfig) -> dict[str, Any] | None:
    """The structured-outputs field for a classification task with the constraint on, else None."""
    if task.kind != "classification" or not task.constrain_labels:
        return None
    return {"choice": list(task.labels)}


def has_own_format(body: dict[str, Any]) -> bool:
    response_format = body.get("response_format")
    custom = isinstance(response_format, dict) and response_format.get("type") not in (None, "text")
    return custom or any(body.get(name) is not None for name in OWN_FORMAT_FIELDS)


def constrain_to_labels(body: dict[str, Any], task: TaskConfig) -> bool:
    """Add the task's label constraint to a request body (in place) unless it has its own format; True if added.

    A `max_tokens` (or `max_completion_tokens`) too small for the longest label is raised to fit it, or the
    answer would be cut mid-label ("negat"); without one, the constraint itself ends the answer.
    """
    constraint = label_constraint(task)
    if constraint is None or has_own_format(body):
        return False
    body["structured_outputs"] = constraint
    budget = label_token_budget(task.labels)
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] < budget:
            body[field] = budget
    return True
