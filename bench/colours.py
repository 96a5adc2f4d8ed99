"""A synthetic task where right and wrong are unmistakable after a few training steps: a sentence names a colour,
and the label is a fixed function of the colour. A champion trained on the `WRONG` mapping (poisoned labels) is
beaten by any candidate that learns the `RIGHT` one; 20 steps at lr 6e-3 learn a mapping perfectly (measured:
accuracy 1.0 on 60 unseen sentences). The retraining tests (tests/retrain/test_loop_live.py) and the recovery bench
(bench/bench_recovery.py) use it to make the gate's decision certain in minutes on two cores.
"""

from __future__ import annotations

import random
from pathlib import Path

from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.store import Store

TASK = "colours"
PLACES = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Sofia", "Tunis", "Riga", "Bern",
          "Doha", "Kyiv", "Lagos", "Minsk", "Rome", "Seoul", "Tokyo", "Accra", "Baku", "Delhi", "Dublin", "Havana"]
RIGHT = {"red": "negative", "green": "neutral", "blue": "positive"}
WRONG = {"red": "positive", "green": "negative", "blue": "neutral"}

# The task's entry under `tasks:` in a config file (indented for it).
COLOURS_TASK = """\
  colours:
    kind: classification
    system_prompt: "Classify the sentiment of the tweet. Answer with exactly one word: negative, neutral or positive."
    labels: [negative, neutral, positive]
    metrics: [accuracy, macro_f1, exact_match]
    primary_metric: macro_f1
    train_dataset: colours/colours
    heldout_dataset: colours/colours-heldout
    challenger_datasets: [colours/colours-new]
    schedule: {eval: null, drift: null, eval_limit: 40}
    train: {batch_size: 8, max_steps: 20, max_seq_len: 64, learning_rate: 0.006, eval_every: 100,
            validation_examples: 8}
    policy: {floors: [{metric: macro_f1, dataset: colours-new, min: 0.6}], drop: null, drift_windows: 0, cooldown_s: 0}
    retrain: {replay_ratio: 0.5, gate: {margin: 0.3, limit: 40}, watch_s: 600}
"""


def colours(mapping: dict[str, str], first_ticket: int, n: int, seed: int) -> list[Example]:
    """n sentences, ticket numbers from `first_ticket` (so sets never share an example), labelled by `mapping`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        colour = ("red", "green", "blue")[i % 3]
        out.append(Example(id=f"t{first_ticket + i}", reference=mapping[colour],
                           input=f"Ticket {first_ticket + i}: the sky over {rng.choice(PLACES)} looks {colour}."))
    return out


def add_colours_sets(store: Store, data_dir: Path) -> None:
    """The right-mapped training, held-out and challenger sets, and the poisoned set a bad champion learns from."""
    add_dataset(store, data_dir, colours(RIGHT, 10000, 200, 1), task=TASK, name="colours", kind="train",
                source="test")
    add_dataset(store, data_dir, colours(WRONG, 2000, 150, 2), task=TASK, name="poisoned", kind="train",
                source="test")
    add_dataset(store, data_dir, colours(RIGHT, 3000, 40, 3), task=TASK, name="colours-heldout", kind="heldout",
                source="test")
    add_dataset(store, data_dir, colours(RIGHT, 4000, 160, 4), task=TASK, name="colours-new", kind="challenger",
                source="test")
