"""Few-shot prompts drawn the way a careful baseline needs: several draws and orders, two sampling schemes.

A single fixed draw says little: which examples are shown and in what order moves a small model's answers a
lot (one draw per label ending on `positive` pushed SmolLM2 below the majority class). So a variant (k shots,
how they are sampled, how they are shown) is scored over several seeded draws, each with its own examples and
order, and variants are compared on a validation split carved from training, never on the test set.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tuneloop.challenger_sets.records import Example
from tuneloop.evaluators.label_likelihood import ShotFormat

ShotSampling = Literal["balanced", "proportional"]


@dataclass(frozen=True)
class FewShotVariant:
    """k shots, sampled `balanced` (equal per label) or `proportional` (as in training), shown as `turns`
    (earlier user/assistant turns) or inside one `message`."""

    k: int
    sampling: ShotSampling
    shot_format: ShotFormat

    @property
    def name(self) -> str:
        return f"{self.k}-shot {self.sampling}, {'chat turns' if self.shot_format == 'turns' else 'one message'}"


def label_quota(pool: Sequence[Example], labels: Sequence[str], k: int, sampling: ShotSampling,
                rng: random.Random) -> dict[str, int]:
    """How many shots of each label: equal shares, or the pool's proportions by largest remainder (ties and
    the balanced scheme's leftover shots are given to randomly chosen labels)."""
    if sampling == "balanced":
        quota = {label: k // len(labels) for label in labels}
        for label in rng.sample(list(labels), k % len(labels)):
            quota[label] += 1
        return quota
    counts = Counter(e.reference for e in pool)
    total = sum(counts[label] for label in labels)
    exact = {label: k * counts[label] / total for label in labels}
    quota = {label: int(exact[label]) for label in labels}
    order = sorted(labels, key=lambda label: (-(exact[label] - quota[label]), rng.random()))
    for label in order[: k - sum(quota.values())]:
        quota[label] += 1
    return quota


def draw_shots(pool: Sequence[Example], labels: Sequence[str], variant: FewShotVariant, seed: int,
               max_chars: int = 200) -> list[Example]:
    """One seeded draw: the examples (short enough to keep prompts small) and their order."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {label: [] for label in labels}
    for example in pool:
        if example.reference in by_label and len(example.last_user_text()) <= max_chars:
            by_label[example.reference].append(example)
    shots: list[Example] = []
    for label, n in label_quota(pool, labels, variant.k, variant.sampling, rng).items():
        if n > len(by_label[label]):
            raise ValueError(f"only {len(by_label[label])} '{label}' examples to draw {n} shots from")
        shots += rng.sample(by_label[label], n)
    rng.shuffle(shots)
    return shots


def prediction_counts(predictions: Sequence[str], labels: Sequence[str]) -> str:
    """`negative 180 / neutral 12 / positive 108`: what a baseline actually answered."""
    counts = Counter(predictions)
    return " / ".join(f"{label} {counts.get(label, 0)}" for label in labels)
