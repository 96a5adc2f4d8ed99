"""Leakage checks: an evaluation set must share no example with the data the model was trained on.

Examples are compared on their normalized input text (see `records.normalize_text`), so a tweet that differs
from a training tweet only in case or spacing still counts as seen.
"""

from __future__ import annotations

from collections.abc import Iterable

from tuneloop.challenger_sets.records import Example, normalize_text
from tuneloop.errors import LeakageError


def input_keys(examples: Iterable[Example]) -> set[str]:
    return {normalize_text(e.input_text()) for e in examples}


def overlapping(candidates: Iterable[Example], seen_keys: set[str]) -> list[Example]:
    return [e for e in candidates if normalize_text(e.input_text()) in seen_keys]


def check_no_leakage(candidates: list[Example], seen_keys: set[str], *, name: str, against: str) -> None:
    """Refuse `candidates` if any of them occurs (normalized) in the other set."""
    overlap = overlapping(candidates, seen_keys)
    if overlap:
        sample = ", ".join(repr(e.id) for e in overlap[:5])
        raise LeakageError(
            f"{len(overlap)} of {len(candidates)} examples also occur in {against} (normalized input text), "
            f"e.g. ids {sample}; remove them or the scores would reward memorisation", path=name)
