"""Retraining-set assembly on a real store with small hand-made datasets: the gate's examples are never trained
on (and stay judged across versions), duplicates and PII are removed, labels balanced, old data replayed."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneloop.challenger_sets.catalog import add_dataset, get_dataset
from tuneloop.challenger_sets.judged import JudgedSet, judged_sets
from tuneloop.challenger_sets.leakage import input_keys
from tuneloop.challenger_sets.records import Example
from tuneloop.challenger_sets.splits import evaluation_set, split
from tuneloop.config import Config
from tuneloop.errors import TrainingError
from tuneloop.retrain.data import AssembledData, RetrainRecipe, assemble
from tuneloop.store import Store

LABELS = ["negative", "neutral", "positive"]


def examples(prefix: str, n: int, labels: list[str] | None = None) -> list[Example]:
    labels = labels or LABELS
    return [Example(id=f"{prefix}{i}", input=f"{prefix} tweet number {i}", reference=labels[i % len(labels)])
            for i in range(n)]


def assembled(config: Config, store: Store, challengers: list[str], name: str) -> tuple[AssembledData, list[JudgedSet]]:
    """What a job does: its judged sets first, then the data that must not touch them."""
    judged = judged_sets(config, store, "sentiment", challengers)
    return assemble(config, store, "sentiment", judged=judged, name=name), judged


def seed_sets(store: Store, config: Config, challenger: list[Example]) -> None:
    add_dataset(store, config.data_path, examples("airline", 300), task="sentiment", name="train", kind="train",
                source="test")
    add_dataset(store, config.data_path, examples("held", 60), task="sentiment", name="heldout", kind="heldout",
                source="test")
    add_dataset(store, config.data_path, challenger, task="sentiment", name="other-topics", kind="challenger",
                source="test")


def test_the_gate_judges_on_examples_no_retrain_ever_trains_on(config: Config, store: Store) -> None:
    seed_sets(store, config, examples("topic", 200))
    first, first_judged = assembled(config, store, ["sentiment/other-topics"], "retrain-job1")
    judge = first_judged[1].dataset
    assert judge.manifest.name == "sentiment/other-topics-gate" and first_judged[0].role == "heldout"
    assert first_judged[1].source == "sentiment/other-topics" and not first_judged[1].whole
    judged = input_keys(judge.load())
    trained = input_keys(first.dataset.load())
    assert 70 <= len(judged) <= 130, "judge_share 0.5 of 200"
    assert not judged & trained and not input_keys(get_dataset(store, "sentiment/heldout").load()) & trained
    topic_rows = [e for e in first.dataset.load() if e.meta["retrain_part"] == "new"]
    assert topic_rows and all(e.meta["retrain_source"] == "sentiment/other-topics@1" for e in topic_rows)
    # a second job: same split, same judge set version
    second, second_judged = assembled(config, store, ["sentiment/other-topics"], "retrain-job2")
    assert second_judged[1].ref == judge.manifest.ref
    # a grown challenger set: every input judged before is still judged
    add_dataset(store, config.data_path, examples("topic", 300), task="sentiment", name="other-topics",
                kind="challenger", source="test")
    third, third_judged = assembled(config, store, ["sentiment/other-topics"], "retrain-job3")
    assert third_judged[1].dataset.manifest.version == 2
    assert judged <= input_keys(third_judged[1].dataset.load())
    assert not input_keys(third_judged[1].dataset.load()) & input_keys(third.dataset.load())
    assert [g.dataset for g in third.recipe.gate_sets] == [s.ref for s in third_judged]
    assert evaluation_set(store, "sentiment", "other-topics") == "sentiment/other-topics-gate"


def test_duplicates_pii_balance_and_replay(config: Config, store: Store) -> None:
    skewed = examples("topic", 140, ["negative"] * 4 + ["positive"] * 2 + ["neutral"]) + [
        Example(id="dup", input="TOPIC   tweet number 3", reference="negative"),
        Example(id="pii", input="mail me at jane.doe@example.com about it", reference="neutral")]
    seed_sets(store, config, skewed)
    trainable, _ = split(skewed, 0.5, 11)
    data, data_judged = assembled(config, store, ["sentiment/other-topics"], "retrain-job1")
    recipe = data.recipe
    rows = data.dataset.load()
    new = [e for e in rows if e.meta["retrain_part"] == "new"]
    replay = [e for e in rows if e.meta["retrain_part"] == "replay"]
    if any(e.id == "pii" for e in trainable):
        assert recipe.new.pii_redacted == {"email": 1}
        assert all("jane.doe" not in e.input_text() for e in rows)
    assert "jane.doe@example.com" not in data.dataset.path.read_text()
    duplicate_on_trainable_side = any(e.id == "dup" for e in trainable) and any(e.id == "topic3" for e in trainable)
    assert recipe.new.duplicates_dropped == int(duplicate_on_trainable_side)
    counts = Counter(e.reference for e in new)
    assert len(set(counts.values())) == 1 and set(counts) == set(LABELS), f"balanced: {counts}"
    assert recipe.new.balancing_repeats > 0, "neutral is rare in the skewed set, so it is repeated"
    assert len(replay) == pytest.approx(len(new), abs=3), "replay_ratio 1.0"
    assert all(e.meta["retrain_source"] == "sentiment/train@1" for e in replay)
    stored = get_dataset(store, data.dataset.manifest.ref)
    assert stored.manifest.kind == "train" and RetrainRecipe.of(stored) == recipe
    assert recipe.replay.rows == len(replay) and stored.manifest.build["replay"]["from"] == "sentiment/train@1"


def test_replay_keeps_the_training_label_shares_unless_asked_to_balance(config: Config, store: Store) -> None:
    skewed_train = examples("airline", 300, ["negative"] * 6 + ["neutral"] * 2 + ["positive"])
    add_dataset(store, config.data_path, skewed_train, task="sentiment", name="train", kind="train", source="test")
    add_dataset(store, config.data_path, examples("held", 60), task="sentiment", name="heldout", kind="heldout",
                source="test")
    add_dataset(store, config.data_path, examples("topic", 240), task="sentiment", name="other-topics",
                kind="challenger", source="test")
    natural, natural_judged = assembled(config, store, ["other-topics"], "retrain-job1")
    shares = Counter(e.reference for e in natural.dataset.load() if e.meta["retrain_part"] == "replay")
    assert shares["negative"] > 3 * shares["positive"], f"the training set's skew is kept: {shares}"
    assert natural.recipe.balance_replay is False and natural.recipe.replay.balancing_repeats == 0
    config.tasks["sentiment"].retrain.balance_replay = True
    balanced, balanced_judged = assembled(config, store, ["other-topics"], "retrain-job2")
    shares = Counter(e.reference for e in balanced.dataset.load() if e.meta["retrain_part"] == "replay")
    assert len(set(shares.values())) == 1, f"balanced on request: {shares}"


def test_an_input_of_a_gate_set_is_dropped_from_every_source(config: Config, store: Store) -> None:
    challenger = examples("topic", 100) + [Example(id="leak", input="held tweet number 5", reference="neutral")]
    seed_sets(store, config, challenger)
    add_dataset(store, config.data_path, [Example(id="t1", input="Held tweet number 7", reference="positive"),
                                          Example(id="t2", input="a fresh labelled request", reference="negative")],
                task="sentiment", name="feedback", kind="challenger", source="traffic:sentiment:test")
    data, data_judged = assembled(config, store, ["other-topics"], "retrain-job1")
    trained = input_keys(data.dataset.load())
    assert "held tweet number 7" not in trained and "held tweet number 5" not in trained
    assert "a fresh labelled request" in trained, "a traffic-built set is trained on whole"
    assert data.recipe.new.in_gate_sets_dropped >= 1


def test_no_new_data_is_a_clear_error(config: Config, store: Store) -> None:
    add_dataset(store, config.data_path, examples("airline", 50), task="sentiment", name="train", kind="train",
                source="test")
    add_dataset(store, config.data_path, examples("held", 20), task="sentiment", name="heldout", kind="heldout",
                source="test")
    with pytest.raises(TrainingError, match="no labelled new data"):
        assembled(config, store, [], "retrain-job1")


def test_scheduled_evals_judge_the_split_from_the_first_eval_and_the_gate_uses_the_same_version(
        config: Config, store: Store) -> None:
    seed_sets(store, config, examples("topic", 200))
    assert evaluation_set(store, "sentiment", "other-topics") == "sentiment/other-topics"  # no split yet
    heldout, judged = judged_sets(config, store, "sentiment")  # what the scheduled eval judges on
    assert heldout.ref == "sentiment/heldout@1" and heldout.role == "heldout"
    assert judged.ref == "sentiment/other-topics-gate@1" and judged.role == "challenger"  # created here
    assert input_keys(judged.dataset.load()) == input_keys(split(examples("topic", 200), 0.5, 11)[1])
    _, later = assembled(config, store, ["sentiment/other-topics"], "retrain-job1")
    assert later[1].ref == judged.ref, "the gate judges the same version, so it reuses the scheduled runs"
    assert [s.ref for s in judged_sets(config, store, "sentiment")] == [heldout.ref, judged.ref]


def test_a_challenger_set_too_small_to_split_is_judged_whole_and_never_trained_on(config: Config,
                                                                                   store: Store) -> None:
    tiny = [e for e in examples("topic", 40) if not split([e], 0.5, 11)[1]][:3]  # none falls in the judge split
    seed_sets(store, config, tiny)
    sets = judged_sets(config, store, "sentiment")
    assert [s.ref for s in sets] == ["sentiment/heldout@1", "sentiment/other-topics@1"] and sets[1].whole
    add_dataset(store, config.data_path, [Example(id="f1", input="a fresh labelled request", reference="negative")],
                task="sentiment", name="feedback", kind="challenger", source="traffic:sentiment:test")
    data = assemble(config, store, "sentiment", judged=sets, name="retrain-job1")
    assert not input_keys(data.dataset.load()) & input_keys(tiny), "a set judged whole gives nothing to train on"
    assert data.recipe.new.sources["sentiment/other-topics@1"].held_back_for_gate == 3
