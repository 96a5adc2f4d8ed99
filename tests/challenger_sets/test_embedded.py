from __future__ import annotations

from tuneloop.challenger_sets.embedded import AIRLINE_HANDLES, clean_tweet, tweet_topic
from tuneloop.challenger_sets.leakage import input_keys
from tuneloop.challenger_sets.records import normalize_text


def _by_name(built: list) -> dict:
    return {b.name: b for b in built}


def test_sentiment_splits_are_deduplicated_disjoint_and_domain_separated(embedded_sets: dict) -> None:
    sets = _by_name(embedded_sets["sentiment"])
    train, heldout, other = sets["train"].examples, sets["heldout"].examples, sets["other-topics"].examples
    assert len(heldout) == 1000 and len(other) == 2000 and len(train) > 10_000
    train_keys = input_keys(train)
    assert len(train_keys) == len(train), "duplicates left in the training set"
    assert not (train_keys & input_keys(heldout)) and not (train_keys & input_keys(other))
    assert all(e.meta["topic"] == "airline" for e in train + heldout)
    assert all(not any(h in e.input.lower() for h in AIRLINE_HANDLES) for e in other)
    assert {e.meta["topic"] for e in other} >= {"apple", "claritin", "coachella", "deflategate", "self-driving-cars"}
    assert {e.reference for e in heldout} == {"negative", "neutral", "positive"}
    assert all("\ufffd" not in e.input for e in train + heldout + other)
    assert sets["train"].build["duplicates_removed"] > 900


def test_chat_is_split_by_conversation_and_by_period(embedded_sets: dict) -> None:
    sets = _by_name(embedded_sets["chat"])
    train, heldout, autumn = sets["train"].examples, sets["heldout"].examples, sets["autumn-2018"].examples
    conversations = {e.meta["conversation"] for e in train}
    assert not conversations & {e.meta["conversation"] for e in heldout}
    assert all(e.meta["start"][:7] in ("2018-04", "2018-05") for e in train + heldout)
    assert all(e.meta["start"][:7] in ("2018-09", "2018-10", "2018-11") for e in autumn)
    assert not input_keys(train) & input_keys(heldout)
    for example in train[:200]:
        assert example.messages and example.messages[0].role == "user" and example.messages[-1].role == "user"


def test_builds_are_deterministic() -> None:
    from tuneloop.challenger_sets.embedded import build_sentiment

    first = [e.id for e in build_sentiment()[1].examples[:50]]
    second = [e.id for e in build_sentiment()[1].examples[:50]]
    assert first == second


def test_debris_cleaning_and_topics() -> None:
    assert clean_tweet("Google\u0562_\ufffd\ufffd_\ufffd\ufffds cars") == "Google s cars"
    assert clean_tweet("no_debris_here @some_user") == "no_debris_here @some_user"
    assert tweet_topic("@united lost my bag") == "airline"
    assert tweet_topic("Take a claritin") == "claritin"
    assert normalize_text(clean_tweet("#cars_\ufffd_.no thanks")) == "#cars .no thanks"
