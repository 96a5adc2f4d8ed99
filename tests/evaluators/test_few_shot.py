"""Few-shot draws: seeded, from the pool only, in the asked proportions; prompts keep the shared prefix intact."""

from __future__ import annotations

from collections import Counter

import pytest

from tuneloop.challenger_sets.records import Example
from tuneloop.evaluators.few_shot import FewShotVariant, draw_shots, label_quota, prediction_counts
from tuneloop.evaluators.label_likelihood import prompt_messages

LABELS = ["negative", "neutral", "positive"]


def _pool() -> list[Example]:
    shares = {"negative": 63, "neutral": 21, "positive": 16}
    return [Example(id=f"{label}-{i}", input=f"{label} tweet {i}", reference=label)
            for label, n in shares.items() for i in range(n)]


@pytest.mark.parametrize(("k", "sampling", "expected"), [
    (3, "proportional", {"negative": 2, "neutral": 1, "positive": 0}),
    (8, "proportional", {"negative": 5, "neutral": 2, "positive": 1}),
    (3, "balanced", {"negative": 1, "neutral": 1, "positive": 1}),
])
def test_quotas_follow_the_sampling_scheme(k, sampling, expected):
    import random

    assert label_quota(_pool(), LABELS, k, sampling, random.Random(0)) == expected


def test_balanced_leftover_shots_go_to_random_labels_and_sum_to_k():
    import random

    quotas = [label_quota(_pool(), LABELS, 8, "balanced", random.Random(seed)) for seed in range(20)]
    assert all(sum(q.values()) == 8 and sorted(q.values()) == [2, 3, 3] for q in quotas)
    assert len({tuple(q.values()) for q in quotas}) > 1, "which labels get the extra shots varies with the seed"


def test_draws_are_seeded_differ_between_seeds_and_come_from_the_pool():
    pool = _pool()
    variant = FewShotVariant(8, "balanced", "turns")
    first, again, other = (draw_shots(pool, LABELS, variant, seed) for seed in (1, 1, 2))
    assert [s.id for s in first] == [s.id for s in again]
    assert [s.id for s in first] != [s.id for s in other]
    assert {s.id for s in first} <= {e.id for e in pool} and len({s.id for s in first}) == 8
    orders = {tuple(s.reference for s in draw_shots(pool, LABELS, variant, seed)) for seed in range(10)}
    assert len(orders) > 1, "the order of labels is shuffled, not fixed"


def test_a_pool_too_small_for_the_quota_is_an_error():
    with pytest.raises(ValueError, match="only 0 'positive' examples"):
        draw_shots([e for e in _pool() if e.reference != "positive"], LABELS, FewShotVariant(3, "balanced", "turns"),
                   seed=0)


def test_prompt_formats_put_the_query_last_after_a_newline():
    shots = draw_shots(_pool(), LABELS, FewShotVariant(3, "balanced", "turns"), seed=0)
    turns = prompt_messages("SYS", "the query", shots, "turns")
    assert [m["role"] for m in turns] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2 + ["user"]
    assert turns[-1]["content"] == "the query" and turns[2]["content"] == shots[0].reference
    message = prompt_messages("SYS", "the query", shots, "message")
    assert len(message) == 2 and message[1]["content"].endswith("\nthe query")
    assert all(f"{s.input} => {s.reference}" in message[1]["content"] for s in shots)
    assert prompt_messages("SYS", "q") == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q"}]


def test_prediction_counts_name_every_label():
    assert prediction_counts(["negative", "negative", "positive"], LABELS) == "negative 2 / neutral 0 / positive 1"
    assert Counter(prediction_counts([], LABELS).split(" / ")) == Counter(["negative 0", "neutral 0", "positive 0"])
