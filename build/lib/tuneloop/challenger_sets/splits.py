"""Judge splits: the part of a challenger set that retraining may never see, so the gate judges on unseen data.

A challenger set that is both trained on (its labelled examples are the new data a retrain needs) and judged on
is split once by a seeded hash of each example's normalised input: the same input always lands on the same side,
in every version of the set and every retrain, so no later job can train on an example an earlier gate judged
with. A judged input that some training set already holds (e.g. it came in through labelled traffic) is dropped
from the split and counted. The judged part is registered as its own challenger set, `<name>-gate`, and from then
on scheduled evals and policy floors read that split instead of the whole set.
"""

from __future__ import annotations

import hashlib

from tuneloop.challenger_sets.catalog import DatasetVersion, add_dataset, find_latest, list_datasets, qualify
from tuneloop.challenger_sets.leakage import input_keys
from tuneloop.challenger_sets.records import Example, normalize_text
from tuneloop.errors import DatasetError
from tuneloop.store import Store

GATE_SUFFIX = "-gate"


class JudgeSplitTooSmall(DatasetError):
    """Too few examples of a challenger set fall in its judge split for the gate to use it."""


def is_judged(example: Example, share: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{normalize_text(example.input_text())}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def split(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(trainable, judged)."""
    judged = [e for e in examples if is_judged(e, share, seed)]
    trainable = [e for e in examples if not is_judged(e, share, seed)]
    return trainable, judged


def gate_name(name: str) -> str:
    return name.split("@", 1)[0] + GATE_SUFFIX


def ensure_judge_set(store: Store, data_dir: object, source: DatasetVersion, *, share: float,
                     seed: int) -> DatasetVersion:
    """Register (or find, when identical) the judged split of `source` as `<name>-gate`."""
    from pathlib import Path

    _, judged = split(source.load(), share, seed)
    trained = set().union(*(input_keys(d.load()) for d in list_datasets(store, task=source.manifest.task,
                                                                      latest_only=False)
                            if d.manifest.kind == "train"))
    seen = [e for e in judged if normalize_text(e.input_text()) in trained]
    judged = [e for e in judged if normalize_text(e.input_text()) not in trained]
    if len(judged) < 2:
        raise JudgeSplitTooSmall(f"{source.manifest.ref}: only {len(judged)} example(s) fall in its judge split "
                           f"(share {share}); the gate needs more")
    return add_dataset(store, Path(str(data_dir)), judged, task=source.manifest.task,
                       name=gate_name(source.manifest.name), kind="challenger", source=f"split:{source.manifest.ref}",
                       build={"split_of": source.manifest.ref, "share": share, "seed": seed,
                              "rows_of_source": source.manifest.rows, "dropped_seen_in_training": len(seen)})


def evaluation_set(store: Store, task: str, name: str) -> str:
    """The set to evaluate for `name`: its judge split once one exists (the rest may have been trained on)."""
    full = qualify(task, name)
    if full.endswith(GATE_SUFFIX):
        return full
    return gate_name(full) if find_latest(store, gate_name(full)) is not None else full
