"""Which sets judge a task's adapters: its held-out set and, for each challenger set, the judged split.

One function answers this for every caller (scheduled evals, the gate, retraining-data assembly, the watch), so
they all judge on the same examples: the gate can reuse the champion's scheduled runs, and data assembly knows
exactly what it must never train on. Judge splits are created here on first use (challenger_sets/splits.py says
how an example's side is decided); a challenger set too small to split is judged whole, and then none of it is
trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tuneloop.challenger_sets.catalog import DatasetVersion, get_dataset, qualify
from tuneloop.challenger_sets.splits import GATE_SUFFIX, JudgeSplitTooSmall, ensure_judge_set
from tuneloop.config import Config
from tuneloop.store import Store

log = logging.getLogger(__name__)

GateRole = Literal["heldout", "challenger"]


@dataclass(frozen=True)
class JudgedSet:
    """A set adapters are judged on. `role` says how the gate reads it: the held-out set for non-inferiority, a
    challenger split for superiority."""

    dataset: DatasetVersion
    role: GateRole
    source: str  # the configured set it stands for (task/name), e.g. sentiment/other-topics for its -gate split
    whole: bool  # the whole source is judged: nothing of it may be trained on

    @property
    def ref(self) -> str:
        return self.dataset.manifest.ref


def judged_sets(config: Config, store: Store, task: str, challengers: Sequence[str] | None = None) -> list[JudgedSet]:
    """The held-out set, then the judged split of the latest version of each challenger set (`challengers`, by
    default the task's configured ones), in that order."""
    task_config = config.task(task)
    heldout = get_dataset(store, task_config.heldout_dataset)
    sets = [JudgedSet(heldout, "heldout", heldout.manifest.name, whole=True)]
    settings = task_config.retrain
    for name in task_config.challenger_datasets if challengers is None else challengers:
        source = get_dataset(store, qualify(task, name).removesuffix(GATE_SUFFIX))
        try:
            split = ensure_judge_set(store, config.data_path, source, share=settings.judge_share, seed=settings.seed)
        except JudgeSplitTooSmall as exc:
            log.warning("%s: judging all of %s, none of it trainable: %s", task, source.manifest.ref, exc)
            sets.append(JudgedSet(source, "challenger", source.manifest.name, whole=True))
            continue
        sets.append(JudgedSet(split, "challenger", source.manifest.name, whole=False))
    return sets
