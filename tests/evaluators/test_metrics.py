from __future__ import annotations

import pytest

from tuneloop.evaluators.metrics import (
    INVALID_LABEL,
    bleu,
    chrf,
    exact_match,
    label_metrics,
    parse_label,
    rouge,
    token_f1,
    token_f1_one,
)

LABELS = ["negative", "neutral", "positive"]


def test_identical_non_latin_replies_score_one() -> None:
    texts = ["我喜欢猫。", "Привет, как дела?", "مرحبا كيف حالك"]
    scores = rouge(texts, texts)
    assert all(scores[k].value == pytest.approx(1.0) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    assert chrf(texts, texts).value == pytest.approx(1.0)
    assert token_f1(texts, texts).value == pytest.approx(1.0)


def test_rouge_matches_hand_computed_values() -> None:
    # reference "the cat sat" vs prediction "the cat ran": 2 of 3 unigrams -> P = R = F = 2/3; bigrams 1 of 2.
    scores = rouge(["the cat ran"], ["the cat sat"])
    assert scores["rouge1"].value == pytest.approx(2 / 3)
    assert scores["rouge2"].value == pytest.approx(1 / 2)
    assert rouge(["the cats are running"], ["the cat runs"])["rouge1"].per_example == pytest.approx([6 / 7])


def test_bleu_against_sacrebleu_documented_example() -> None:
    # sacrebleu README: corpus_bleu of these hypotheses and two reference streams is 48.53.
    import sacrebleu

    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    assert sacrebleu.corpus_bleu(hyps, refs).score == pytest.approx(48.53, abs=0.01)
    single = bleu(hyps, refs[0])
    assert single.value == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs[0]]).score / 100)
    assert single.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_squad_token_f1_and_exact_match() -> None:
    assert token_f1_one("The cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1_one("", "something") == 0.0
    assert exact_match(["The Cat!"], ["cat"]).value == 1.0


def test_empty_predictions_score_zero_and_are_counted() -> None:
    result = token_f1(["", "hello there"], ["hi", "hello there"])
    assert result.per_example == [0.0, 1.0] and result.empty == 1
    assert rouge(["", "x"], ["a b", "x"])["rouge1"].empty == 1
    assert bleu(["", ""], ["a", "b"]).value == 0.0


@pytest.mark.parametrize(("answer", "label"), [
    ("positive", "positive"), ("Positive.", "positive"), ("  NEGATIVE ", "negative"),
    ("neutral, because it states a fact", "neutral"), ("not negative", INVALID_LABEL),
    ("I think it's positive", INVALID_LABEL), ("", INVALID_LABEL), (None, INVALID_LABEL), ("negat", INVALID_LABEL),
])
def test_label_parsing_rules(answer: str | None, label: str) -> None:
    assert parse_label(answer, LABELS) == label


def test_label_metrics_count_invalid_answers_as_wrong() -> None:
    results = label_metrics(["Positive.", "negative", "maybe", ""], ["positive", "negative", "neutral", "neutral"],
                            LABELS)
    assert results["accuracy"].value == 0.5
    assert results["accuracy"].details["invalid"] == 2 and results["accuracy"].empty == 1
    assert results["macro_f1"].value == pytest.approx((1 + 0 + 1) / 3)
    assert results["accuracy"].details["per_class"]["neutral"]["recall"] == 0.0
