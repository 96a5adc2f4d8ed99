"""Sufficient-statistics scoring agrees with the libraries' own corpus scores."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from sklearn.metrics import f1_score

from tuneloop.evaluators import metrics
from tuneloop.evaluators.scoring import score_examples

PREDICTIONS = ["the cat sat on the mat", "a dog barked loudly", "", "hello world", "кошка сидит на ковре"]
REFERENCES = ["the cat is on the mat", "the dog barked", "nothing here", "hello world", "кошка сидит на ковре"]
LABELS = ["negative", "neutral", "positive"]


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores():
    tables = score_examples(["bleu", "chrf"], PREDICTIONS, REFERENCES)
    assert tables["bleu"].value() == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score / 100)
    assert tables["chrf"].value() == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score / 100)
    assert tables["bleu"].signature.startswith("nrefs:1")
    assert tables["bleu"].empty == 1


def test_resampling_weights_equal_recomputing_on_the_resampled_corpus():
    tables = score_examples(["bleu", "macro_f1"], PREDICTIONS, REFERENCES, LABELS)
    rows = [0, 0, 3, 4, 1]
    weights = np.bincount(rows, minlength=len(PREDICTIONS)).astype(float)[None, :]
    resampled = sacrebleu.corpus_bleu([PREDICTIONS[i] for i in rows], [[REFERENCES[i] for i in rows]])
    assert tables["bleu"].from_weights(weights)[0] == pytest.approx(resampled.score / 100)


@pytest.mark.parametrize("predicted", [
    ["positive", "negative", "neutral", "positive", "garbage"],
    ["positive"] * 5,
    ["", "Negative.", "neutral, I think", "not positive", "POSITIVE"],
])
def test_macro_f1_and_accuracy_equal_sklearn(predicted):
    truth = ["positive", "negative", "negative", "positive", "neutral"]
    tables = score_examples(["accuracy", "macro_f1"], predicted, truth, LABELS)
    parsed = [metrics.parse_label(p, LABELS) for p in predicted]
    expected = f1_score(truth, parsed, labels=LABELS, average="macro", zero_division=0)
    assert tables["macro_f1"].value() == pytest.approx(expected)
    assert tables["accuracy"].value() == pytest.approx(np.mean([p == t for p, t in zip(parsed, truth, strict=True)]))


def test_mean_metrics_match_the_metric_functions():
    tables = score_examples(["rouge1", "rougeL", "token_f1", "exact_match"], PREDICTIONS, REFERENCES)
    assert tables["rouge1"].value() == pytest.approx(metrics.rouge(PREDICTIONS, REFERENCES)["rouge1"].value)
    assert tables["token_f1"].value() == pytest.approx(metrics.token_f1(PREDICTIONS, REFERENCES).value)
    assert tables["exact_match"].value() == pytest.approx(2 / 5)
    per_example = tables["exact_match"].per_example
    assert per_example is not None and list(per_example) == [0, 0, 0, 1, 1]


def test_slices_are_row_subsets():
    tables = score_examples(["token_f1"], PREDICTIONS, REFERENCES)
    assert tables["token_f1"].subset([3, 4]).value() == pytest.approx(1.0)
    assert tables["token_f1"].subset([2]).value() == 0.0


def test_label_metrics_without_labels_are_refused():
    with pytest.raises(ValueError, match="labels"):
        score_examples(["accuracy"], ["a"], ["a"])
    with pytest.raises(ValueError, match="predictions"):
        score_examples(["bleu"], ["a"], ["a", "b"])
