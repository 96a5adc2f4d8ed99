"""Assemble a retraining set: new labelled data plus replayed training data, clean and provably leak-free.

Sources of new data are the task's challenger sets (their trainable side only when the gate judges on them, see
challenger_sets/judged.py) and sets built from labelled traffic (`datasets from-traffic`). The recipe:

1. every gate set (the held-out set and each judged split, given by the caller) is fixed first; nothing in them may
   be trained on;
2. new examples are pooled, de-duplicated on the normalised input, PII-redacted with the gateway's redactor,
   capped at `max_new_examples` (seeded sample);
3. replay: `replay_ratio` x as many examples of the original training set, so the task is not forgotten;
4. label tasks: the new part is resampled to equal label counts (keeping its size); the replay keeps the
   training set's label shares unless `balance_replay` (see RetrainConfig for why);
5. anything whose input occurs in a gate set is dropped and counted, and the result is checked again;
6. the set is registered as `<task>/retrain-job<N>` (kind train) with the whole recipe and every count in its
   manifest.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from pydantic import AliasChoices, BaseModel, Field

from tuneloop.challenger_sets.catalog import DatasetVersion, add_dataset, get_dataset, list_datasets
from tuneloop.challenger_sets.judged import GateRole, JudgedSet
from tuneloop.challenger_sets.leakage import check_no_leakage, input_keys
from tuneloop.challenger_sets.records import Example, Message, normalize_text
from tuneloop.challenger_sets.splits import GATE_SUFFIX, split
from tuneloop.config import Config
from tuneloop.errors import DatasetError, TrainingError
from tuneloop.redact import Redactor
from tuneloop.store import Store

MAX_ID_CHARS = 200


class SourceCounts(BaseModel):
    rows: int
    offered: int = Field(description="Examples offered for training (the trainable side of a judged set).")
    held_back_for_gate: int = 0


class NewPart(BaseModel):
    sources: dict[str, SourceCounts]
    unique: int
    duplicates_dropped: int
    in_gate_sets_dropped: int
    pii_redacted: dict[str, int]
    labels: dict[str, int]
    balancing_repeats: int

    @property
    def held_back_for_gate(self) -> int:
        return sum(s.held_back_for_gate for s in self.sources.values())


class ReplayPart(BaseModel):
    source: str = Field(validation_alias=AliasChoices("source", "from"), serialization_alias="from",
                        description="The training set replayed from.")
    rows: int
    in_gate_sets_dropped: int
    labels: dict[str, int]
    balancing_repeats: int


class GateSetRows(BaseModel):
    dataset: str
    role: GateRole
    rows: int


class RetrainRecipe(BaseModel):
    """How a retraining set was made, every count included; stored as its dataset manifest's `build`."""

    job_name: str
    seed: int
    replay_ratio: float
    judge_share: float
    max_new_examples: int
    balance_labels: bool
    balance_replay: bool
    gate_sets: list[GateSetRows]
    new: NewPart
    replay: ReplayPart
    rows: int

    @classmethod
    def of(cls, dataset: DatasetVersion) -> RetrainRecipe:
        """The recipe of a set `assemble` registered."""
        if not dataset.manifest.source.startswith("retrain:"):
            raise DatasetError(f"{dataset.manifest.ref} was not assembled for retraining (source "
                               f"{dataset.manifest.source})")
        return cls.model_validate(dataset.manifest.build)


@dataclass(frozen=True)
class AssembledData:
    dataset: DatasetVersion
    recipe: RetrainRecipe


def assemble(config: Config, store: Store, task: str, *, judged: list[JudgedSet], name: str) -> AssembledData:
    """The retraining set for `task`, never holding an input of a `judged` set (judged_sets() of the job)."""
    task_config = config.task(task)
    settings = task_config.retrain
    rng = random.Random(settings.seed)
    forbidden = set().union(*(input_keys(s.dataset.load()) for s in judged))
    judged_sources = {s.source: s for s in judged if s.role == "challenger"}

    sources: dict[str, SourceCounts] = {}
    pooled: list[tuple[str, Example]] = []
    for source in list_datasets(store, task=task):
        manifest = source.manifest
        if manifest.kind != "challenger" or manifest.name.endswith(GATE_SUFFIX):
            continue
        examples = source.load()
        judged_source = judged_sources.get(manifest.name)
        if judged_source is not None:
            examples, held_back = ([], examples) if judged_source.whole else split(examples, settings.judge_share,
                                                                                     settings.seed)
            sources[manifest.ref] = SourceCounts(rows=manifest.rows, offered=len(examples),
                                                 held_back_for_gate=len(held_back))
        else:
            sources[manifest.ref] = SourceCounts(rows=manifest.rows, offered=len(examples))
        pooled.extend((manifest.ref, e) for e in examples)
    if not pooled:
        raise TrainingError(f"task '{task}' has no labelled new data: add a challenger set or build one from "
                            "labelled traffic (`tuneloop datasets from-traffic`)")

    new, duplicates, leaked_new = _unique(pooled, forbidden)
    if len(new) > settings.max_new_examples:
        new = rng.sample(new, settings.max_new_examples)
    redactor = Redactor(config.serving.redact)
    new = [(source, _redacted(e, redactor)) for source, e in new]

    train_set = get_dataset(store, task_config.train_dataset)
    replay_pool = [(train_set.manifest.ref, e) for e in train_set.load()]
    replay_pool, _, leaked_replay = _unique(replay_pool, forbidden)
    replay_size = min(len(replay_pool), round(settings.replay_ratio * len(new)))
    replay = rng.sample(replay_pool, replay_size)

    classification = task_config.kind == "classification"
    new_repeats = replay_repeats = 0
    if classification and settings.balance_labels:
        new, new_repeats = _balanced(new, task_config.labels, rng)
    if classification and settings.balance_replay and replay:
        replay, replay_repeats = _balanced(replay, task_config.labels, rng)
    rows = [_tagged(source, e, "new") for source, e in new] + [_tagged(source, e, "replay") for source, e in replay]
    rng.shuffle(rows)
    check_no_leakage(rows, forbidden, name=f"{task}/{name}", against="the gate's sets")

    recipe = RetrainRecipe(
        job_name=name, seed=settings.seed, replay_ratio=settings.replay_ratio, judge_share=settings.judge_share,
        max_new_examples=settings.max_new_examples, balance_labels=settings.balance_labels and classification,
        balance_replay=settings.balance_replay and classification,
        gate_sets=[GateSetRows(dataset=s.ref, role=s.role, rows=s.dataset.manifest.rows) for s in judged],
        new=NewPart(sources=sources, unique=len(new), duplicates_dropped=duplicates, in_gate_sets_dropped=leaked_new,
                    pii_redacted=dict(redactor.counts), labels=_label_counts(new), balancing_repeats=new_repeats),
        replay=ReplayPart(source=train_set.manifest.ref, rows=len(replay), in_gate_sets_dropped=leaked_replay,
                          labels=_label_counts(replay), balancing_repeats=replay_repeats),
        rows=len(rows))
    dataset = add_dataset(store, config.data_path, rows, task=task, name=name, kind="train",
                          source=f"retrain:{name}", build=recipe.model_dump(mode="json", by_alias=True),
                          check_leakage=False)
    return AssembledData(dataset=dataset, recipe=recipe)


def _unique(pooled: list[tuple[str, Example]], forbidden: set[str]) -> tuple[list[tuple[str, Example]], int, int]:
    """First occurrence of each normalised input, minus any that a gate set holds: (kept, duplicates, leaked)."""
    seen: set[str] = set()
    kept, duplicates, leaked = [], 0, 0
    for source, example in pooled:
        key = normalize_text(example.input_text())
        if key in forbidden:
            leaked += 1
        elif key in seen:
            duplicates += 1
        else:
            seen.add(key)
            kept.append((source, example))
    return kept, duplicates, leaked


def _redacted(example: Example, redactor: Redactor) -> Example:
    if example.messages:
        messages = [Message(role=m.role, content=redactor.redact(m.content)[0]) for m in example.messages]
        return example.model_copy(update={"messages": messages})
    return example.model_copy(update={"input": redactor.redact(example.input or "")[0]})


def _balanced(rows: list[tuple[str, Example]], labels: list[str],
              rng: random.Random) -> tuple[list[tuple[str, Example]], int]:
    """Equal counts per label at the same total: big classes sampled down, small ones repeated; (rows, repeats)."""
    by_label: dict[str, list[tuple[str, Example]]] = defaultdict(list)
    for row in rows:
        by_label[row[1].reference].append(row)
    present = [label for label in labels if by_label.get(label)]
    if len(present) < 2:
        return rows, 0
    target = max(1, len(rows) // len(present))
    out: list[tuple[str, Example]] = []
    repeats = 0
    for label in present:
        group = by_label[label]
        if len(group) >= target:
            out.extend(rng.sample(group, target))
            continue
        out.extend(group)
        for k in range(target - len(group)):
            source, example = rng.choice(group)
            out.append((source, example.model_copy(update={"id": f"{example.id}#r{k}"})))
            repeats += 1
    return out, repeats


def _tagged(source: str, example: Example, part: str) -> Example:
    """Ids unique across sources, with provenance in meta."""
    new_id = f"{part}:{source}:{example.id}"[:MAX_ID_CHARS]
    return example.model_copy(update={"id": new_id, "meta": {**example.meta, "retrain_source": source,
                                                             "retrain_part": part}})


def _label_counts(rows: list[tuple[str, Example]]) -> dict[str, int]:
    return dict(Counter(e.reference for _, e in rows).most_common())
